"""Wall time of R seed runs executed one after another against J at once (`--jobs J`).

    .venv/bin/python benchmarks/sweep_throughput.py --runs 8 --jobs-list 1,2,4 --rounds 1 \
        [--policy passive] [--json sweep.json]

What it measures: the command a user runs to train several seeds, `python -m kdlab -q train
CFG --seeds R --jobs J`, timed from its start to its exit, for each J of `--jobs-list`. CFG is
a small digits config written to a temporary folder (resnet8, `--train-subset` images,
`--epochs` epochs, batch 64, CPU, no progress bar or TensorBoard; by default one run trains for
about 5-10 s on a few cores). Every mode trains the same R runs (seeds 0..R-1) into its own
output folder, so nothing is reused between modes.

- J = 1: the runs go one after another in the command's own process, each with the threads
  torch chooses (all cores on a quiet machine; kdlab drops to the free ones on a busy one).
- J > 1: the executor (`kdlab.plan.executor`) starts J worker processes at a time, each with
  `cores // J` threads (KDLAB_THREADS / OMP_NUM_THREADS), and a new one whenever one ends.

Where the time goes, and so what J can win: a small network on 16x16 images does not keep
many threads busy (its parallel regions are short, and every thread waits at each region's
barrier for the slowest), so R runs side by side on 1/J of the cores each can finish sooner
than R runs one after another on all of them. Against that, each worker pays its own Python,
torch and kdlab start-up (a few seconds: J = 1 pays it once), and R not divisible by J
leaves cores idle at the end. The table gives per mode: the wall seconds of the whole command
(median over `--rounds`), runs per hour (R / wall), the speed-up over J = 1 in wall time, the
threads per run (`cores // J`, at least 1) and the training seconds of one run (the sum of its
epochs' `time_s`, median over the runs: how much slower one run gets when it shares the
machine).

Modes are interleaved: each round runs every mode once, in forward order in even rounds and
reversed in odd ones, so slow drift in the machine's load hits all modes alike. `--policy`
sets OMP_WAIT_POLICY (passive: idle OpenMP threads sleep instead of spinning, which matters
when more threads than cores are awake) for every mode; by default the environment is left as
it is. The output is one Markdown table with the machine (CPU model, cores this process may
use, torch version, 1-min load average before and after) and the command; `--json` keeps
every round's raw seconds.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without install

from kdlab.plan.executor import cpu_cores, threads_per_job  # noqa: E402

RUN_NAME = "sweep"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=8, help="seed runs per mode, R (default 8)")
    p.add_argument("--jobs-list", default="1,2,4", help="comma-separated values of --jobs to compare (default 1,2,4)")
    p.add_argument("--rounds", type=int, default=1, help="interleaved rounds; the table shows medians (default 1)")
    p.add_argument("--model", default="resnet8")
    p.add_argument("--train-subset", type=int, default=1024, help="digits training images per run (default 1024)")
    p.add_argument("--epochs", type=int, default=16, help="epochs per run (default 16)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--policy", choices=["passive", "active"], default=None,
                   help="set OMP_WAIT_POLICY for every mode (default: leave the environment as it is)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write every round's raw seconds")
    args = p.parse_args(argv)
    try:
        args.jobs = [int(j) for j in args.jobs_list.split(",") if j.strip()]
    except ValueError:
        p.error(f"--jobs-list must be comma-separated whole numbers such as 1,2,4, got {args.jobs_list!r}")
    if not args.jobs or min(args.jobs) < 1 or len(set(args.jobs)) != len(args.jobs):
        p.error(f"--jobs-list needs distinct values of at least 1, such as 1,2,4, got {args.jobs_list!r}")
    for name in ("runs", "rounds", "train_subset", "epochs", "batch"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    return args


def write_config(args: argparse.Namespace, folder: Path) -> Path:
    """The digits config every mode trains (JSON is YAML, so no YAML writer is needed)."""
    raw = {
        "name": RUN_NAME,
        "model": {"name": args.model},
        "data": {"name": "digits", "batch_size": args.batch, "num_workers": 0, "train_subset": args.train_subset},
        "optim": {"lr": 0.05},
        "schedule": {"name": "constant"},
        "train": {"epochs": args.epochs, "progress": False, "tensorboard": False, "device": "cpu", "seed": 0},
    }
    path = folder / "config.yaml"
    path.write_text(json.dumps(raw, indent=1) + "\n")
    return path


def mode_env(policy: str | None) -> dict[str, str]:
    """This process's environment, with OMP_WAIT_POLICY set when `policy` is given."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    if policy:
        env["OMP_WAIT_POLICY"] = policy.upper()
    return env


def order_of_round(jobs: list[int], r: int) -> list[int]:
    """Forward in even rounds, reversed in odd ones: each mode takes each place equally often."""
    return list(jobs) if r % 2 == 0 else list(reversed(jobs))


def run_seconds(run_dir: Path) -> float:
    """Training seconds of one run: the sum of its epochs' time_s (training and evaluation)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return sum(float(r["time_s"]) for r in rows)


def time_mode(args: argparse.Namespace, config: Path, output_dir: Path, jobs: int, log: Path) -> dict:
    """One timed `kdlab train CONFIG --seeds R --jobs J`: wall seconds and each run's training seconds."""
    cmd = [sys.executable, "-m", "kdlab", "-q", "train", str(config), f"output_dir={output_dir}",
           "--seeds", str(args.runs), "--jobs", str(jobs)]
    with log.open("w") as out:
        t0 = time.perf_counter()
        rc = subprocess.run(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=mode_env(args.policy)).returncode
        wall = time.perf_counter() - t0
    if rc != 0:
        lines = log.read_text(errors="replace").strip().splitlines()
        raise SystemExit(f"sweep_throughput: --jobs {jobs} failed (exit status {rc}): "
                         f"{lines[-1] if lines else 'no output'}; the full output was in {log}")
    runs = sorted(p for p in output_dir.iterdir() if (p / "result.json").is_file())
    if len(runs) != args.runs:
        raise SystemExit(f"sweep_throughput: --jobs {jobs} finished {len(runs)} of {args.runs} runs; see {log}")
    return {"wall": wall, "run_seconds": [run_seconds(p) for p in runs]}


def summarise(jobs: list[int], rounds: dict[int, list[dict]], runs: int, cores: int) -> list[dict]:
    """Per mode: median wall seconds, runs per hour, speed-up over the first mode (J = 1 when
    listed), threads per run and the median training seconds of one run."""
    wall = {j: statistics.median(r["wall"] for r in rounds[j]) for j in jobs}
    base = wall[1] if 1 in wall else wall[jobs[0]]
    return [{"jobs": j, "threads_per_run": threads_per_job(j, cores), "wall_s": wall[j],
             "runs_per_hour": runs * 3600.0 / wall[j], "speedup": base / wall[j],
             "run_s": statistics.median(s for r in rounds[j] for s in r["run_seconds"])} for j in jobs]


def table(rows: list[dict], base_jobs: int) -> list[str]:
    lines = [f"| --jobs | threads per run | wall s | runs per hour | speed-up vs --jobs {base_jobs} "
             "| s per run (training) |",
             "|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['jobs']} | {r['threads_per_run']} | {r['wall_s']:.1f} | {r['runs_per_hour']:.0f} | "
                     f"{r['speedup']:.2f} | {r['run_s']:.2f} |")
    return lines


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown CPU"


def torch_version() -> str:
    """Read from the installed package's metadata: this process never imports torch."""
    try:
        return metadata.version("torch")
    except metadata.PackageNotFoundError:
        return "not installed"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cores = cpu_cores()
    load_before = os.getloadavg()[0]
    rounds: dict[int, list[dict]] = {j: [] for j in args.jobs}
    with tempfile.TemporaryDirectory(prefix="kdlab-sweep-throughput-") as tmp:
        folder = Path(tmp)
        config = write_config(args, folder)
        for r in range(args.rounds):
            for j in order_of_round(args.jobs, r):
                mode_dir = folder / f"round{r}_jobs{j}"
                mode_dir.mkdir()
                result = time_mode(args, config, mode_dir / "runs", j, mode_dir / "output.log")
                rounds[j].append(result)
                print(f"  round {r + 1}/{args.rounds}: --jobs {j}: {result['wall']:.1f} s "
                      f"(load {os.getloadavg()[0]:.2f})", file=sys.stderr, flush=True)
    load_after = os.getloadavg()[0]
    rows = summarise(args.jobs, rounds, args.runs, cores)
    base_jobs = 1 if 1 in args.jobs else args.jobs[0]
    cmd = "python benchmarks/sweep_throughput.py " + " ".join(sys.argv[1:] if argv is None else argv)
    policy = f"OMP_WAIT_POLICY={args.policy.upper()}" if args.policy else \
        f"OMP_WAIT_POLICY {os.environ.get('OMP_WAIT_POLICY', 'unset')} (as in the environment)"
    print(f"`{cmd}`\n")
    print(f"{args.runs} runs of `kdlab train --seeds {args.runs} --jobs J`: {args.model} on digits, "
          f"{args.train_subset} training images, {args.epochs} epoch(s), batch {args.batch}, CPU; {cpu_model()}, "
          f"{cores} cores (affinity), torch {torch_version()}, {policy}; median of {args.rounds} round(s); "
          f"1-min load average {load_before:.2f} before, {load_after:.2f} after\n")
    print("\n".join(table(rows, base_jobs)))
    if args.json:
        Path(args.json).write_text(json.dumps({
            "command": cmd, "cpu": cpu_model(), "cores": cores, "torch": torch_version(), "policy": args.policy,
            "runs": args.runs, "model": args.model, "train_subset": args.train_subset, "epochs": args.epochs,
            "batch": args.batch, "load_before": load_before, "load_after": load_after, "summary": rows,
            "rounds": {str(j): rounds[j] for j in args.jobs}}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
