"""`kdlab analyze --teacher CKPT --student CKPT --out DIR`: a teacher-student report."""
from __future__ import annotations

import argparse

HELP = "teacher-student report: per-sample TCKD/NCKD, class-correlation difference, calibration"
DESCRIPTION = """\
Evaluate a teacher and a student on the dataset of the student's config and write a report
folder: per-sample TCKD, NCKD and target confidences (histograms, CSV, summary statistics),
the DKD paper's class-correlation difference heatmap (|M_S - M_T| / 3, diagonal 0) with its
max and mean, reliability diagrams and ECE of both models, report.md, report.html and
metrics.json. Open report.html (or report.md) to read it.

examples:
  kdlab analyze --teacher runs/teacher_resnet32x4/best.pt \\
      --student runs/dkd_resnet32x4_resnet8x4/best.pt --out reports/dkd data.root=/data/cifar100
  kdlab analyze --teacher T.pt --student S.pt --out reports/x --split val train --max-samples 2000
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("analyze", help=HELP, description=DESCRIPTION,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", required=True, metavar="CKPT", help="teacher checkpoint (kdlab train)")
    p.add_argument("--student", required=True, metavar="CKPT", help="student checkpoint (kdlab train)")
    p.add_argument("--out", required=True, metavar="DIR", help="report folder (created)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="overrides of the student's stored config, e.g. data.root=/data/cifar100")
    p.add_argument("--split", nargs="+", default=["val"], choices=["val", "train"],
                   help="which splits get the per-sample analysis (default: val; train uses un-augmented images)")
    p.add_argument("--temperature", type=float, default=None,
                   help="temperature of the per-sample TCKD/NCKD (default: the student's method.temperature, else 4)")
    p.add_argument("--bins", type=int, default=15, help="confidence bins of the reliability diagrams")
    p.add_argument("--max-samples", type=int, default=None, help="use only the first N samples of each split")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # lazy: keeps `kdlab --help` fast (torch, pydantic and the rest load only when the command runs)
    from kdlab.analysis.report import analyze

    m = analyze(args.teacher, args.student, args.out, overrides=args.overrides, splits=args.split,
                temperature=args.temperature, bins=args.bins, device=args.device, max_samples=args.max_samples)
    val = m["splits"].get("val")
    if val:
        corr, cal = val["correlation_diff"], val["calibration"]
        print(f"val: teacher top-1 {val['teacher_top1']:.2f}  student top-1 {val['student_top1']:.2f}  "
              f"agreement {val['agreement']:.2f}%")
        print(f"class-correlation difference: max {corr['max']:.3f}  mean {corr['mean']:.3f}")
        print(f"ECE: teacher {100 * cal['teacher']['ece']:.2f}%  student {100 * cal['student']['ece']:.2f}%")
        s = val["summary"]
        print(f"per-sample mean TCKD {s['tckd']['mean']:.4f}  NCKD {s['nckd']['mean']:.4f}  "
              f"teacher p_t {s['teacher_pt']['mean']:.4f}")
    print(f"report: {m['report']} (and report.html beside it)")
    return 0
