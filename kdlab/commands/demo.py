"""`kdlab demo`: every method kdlab implements, end to end on the bundled digits, no download."""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from kdlab.commands._common import DEMO_MARKER, earlier_demo
from kdlab.commands._demo_detection import DESCRIPTION as DETECTION_DESCRIPTION
from kdlab.errors import KDLabError

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
    p.set_defaults(func=run)


@dataclass
class Row:
    """A finished run as the table and the figure show it."""

    label: str
    method: str
    result: dict
    history: list
    seconds: float
    group: str  # teacher | alone | method | tolerant | strict (picks the figure panel and colour)
    generation: int = 0


def _read_run(run_dir: Path) -> tuple[dict, list]:
    from kdlab.analysis.curves import read_metrics  # lazy: keeps `kdlab --help` fast (matplotlib)
    from kdlab.engine.run_folder import RunFolder  # lazy: as above

    result = RunFolder(run_dir).read_result()
    return result, read_metrics(run_dir)


def _epoch_seconds(history: list) -> float:
    return sum(float(r.get("time_s", 0.0)) for r in history)


def run(args: argparse.Namespace) -> int:
    if getattr(args, "task", "classification") == "detection":
        # lazy: keeps `kdlab --help` fast (the detection demo imports torchvision's detectors)
        from kdlab.commands._demo_detection import run as run_detection

        return run_detection(args)

    # lazy: keeps `kdlab --help` fast (torch, pydantic, matplotlib load only when the demo runs)
    from kdlab.config import load_config
    from kdlab.engine.launch import train_run
    from kdlab.generations.config import load_chain
    from kdlab.generations.runner import run_chain
    from kdlab.text_table import print_table

    t0 = time.perf_counter()
    output_dir = Path(args.output_dir)
    steps = demo_steps(str(output_dir), args.scale, args.device, sys.stderr.isatty())
    overwrite = earlier_demo(output_dir, [s.name for s in steps])
    if overwrite:
        print(f"replacing the earlier demo's runs in {output_dir}/ (overwrite)", file=sys.stderr, flush=True)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / MARKER).write_text(json.dumps({"runs": [s.name for s in steps], "scale": args.scale}) + "\n")
    rows: list[Row] = []
    for step in steps:
        if step.chain:
            chain = load_chain(data=step.raw)
            print(f"== {step.label} chain {chain.settings.label}: patriarch + {chain.settings.generations} "
                  f"generations, {chain.configs[0].train.epochs} epoch(s) each", file=sys.stderr, flush=True)
            run_chain(chain, overwrite=overwrite, report=False)
            for m, cfg in enumerate(chain.configs):
                result, history = _read_run(chain.run_dir(m))
                what = "patriarch" if m == 0 else f"generation {m}"
                rows.append(Row(f"{step.label} {chain.settings.label}: {what}", cfg.method.name, result, history,
                                _epoch_seconds(history), step.group, m))
        else:
            cfg = load_config(data=step.raw)
            print(f"== {step.label}: {cfg.train.epochs} epoch(s)", file=sys.stderr, flush=True)
            done, _ = train_run(cfg, overwrite=overwrite)
            rows.append(Row(step.label, cfg.method.name, done.to_json(), done.history, _epoch_seconds(done.history),
                            step.group))
    figure = Path(args.figure) if args.figure else output_dir / "demo.png"
    draw_figure(rows, figure)

    alone = next(r for r in rows if r.group == "alone").result["last"]["top1"]
    table = []
    for row in rows:
        gain = "" if row.group == "teacher" else f"{row.result['last']['top1'] - alone:+.2f}"
        table.append([row.label, row.method, row.result["last"]["top1"], row.result["best"]["top1"], gain,
                      f"{row.seconds:.1f}"])
    print()
    print_table(["run", "method", "top-1 last", "top-1 best", "gain (last)", "train s"], table)
    print(f"\ngain: last-epoch top-1 minus the student alone's ({alone:.2f}); train s: the run's epochs "
          f"(training and evaluation). {time.perf_counter() - t0:.0f} s in all.")
    print(f"figure: {figure}")
    print(f"runs: {output_dir}/ (more curves: kdlab plot {output_dir})")
    return 0


def draw_figure(rows: list[Row], path: Path) -> Path:
    """Curves of the single-teacher methods, curves of the two chains, bars of the last top-1."""
    from kdlab.analysis.overview import Curve, Panel, plot_overview  # lazy: keeps `kdlab --help` fast

    shades = {"tolerant": ["#fdae6b", "#e6550d", "#a63603"], "strict": ["#9ecae1", "#3182bd", "#08519c"]}
    methods = iter(["C2", "C4", "C3"])
    colors, curves = [], []
    for row in rows:
        if row.group == "teacher":
            curve = Curve("teacher (resnet20, all digits)", row.history, "0.55", ":")
        elif row.group == "alone":
            curve = Curve("student alone", row.history, "k")
        elif row.group == "method":
            curve = Curve(row.label, row.history, next(methods))
        else:  # a generation of a chain: one hue per chain, darker and dashed as m grows
            m = min(row.generation, 2)
            curve = Curve(f"{row.group} gen {row.generation}", row.history, shades[row.group][m], ["-", "--", ":"][m])
        colors.append(curve.color)
        curves.append(curve)
    alone = next(r for r in rows if r.group == "alone")
    # Wide and underneath: the strict patriarch (cross-entropy, the same seed) retraces it.
    reference = Curve("student alone", alone.history, "k", width=4.0)
    panels = [
        Panel("one teacher, three methods (resnet20 -> resnet8, 200 digits)",
              [c for c, r in zip(curves, rows) if r.group in ("teacher", "alone", "method")]),
        Panel("generations (resnet8 -> resnet8, 200 digits)",
              [reference] + [c for c, r in zip(curves, rows) if r.group in ("tolerant", "strict")]),
    ]
    bars = [(r.label, float(r.result["last"]["top1"]), c) for r, c in zip(rows, colors)]
    return plot_overview(panels, bars, path, reference=("student alone", float(alone.result["last"]["top1"])),
                         title="kdlab demo on the bundled digits: validation top-1")
