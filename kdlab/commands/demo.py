"""`kdlab demo`: every method kdlab implements, end to end on the bundled digits, no download."""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from typing import Any
from pathlib import Path

from kdlab.commands._common import DEMO_MARKER, add_exec_args, earlier_demo, exec_options
from kdlab.commands._demo_detection import DESCRIPTION as DETECTION_DESCRIPTION

HELP = "teacher, student alone, KD, DKD, ReviewKD and two chains of generations on the bundled digits"
DESCRIPTION = """\
The whole kdlab workflow on scikit-learn's bundled handwritten digits (1,797 8x8 images,
shown to the networks at 16x16; no download). A resnet20 teacher learns the full training
split; a resnet8 student gets only 200 labelled digits:

  teacher        resnet20 on all training digits            configs/digits/teacher.yaml
  student alone  resnet8 on 200 digits, cross-entropy        configs/digits/student_alone.yaml
  KD, DKD,       the same resnet8 and 200 digits, distilled  configs/digits/kd.yaml, dkd.yaml,
  ReviewKD       from the teacher                            reviewkd.yaml
  two chains     resnet8 patriarch + 2 generations, each     configs/digits/chain_tolerant.yaml
                 taught by the previous one: a tolerant      (D(0.6, 0.6)) and chain_strict.yaml
                 patriarch next to a strict one              (D(1.0, 0.6))

It prints one table (last and best top-1, gain over the student alone, seconds) and writes one
figure (validation top-1 per epoch of every run, bars of the final top-1). About 80 s on
2 CPU cores; deterministic for a given machine and thread count. The runs land in --output-dir
(default runs/demo); running the demo again replaces the earlier demo's runs there.

The runs are one plan (kdlab.plan): the distilled students wait for the teacher, each chain's
generations for the one before; the student alone and the patriarchs wait for nothing.
--jobs N trains N of them at once, each in a process of its own with its share of the cores
(logs in <output-dir>/logs/); a run that fails is shown as failed in the table, the runs that
need it are skipped, the others go on, and the demo exits 1.
"""

# The demo's experiments, embedded so that `kdlab demo` works from an installed package too;
# configs/digits/*.yaml hold the same experiments as files (a test keeps them equal).
TEACHER = {
    "name": "digits_teacher_resnet20",
    "model": {"name": "resnet20"},
    "data": {"name": "digits", "batch_size": 64, "num_workers": 0},
    "optim": {"name": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4},
    "schedule": {"name": "cosine", "warmup_epochs": 1},
    "train": {"epochs": 12, "seed": 0},
}
STUDENT_ALONE = {
    "name": "digits_student_resnet8",
    "model": {"name": "resnet8"},
    "data": {"train_subset": 200},
    "train": {"epochs": 30},
}
_FROM_TEACHER = {"name": "resnet20", "checkpoint": "runs/digits_teacher_resnet20/best.pt"}
KD = {
    "name": "digits_kd_resnet20_resnet8",
    "teacher": _FROM_TEACHER,
    "method": {"name": "kd", "temperature": 4.0, "ce_weight": 0.1, "kd_weight": 0.9},
}
DKD = {
    "name": "digits_dkd_resnet20_resnet8",
    "teacher": _FROM_TEACHER,
    "method": {"name": "dkd", "alpha": 1.0, "beta": 2.0, "temperature": 4.0, "warmup_epochs": 5},
}
REVIEWKD = {
    "name": "digits_reviewkd_resnet20_resnet8",
    "teacher": _FROM_TEACHER,
    "method": {"name": "reviewkd", "weight": 1.0, "warmup_epochs": 5},
}
TOLERANT_CHAIN = {
    "experiment": {"name": "digits_chain_tolerant_resnet8"},
    "chain": {"notation": "D(0.6, 0.6)", "generations": 2, "patriarch": {"scores": "probabilities"}},
}
STRICT_CHAIN = {
    "experiment": {"name": "digits_chain_strict_resnet8"},
    "chain": {"notation": "D(1.0, 0.6)", "generations": 2},
}
MARKER = DEMO_MARKER  # the name tests and the detection demo know it by


@dataclass(frozen=True)
class DemoStep:
    """One experiment (or chain) of the demo, as run, and the file in configs/digits/ that holds it."""

    label: str
    file: str
    raw: dict
    group: str  # teacher | alone | method | tolerant | strict
    chain: bool = False

    @property
    def name(self) -> str:
        return self.raw["experiment"]["name"] if self.chain else self.raw["name"]


def demo_steps(output_dir: str, scale: float = 1.0, device: str = "auto", progress: bool = True) -> list[DemoStep]:
    """Every experiment of the demo in order (the teacher first), with output folder, device,
    progress bars and `scale` x the epochs applied."""
    from kdlab.config import deep_merge  # lazy: keeps `kdlab --help` fast (pydantic, torch)
    from kdlab.engine.run_folder import RunFolder  # lazy: as above

    teacher = deep_merge(TEACHER, {})
    student = deep_merge(teacher, STUDENT_ALONE)
    checkpoint = str(RunFolder(Path(output_dir) / TEACHER["name"]).checkpoint("best"))
    run = {"output_dir": output_dir, "train": {"device": device, "progress": progress, "tensorboard": False}}

    def experiment(raw: dict) -> dict:
        raw = deep_merge(raw, run)
        raw["train"]["epochs"] = max(1, round(raw["train"]["epochs"] * scale))
        if raw.get("teacher"):
            raw["teacher"]["checkpoint"] = checkpoint
        return raw

    def chain(raw: dict) -> dict:
        return {"experiment": experiment(deep_merge(student, raw["experiment"])), "chain": deep_merge(raw["chain"], {})}

    return [
        DemoStep("teacher (resnet20, all digits)", "teacher.yaml", experiment(teacher), "teacher"),
        DemoStep("student alone (resnet8, 200 digits)", "student_alone.yaml", experiment(student), "alone"),
        DemoStep("KD", "kd.yaml", experiment(deep_merge(student, KD)), "method"),
        DemoStep("DKD", "dkd.yaml", experiment(deep_merge(student, DKD)), "method"),
        DemoStep("ReviewKD", "reviewkd.yaml", experiment(deep_merge(student, REVIEWKD)), "method"),
        DemoStep("tolerant", "chain_tolerant.yaml", chain(TOLERANT_CHAIN), "tolerant", chain=True),
        DemoStep("strict", "chain_strict.yaml", chain(STRICT_CHAIN), "strict", chain=True),
    ]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help=HELP, description=DESCRIPTION + "\n\nWith --task detection:\n" + DETECTION_DESCRIPTION,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", default="runs/demo", help="where the runs are written (default runs/demo)")
    p.add_argument("--figure", default=None, metavar="PNG",
                   help="where the figure is written (default <output-dir>/demo.png)")
    p.add_argument("--scale", type=float, default=1.0,
                   help="multiply every run's epochs (e.g. 0.1 for a smoke test)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--task", choices=["classification", "detection"], default="classification",
                   help="detection: the detection demo on generated shapes (kdlab/commands/_demo_detection.py)")
    add_exec_args(p)
    p.set_defaults(func=run)


@dataclass
class Row:
    """A run of the demo as the table and the figure show it; `result` is None when it did not
    finish (`status` says why: failed, skipped, ...)."""

    label: str
    method: str
    result: dict | None
    history: list
    seconds: float
    group: str  # teacher | alone | method | tolerant | strict (picks the figure panel and colour)
    generation: int = 0
    status: str = "done"

    @property
    def top1(self) -> float:
        return float(self.result["last"]["top1"]) if self.result else float("nan")


def _read_run(run_dir: Path) -> tuple[dict, list]:
    from kdlab.analysis.curves import read_metrics  # lazy: keeps `kdlab --help` fast (matplotlib)
    from kdlab.engine.run_folder import RunFolder  # lazy: as above

    result = RunFolder(run_dir).read_result()
    return result, read_metrics(run_dir)


def _epoch_seconds(history: list) -> float:
    return sum(float(r.get("time_s", 0.0)) for r in history)


def demo_plan(steps: list[DemoStep], overwrite: bool, log_dir: Path) -> tuple[Any, list[Any]]:
    """The demo's plan (the runs in the order of `steps`: teacher first) and its claimed chains
    (hand each back with `finish_chain`). The distilled students wait for the teacher, each
    chain's generations for the one before; the student alone and the patriarchs for nothing."""
    # lazy: keeps `kdlab --help` fast (torch, pydantic)
    from kdlab.config import load_config
    from kdlab.generations.config import load_chain
    from kdlab.generations.runner import finish_chain, prepare_chain
    from kdlab.plan import Job, Plan

    plan = Plan("kdlab demo", log_dir=log_dir)
    chains: list[Any] = []
    teacher = ""
    try:
        for step in steps:
            if step.chain:
                chain = load_chain(data=step.raw)
                chains.append(chain)
                for job in prepare_chain(chain, overwrite=overwrite):
                    plan.add(job)
                continue
            cfg = load_config(data=step.raw)
            after = (teacher,) if cfg.teacher is not None else ()
            job = plan.add(Job.train(cfg, after=after, resume=False, overwrite=overwrite))
            if step.group == "teacher":
                teacher = job.name
    except BaseException:
        for chain in chains:
            finish_chain(chain, report=False)
        raise
    return plan, chains


def demo_rows(steps: list[DemoStep], report: Any) -> list[Row]:
    """The table's and the figure's rows, read from the run folders: one per run of a step,
    one per generation of a chain; a run that did not finish keeps its place with its status."""
    from kdlab.config import load_config  # lazy: keeps `kdlab --help` fast
    from kdlab.generations.config import load_chain

    rows: list[Row] = []

    def row(label: str, method: str, run_dir: Path, group: str, generation: int = 0) -> Row:
        name = str(run_dir)
        if not report.ok(name):
            status = report.outcomes[name].status if name in report.outcomes else "not run"
            return Row(label, method, None, [], 0.0, group, generation, status)
        result, history = _read_run(run_dir)
        return Row(label, method, result, history, _epoch_seconds(history), group, generation)

    for step in steps:
        if step.chain:
            chain = load_chain(data=step.raw)
            for m, cfg in enumerate(chain.configs):
                what = "patriarch" if m == 0 else f"generation {m}"
                rows.append(row(f"{step.label} {chain.settings.label}: {what}", cfg.method.name, chain.run_dir(m),
                                step.group, m))
        else:
            cfg = load_config(data=step.raw)
            rows.append(row(step.label, cfg.method.name, Path(cfg.output_dir) / cfg.name, step.group))
    return rows


def run(args: argparse.Namespace) -> int:
    if getattr(args, "task", "classification") == "detection":
        # lazy: keeps `kdlab --help` fast (the detection demo imports torchvision's detectors)
        from kdlab.commands._demo_detection import run as run_detection

        return run_detection(args)

    # lazy: keeps `kdlab --help` fast (torch, pydantic, matplotlib load only when the demo runs)
    from kdlab.generations.runner import finish_chain
    from kdlab.plan import execute
    from kdlab.text_table import print_table

    t0 = time.perf_counter()
    options = exec_options(args)  # bad flags fail before anything is written
    output_dir = Path(args.output_dir)
    # Progress bars only in this process's terminal (--jobs N: the runs write to their logs).
    steps = demo_steps(str(output_dir), args.scale, args.device, sys.stderr.isatty() and options.jobs == 1)
    overwrite = earlier_demo(output_dir, [s.name for s in steps])
    if overwrite:
        print(f"replacing the earlier demo's runs in {output_dir}/ (overwrite)", file=sys.stderr, flush=True)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / MARKER).write_text(json.dumps({"runs": [s.name for s in steps], "scale": args.scale}) + "\n")
    plan, chains = demo_plan(steps, overwrite, output_dir / "logs")
    for step in steps:
        epochs = step.raw["experiment"]["train"]["epochs"] if step.chain else step.raw["train"]["epochs"]
        runs = f"patriarch + {step.raw['chain']['generations']} generations, " if step.chain else ""
        print(f"== {step.label}: {runs}{epochs} epoch(s){' each' if step.chain else ''}", file=sys.stderr)
    print(f"== {len(plan.jobs)} runs, {options.jobs} at once", file=sys.stderr, flush=True)
    try:
        report = execute(plan, options)
    finally:
        for chain in chains:
            finish_chain(chain, report=False)
    if report.failed:
        print(report.table(), end="")
    rows = demo_rows(steps, report)
    figure = Path(args.figure) if args.figure else output_dir / "demo.png"
    drawn = draw_figure(rows, figure)

    alone = next((r for r in rows if r.group == "alone" and r.result), None)
    table = []
    for row in rows:
        if row.result is None:
            table.append([row.label, row.method, row.status, "", "", ""])
            continue
        gain = "" if row.group == "teacher" or alone is None else f"{row.top1 - alone.top1:+.2f}"
        table.append([row.label, row.method, row.result["last"]["top1"], row.result["best"]["top1"], gain,
                      f"{row.seconds:.1f}"])
    print()
    print_table(["run", "method", "top-1 last", "top-1 best", "gain (last)", "train s"], table)
    versus = f"the student alone's ({alone.top1:.2f})" if alone else "the student alone's (which did not finish)"
    print(f"\ngain: last-epoch top-1 minus {versus}; train s: the run's epochs "
          f"(training and evaluation). {time.perf_counter() - t0:.0f} s in all.")
    print(f"figure: {figure}" if drawn else "figure: not drawn (no run finished)")
    print(f"runs: {output_dir}/ (more curves: kdlab plot {output_dir})")
    if report.failed:
        print(f"\n{len(report.failed)} run(s) did not finish (the table of runs above says why); running the demo "
              "again replaces all its runs", file=sys.stderr)
    return report.exit_code()


def draw_figure(rows: list[Row], path: Path) -> Path | None:
    """Curves of the single-teacher methods, curves of the two chains, bars of the last top-1, of
    the runs that finished (None, and no file, when none did)."""
    from kdlab.analysis.overview import Curve, Panel, plot_overview  # lazy: keeps `kdlab --help` fast

    shades = {"tolerant": ["#fdae6b", "#e6550d", "#a63603"], "strict": ["#9ecae1", "#3182bd", "#08519c"]}
    methods = iter(["C2", "C4", "C3"])
    curves = []
    for row in rows:  # every row gets its colour, finished or not: a failed run does not recolour the others
        if row.group == "teacher":
            curve = Curve("teacher (resnet20, all digits)", row.history, "0.55", ":")
        elif row.group == "alone":
            curve = Curve("student alone", row.history, "k")
        elif row.group == "method":
            curve = Curve(row.label, row.history, next(methods))
        else:  # a generation of a chain: one hue per chain, darker and dashed as m grows
            m = min(row.generation, 2)
            curve = Curve(f"{row.group} gen {row.generation}", row.history, shades[row.group][m], ["-", "--", ":"][m])
        curves.append(curve)
    shown = [(c, r) for c, r in zip(curves, rows) if r.result is not None]
    if not shown:
        return None
    alone = next((r for r in rows if r.group == "alone" and r.result is not None), None)
    # Wide and underneath: the strict patriarch (cross-entropy, the same seed) retraces it.
    reference = [Curve("student alone", alone.history, "k", width=4.0)] if alone else []
    panels = [
        Panel("one teacher, three methods (resnet20 -> resnet8, 200 digits)",
              [c for c, r in shown if r.group in ("teacher", "alone", "method")]),
        Panel("generations (resnet8 -> resnet8, 200 digits)",
              reference + [c for c, r in shown if r.group in ("tolerant", "strict")]),
    ]
    bars = [(r.label, r.top1, c.color) for c, r in shown]
    return plot_overview(panels, bars, path, reference=("student alone", alone.top1) if alone else None,
                         title="kdlab demo on the bundled digits: validation top-1")
