"""Submit ddp_train to SLURM through submitit: one task per GPU (per process on CPU), each task runs the
engine directly; preemption/timeout -> collective checkpoint -> requeue -> resume in the same run
directory; sweeps as one job array.

  python -m launch.slurm [CONFIG] [key=value ...] --nodes N|A-B --gpus-per-node G --partition P --time MIN
      [--tasks-per-node T] [--cpus-per-task C] [--mem 64G] [--account A] [--qos Q] [--constraint C]
      [--exclude NODES]
      [--signal-delay S] [--max-requeues K] [--sweep key=v1,v2 ...] [--array-parallelism J]
      [--folder DIR] [--job-name NAME] [--dry-run] [--wait]
"""
from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

from ddp_train.errors import UserError, report

from . import preflight, sweep
from .teardown import teardown_line


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m launch.slurm", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("args", nargs="*", metavar="CONFIG|key=value", help="config file, then engine overrides")
    g = p.add_argument_group("resources")
    g.add_argument("--nodes", default="1", metavar="N|A-B",
                   help="node count, or a range: the job starts as soon as A nodes are free and gets up to B")
    g.add_argument("--gpus-per-node", type=int, default=0, help="0 = CPU tasks with gloo")
    g.add_argument("--tasks-per-node", type=int, default=None,
                   help="processes per node (default: one per GPU, 1 on CPU); must equal --gpus-per-node on GPUs")
    g.add_argument("--cpus-per-task", type=int, default=None)
    g.add_argument("--mem", default=None, help="per node, as SLURM writes it: 64G, 0 = all")
    g.add_argument("--partition", default=None)
    g.add_argument("--time", type=int, default=60, help="time limit in minutes (default 60)")
    g.add_argument("--account", default=None)
    g.add_argument("--qos", default=None)
    g.add_argument("--constraint", default=None)
    g.add_argument("--exclude", default=None, metavar="NODES", help="nodes the job must not run on (n[2-3],n7)")
    g.add_argument("--job-name", default=None, help="default: the config's stem")
    r = p.add_argument_group("preemption")
    r.add_argument("--signal-delay", type=int, default=120,
                   help="seconds before the time limit SLURM sends USR2 so the job can save (default 120)")
    r.add_argument("--max-requeues", type=int, default=3,
                   help="requeues after preemption/timeout or a node at fault (default 3)")
    s = p.add_argument_group("sweeps")
    s.add_argument("--sweep", action="append", default=[], metavar="key=v1,v2",
                   help="repeatable; the cartesian product is submitted as one job array")
    s.add_argument("--array-parallelism", type=int, default=16, help="array elements running at once")
    o = p.add_argument_group("output")
    o.add_argument("--folder", default=None, help="submitit's logs and pickles (default: RUN_ROOT/slurm_logs/%%j)")
    o.add_argument("--dry-run", action="store_true", help="print the sbatch script and exit; submits nothing")
    o.add_argument("--wait", action="store_true", help="follow the job, stream rank 0's log, exit with its status")
    o.add_argument("--wait-timeout", type=float, default=None, help=argparse.SUPPRESS)
    return p


def sbatch_params(args, req: preflight.Request, job_name: str, n_elements: int, folder: Path) -> dict:
    """SlurmExecutor parameter names (submitit's), shared by --dry-run and the real submission."""
    cpus = args.cpus_per_task or preflight.default_cpus_per_task(req)
    # srun of Slurm 22.05-23.02 does not inherit the job's --cpus-per-task: pass it, or every task gets one
    # CPU. --kill-on-bad-exit: a task that dies ends the step at once instead of leaving the others waiting
    # in a collective until the timeout.
    srun_args = ["--kill-on-bad-exit=1"] + ([f"--cpus-per-task={cpus}"] if cpus else [])
    tasks = req.ntasks_per_node
    params = {"job_name": job_name, "time": args.time, "nodes": req.nodes, "ntasks_per_node": tasks,
              "signal_delay_s": args.signal_delay, "additional_parameters": {"requeue": True},
              "srun_args": srun_args, "teardown": [teardown_line(folder, args.max_requeues, req.nodes)]}
    optional = {"gpus_per_node": args.gpus_per_node or None, "cpus_per_task": cpus,
                "mem": args.mem, "partition": args.partition, "account": args.account, "qos": args.qos,
                "constraint": args.constraint, "exclude": args.exclude}
    if isinstance(req.nodes_spec, str):
        # --nodes A-B. With --ntasks-per-node (or --ntasks) sbatch fixes ntasks = A x T and the job never gets
        # more than A nodes, on requeues too (Slurm 22.05, measured). Without them SLURM gives as many nodes
        # as are free, one task each: that task asks for the CPUs of T tasks and srun splits each node into T.
        # (The range is an sbatch flag of its own: submitit counts its tasks from an integer --nodes.)
        params["additional_parameters"]["nodes"] = req.nodes_spec
        del params["ntasks_per_node"]
        srun_args.insert(1, f"--ntasks-per-node={tasks}")
        optional["cpus_per_task"] = cpus * tasks if cpus else None
    params.update({k: v for k, v in optional.items() if v is not None})
    if n_elements > 1:
        params["array_parallelism"] = args.array_parallelism
    return params


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_intermixed_args(argv)
    try:
        return _main(args)
    except UserError as e:
        return report("launch.slurm", e)


def _main(args) -> int:
    from ddp_train.config import load_config
    from ddp_train.config.argv import split_argv

    config_path, overrides, flags = split_argv(args.args)
    if flags:
        raise UserError(f"--{sorted(flags)[0]} is an engine flag: run python -m ddp_train for it")
    if config_path:
        config_path = str(Path(config_path).resolve())
    nodes, max_nodes = preflight.node_range(args.nodes)
    req = preflight.Request(nodes=nodes, gpus_per_node=args.gpus_per_node, tasks_per_node=args.tasks_per_node,
                            time_min=args.time, signal_delay_s=args.signal_delay, max_requeues=args.max_requeues,
                            partition=args.partition, dry_run=args.dry_run, max_nodes=max_nodes)
    preflight.check_request(req)
    elements = sweep.expand(args.sweep)
    base = load_config(config_path, overrides)
    root = Path(base.run.root).resolve()
    if len(elements) > 1 and base.run.name:
        raise UserError(f"run.name={base.run.name} with --sweep: every array element needs its own run "
                        "directory; drop run.name (each run is named after its job id)")
    stem = Path(config_path).stem if config_path else "default"
    fixed = [*overrides, f"run.root={root}"]
    if len(elements) > 1 and base.log.wandb.group is None:
        fixed.append(f"log.wandb.group={stem}-sweep-{time.strftime('%Y%m%d-%H%M%S')}")  # one W&B group
    for element in elements:
        cfg = load_config(config_path, fixed + element)  # a bad swept key or value fails here, by name
        preflight.check_config(cfg, req, " ".join(element) if len(elements) > 1 else "")
    preflight.check_run_root(root, req)
    # the torch-free part of `python -m ddp_train.doctor`, on the login node
    for warning in (preflight.check_signal_delay(req, root, base.run.name), preflight.check_disk(base, root)):
        if warning:
            print(f"launch.slurm: warning: {warning}", file=sys.stderr, flush=True)
    preflight.check_slurm(req)

    folder = Path(args.folder).resolve() if args.folder else root / "slurm_logs" / "%j"
    params = sbatch_params(args, req, args.job_name or stem, len(elements), folder)
    if args.dry_run:
        return dry_run(folder, params, len(elements))
    return submit(args, folder, params, config_path, fixed, elements, base.run.name, root, req)


def dry_run(folder: Path, params: dict, n_elements: int) -> int:
    from submitit.slurm.slurm import _make_sbatch_string

    command = " ".join([shlex.quote(sys.executable), "-u -m submitit.core._submit", shlex.quote(str(folder))])
    print(_make_sbatch_string(command=command, folder=folder, map_count=n_elements if n_elements > 1 else None,
                              **params))
    return 0


def submit(args, folder: Path, params: dict, config_path: str | None, fixed: list[str], elements: list[list[str]],
           run_name: str | None, root: Path, req: preflight.Request) -> int:
    import submitit

    from ddp_train.rundir.naming import default_run_name

    from .follow import follow
    from .slurm_job import TrainJob

    executor = submitit.AutoExecutor(folder=folder, cluster="slurm", slurm_max_num_timeout=args.max_requeues)
    executor.update_parameters(**{f"slurm_{k}": v for k, v in params.items()})
    tasks = [TrainJob(config_path, fixed + element, args.max_requeues) for element in elements]
    try:
        if len(tasks) == 1:
            jobs = [executor.submit(tasks[0])]
        else:
            with executor.batch():  # one job array
                jobs = [executor.submit(t) for t in tasks]
    except submitit.core.utils.UncompletedJobError as e:  # sbatch said no (account, QOS, limits...)
        lines = [ln for ln in str(e).splitlines() if ln.strip()]
        raise UserError(f"sbatch refused the job: {lines[-1] if lines else e}") from None
    print(f"launch.slurm: submitted {len(jobs)} job{'s' if len(jobs) > 1 else ''} ({req.nodes_spec} node(s) x "
          f"{req.ntasks_per_node} task(s) each); submitit logs in {folder}")
    width = max(len(j.job_id) for j in jobs)
    for job, element in zip(jobs, elements):
        # The engine names an unnamed run after its job id, which requeues keep: predict that name here.
        name = run_name or default_run_name(config_path, f"job{job.job_id}")
        print(f"  {job.job_id:<{width}}  {root / name}  {' '.join(element)}".rstrip())
    sys.stdout.flush()
    if not args.wait:
        return 0
    return follow(jobs, folder, req.world_size, stream=True, timeout_s=args.wait_timeout)


if __name__ == "__main__":
    sys.exit(main())
