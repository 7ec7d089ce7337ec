"""`kdlab generations CONFIG [key=value ...]`: a patriarch and N generations in one command."""
from __future__ import annotations

import argparse
import shlex
import sys

from kdlab.commands._common import add_config_args, add_exec_args, add_run_folder_args, exec_options
from kdlab.text_table import print_table

HELP = "train a chain of generations from a (tolerant) patriarch, with a per-generation report"
DESCRIPTION = """\
Training in generations (Yang et al., arXiv 1805.05551): generation 0, the patriarch, trains
alone (strict CE, or tolerant: eta*CE + (1-eta)*top-score difference, or label smoothing, or
the confidence penalty); generation m >= 1 trains with (1-lam)*CE + lam*tau^2*KL(teacher||student)
from generation m-1 of the same architecture. The config has an `experiment:` block (model,
data, optim, schedule, train) and a `chain:` block (notation "D(eta, lam)", generations, and
`patriarch:`, the tolerant method's config of generation 0).

Writes <output_dir>/<experiment.name>/gen0..genN/ (normal run folders), chain.yaml, and
generations.md / generations.json: top-1/top-5 (last and best epoch) per generation, the
teacher's and the generation's own mean target probability, secondary-information metrics,
and the accuracy of ensembles of the first g generations.

A chain folder that already holds generations is refused untouched. After an interruption or
a failed generation (the later ones are then skipped; the table of generations says why, and
the command exits 1), run it again with --resume: finished generations are kept and the
interrupted one continues from its last.pt. --overwrite deletes the earlier chain first.
Generation m needs generation m-1, so one chain trains one generation at a time; --jobs 1
(the default) trains it in this process, --jobs N in a worker process of its own (with its
log in <output_dir>/logs/), --launcher slurm as Slurm jobs. Overrides: experiment keys may
drop the 'experiment.' prefix (train.epochs=2, name=...); chain keys need 'chain.'
(chain.generations=2, chain.patriarch.k=3).
"""
EPILOG = """\
examples:
  kdlab generations configs/cifar100/generations/resnet56_d06_06.yaml data.root=/data/cifar100
  kdlab generations configs/cifar10/generations/resnet8_d06_06.yaml chain.generations=2
  kdlab generations CONFIG --dry-run      # validate and show the plan, train nothing
  kdlab generations CONFIG --resume       # continue an interrupted (or failed) chain
  kdlab generations CONFIG --jobs 2       # each generation in a process of its own, logged to <output_dir>/logs/
  kdlab generations CONFIG --report       # (re)write the report from finished generations
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generations", help=HELP, description=DESCRIPTION, epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="validate the chain and print its plan; train nothing")
    mode.add_argument("--report", action="store_true",
                      help="only evaluate the finished generations and write the report")
    add_run_folder_args(p, "continue the chain in its folder: finished generations are kept, an "
                           "interrupted one continues from its last.pt")
    add_exec_args(p)
    p.set_defaults(func=run)


def print_plan(chain) -> None:
    from kdlab.generations.report import describe_generation  # lazy: keeps `kdlab --help` fast

    print(f"{chain.name}: {chain.settings.label}  ->  {chain.root}")
    rows = []
    for m, cfg in enumerate(chain.configs):
        teacher = cfg.teacher.checkpoint if cfg.teacher is not None else "-"
        rows.append([str(m), describe_generation(chain, m), cfg.method.name, str(cfg.train.seed),
                     str(cfg.train.epochs), teacher])
    print_table(["gen", "loss", "method", "seed", "epochs", "teacher"], rows)


def print_report(report: dict) -> None:
    from kdlab.generations.report import ensemble_table, generation_table  # lazy: keeps `kdlab --help` fast

    print(f"{report['chain']}: {report['label']}  ({report['finished']}/{report['planned']} generations, "
          f"teacher = {report['settings']['checkpoint']}.pt of the previous generation)")
    print_table(*generation_table(report))
    print()
    print_table(*ensemble_table(report))
    print(f"report: {report['root']}/generations.md (and .json)")


def run(args: argparse.Namespace) -> int:
    # lazy: keeps `kdlab --help` fast (torch, pydantic and the rest load only when the command runs)
    from kdlab.engine.run_folder import is_main_process
    from kdlab.generations.config import load_chain
    from kdlab.generations.runner import chain_refusal, check_exec_options, train_chain

    chain = load_chain(args.config, args.overrides)
    if args.dry_run:
        print_plan(chain)
        problem = chain_refusal(chain, resume=args.resume, overwrite=args.overwrite)
        if problem:
            print(f"\ndry run: would refuse: {problem}", file=sys.stderr)
            return 1
        return 0
    if args.report:
        from kdlab.generations.report import write_report  # lazy: as above

        report = write_report(chain)
        if report is not None:
            print_report(report)
        return 0
    options = exec_options(args)  # bad flags fail before the chain is claimed
    check_exec_options(options)
    main = is_main_process()  # under torchrun only rank 0 prints
    done, report = train_chain(chain, resume=args.resume, overwrite=args.overwrite, options=options, table=main)
    if report is not None:
        print()
        print_report(report)
    elif main:
        again = shlex.join(["kdlab", "generations", args.config, *args.overrides])
        if done.failed:
            print(f"\nonce the cause is fixed, continue the chain (finished generations are kept): {again} --resume",
                  file=sys.stderr)
        else:  # submitted to Slurm: the generations train later
            print(f"\nonce the generations finish, write the report: {again} --report", file=sys.stderr)
    return done.exit_code()
