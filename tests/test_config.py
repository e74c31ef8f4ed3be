import pytest
import yaml
from conftest import CONFIGS

from ddp_train.config import Config, all_keys, load_config
from ddp_train.errors import ConfigError


def test_defaults_are_the_embedded_default_and_match_configs_default(tmp_path):
    from conftest import CONFIGS

    assert load_config(CONFIGS / "default.yaml").to_dict() == Config().to_dict()
    cfg = Config()
    assert (cfg.model.name, cfg.data.name, cfg.optim.name, cfg.optim.lr) == ("cnn_dropout", "mnist_mini", "adam", 1e-3)


def test_yaml_then_overrides_take_precedence(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("optim: {lr: 0.1, name: sgd}\ntrain: {epochs: 3}\n")
    cfg = load_config(p, ["optim.lr=3e-4", "log.wandb.tags=[a,b]", "train.grad_clip=1", "run.name=x"])
    assert cfg.optim.lr == 3e-4 and cfg.optim.name == "sgd"  # override beats file, file beats default
    assert cfg.train.epochs == 3
    assert cfg.log.wandb.tags == ["a", "b"]
    assert cfg.train.grad_clip == 1.0 and isinstance(cfg.train.grad_clip, float)
    assert cfg.run.name == "x"


def test_yaml_exponent_without_dot_is_a_float(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("optim: {lr: 1e-3}\n")  # YAML 1.1 reads this as a string
    assert load_config(p).optim.lr == 1e-3


@pytest.mark.parametrize("override, needle", [
    ("optim.lrr=1", "unknown config key 'optim.lrr'; did you mean 'optim.lr'?"),
    ("lr=1", "did you mean 'optim.lr'?"),
    ("trian.epochs=1", "unknown config key 'trian'; did you mean 'train'?"),
    ("train.epochs=abc", "'train.epochs' must be an integer"),
    ("train.epochs=0", "'train.epochs' must be >= 1"),
    ("optim.lr=-1", "'optim.lr' must be > 0"),
    ("profile.steps=[5,2]", "'profile.steps' must be [first, last] with 1 <= first <= last"),
    ("profile.steps=3", "'profile.steps' must be [first, last]"),
    ("parallel.hang_timeout_s=2", "'parallel.hang_timeout_s' must be at least 5 s"),
    ("train.max_bad_steps=0", "'train.max_bad_steps' must be >= 1"),
    ("checkpoint.preempt_vote_every_s=-1", "'checkpoint.preempt_vote_every_s' must be >= 0 (0: every step)"),
    ("log.straggler_factor=1", "'log.straggler_factor' must be > 1"),
    ("optim.name=lamb", "'optim.name' must be one of adam, adamw, sgd"),
    ("train.precision=fp8", "'train.precision' must be one of"),
    ("data.augment=maybe", "'data.augment' must be true or false"),
    ("optim.nesterov=true", "'optim.nesterov' needs optim.name=sgd"),
    ("parallel.strategy=fsdp train.precision=fp16", "fp16 is not supported with parallel.strategy=fsdp; use bf16"),
])
def test_bad_values_name_the_key(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config(None, override.split())
    assert needle in str(e.value)
    assert "\n" not in str(e.value)


def test_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {epochs: [1,\n")
    with pytest.raises(ConfigError, match="bad.yaml line .* is not valid YAML"):
        load_config(bad)


def test_resolved_config_round_trips_through_yaml(tmp_path):
    cfg = load_config(None, ["optim.lr=0.01", "log.wandb.tags=[x]"])
    p = tmp_path / "config.yaml"
    p.write_text(cfg.to_yaml())
    assert load_config(p).to_dict() == cfg.to_dict()
    assert yaml.safe_load(cfg.to_yaml())["optim"]["lr"] == 0.01


def test_every_key_is_listed():
    keys = all_keys()
    for k in ("run.seed", "train.global_batch_size", "log.wandb.mode", "checkpoint.keep_last", "parallel.strategy"):
        assert k in keys


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads_and_validates(path):
    cfg = load_config(path)
    assert cfg.model.name and cfg.data.name


def test_help_describes_every_key():
    import subprocess
    import sys

    from conftest import ROOT, engine_env

    proc = subprocess.run([sys.executable, "-m", "ddp_train", "--help"], cwd=ROOT, env=engine_env(),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    rows = {line.split()[0]: line for line in proc.stdout.splitlines() if line.startswith("  ") and
            line.split()[0] in all_keys()}
    assert set(rows) == set(all_keys()) and len(rows) >= 60
    for key, line in rows.items():
        description = line.split(": ", 1)[1] if ": " in line else ""
        assert len(description.split()) >= 2, f"{key} has no description: {line!r}"


def test_a_resume_warns_only_for_the_changes_that_alter_the_trajectory():
    from ddp_train.config.changes import config_changes

    base = load_config(None, ["sched.name=constant"]).to_dict()

    def changes(*overrides: str, batch_norm: bool = False):
        return config_changes(base, load_config(None, ["sched.name=constant", *overrides]).to_dict(), batch_norm)

    same = ["parallel.strategy=fsdp", "optim.implementation=foreach", "train.channels_last=false",
            "data.num_workers=3", "train.epochs=20", "train.max_steps=50", "train.grad_accum_steps=2",
            "run.name=x", "checkpoint.keep_last=9", "log.progress_bar=never", "train.compile=true"]
    altering, keeping = changes(*same)
    assert altering == [] and len(keeping) == len(same)
    assert changes("optim.lr=0.1", "train.global_batch_size=32", "model.name=mlp", "run.seed=1")[0] == \
        ["model.name", "optim.lr", "run.seed", "train.global_batch_size"]
    cosine = config_changes(load_config(None, []).to_dict(), load_config(None, ["train.epochs=20"]).to_dict())
    assert cosine == (["train.epochs"], [])  # the default cosine schedule's LR depends on its length
    assert changes("train.grad_accum_steps=2", batch_norm=True)[0] == ["train.grad_accum_steps"]
