"""The allocator fix (ddp_train.allocator), checked by its effect: a step-like pattern of a few MiB
allocated and freed, in a fresh process, faults its pages in every time under glibc's adaptive thresholds
and not at all under the fixed ones. Real processes, real page faults (getrusage); no torch needed."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import engine_env

PATTERN = """
import json, resource, sys
import numpy as np
from ddp_train.allocator import fix_malloc_thresholds
applied = fix_malloc_thresholds() if sys.argv[1] == "fix" else None

def step():  # activations of a few MiB alive together, then freed, as in a CNN's training step
    keep = [np.ones(n, dtype=np.float32) for n in (1_500_000, 3_000_000, 600_000, 2_400_000, 40_000)]
    del keep

for _ in range(3):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(30):
    step()
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 30
print(json.dumps({"applied": applied, "faults_per_step": faults}))
"""

glibc = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the fix is for glibc's malloc")


def pattern(mode: str, **env: str) -> dict:
    out = subprocess.run([sys.executable, "-c", PATTERN, mode], env=engine_env(**env), capture_output=True,
                         text=True, timeout=60, check=True).stdout
    return json.loads(out)


@glibc
def test_fixed_thresholds_stop_the_per_step_page_faults():
    adaptive, fixed = pattern("none"), pattern("fix")
    assert fixed["applied"] == {"mode": "fixed", "mmap_threshold": 32 << 20, "trim_threshold": 256 << 20}
    assert adaptive["faults_per_step"] > 500, adaptive  # the mechanism is real here: MiBs faulted in a step
    assert fixed["faults_per_step"] < 1, fixed


@glibc
def test_a_users_own_malloc_setting_is_kept():
    result = pattern("fix", MALLOC_TRIM_THRESHOLD_="1048576")
    assert result["applied"] == {"mode": "environment"}
