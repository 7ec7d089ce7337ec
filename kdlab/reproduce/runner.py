"""`kdlab reproduce ROW...`: train the rows' configs and compare with the published numbers.

For the chosen rows (plus the baseline rows that `top1_gain` rows are measured against):

1. *Plan, before any training*: load each row's config with the command-line overrides,
   resolve its teacher (the row's `teacher_config` run's `last.pt` or `best.pt`, whichever the
   row's config names: reused when present, trained first otherwise; or the config's own
   `teacher.weights`/`teacher.checkpoint`), and
   build each dataset once (its task's `check_data`). A missing config, dataset, teacher file, or a
   run folder holding another config becomes that row's one-line problem; the other rows go on.
   A row's run folder that already holds a run is refused untouched unless `resume` (a
   finished run of the same config is reused, an interrupted one continues from `last.pt`)
   or `overwrite` (its files are deleted before it trains again); a folder holding another
   config is continued by neither. A finished teacher of the same config is always reused
   (it is only read).
2. *Run*: every row's runs are jobs of ONE `kdlab.plan.Plan`: each teacher to train is one job
   (a teacher shared by several rows trains once), each seed of a row a job waiting for its
   teacher, a chain row one job per generation. The executor runs them one after another, N at
   once (`--jobs`) or on Slurm (`--launcher slurm`); a failed job fails its own rows only
   (and skips the jobs waiting for it), the other rows go on.
3. *Compare*: measured last-epoch and best-epoch values against the published number, with
   the difference (measured - published), mean over seeds with `seeds > 1`.

Overrides: `method.*`, `teacher.*` and `name` apply to the row's config only; every other key
(data.root, train.epochs, output_dir, train.device, ...) to the teacher's config as well.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from kdlab.config.loader import load_config, split_overrides
from kdlab.engine.result import RunResult
from kdlab.engine.run_folder import RunFolder
from kdlab.engine.tasks import task_for
from kdlab.errors import ConfigError, DataError, KDLabError
from kdlab.experiments.results import mean_std
from kdlab.experiments.seeds import seed_configs
from kdlab.generations import runner as chains
from kdlab.generations.config import is_chain_file, load_chain
from kdlab.plan import ExecOptions, Job, Plan, PlanReport
from kdlab.plan.jobs import missing_teacher_files
from kdlab.plan.executor import run_plan_cli
from kdlab.reproduce.table import Row, load_rows, repo_root

RETRY = "kdlab reproduce ROW"


def folder_problem(cfg: Any, *, resume: bool, overwrite: bool, what: str = "run") -> str | None:
    """Why `cfg` may not train into its run folder with these flags (None when it may): the
    folder holds a run and neither flag was given, or it holds another config (which `resume`
    cannot continue and reuse would misreport; `overwrite` replaces it)."""
    folder = RunFolder.of(cfg)
    if not folder.holds_run() or overwrite:
        return folder.refusal(resume=resume, overwrite=overwrite, what=what, retry=RETRY)
    diffs = folder.differences(cfg)
    if diffs:
        return (f"{folder.path} already holds a run of another config ({'; '.join(diffs[:3])}); "
                f"train into another folder (name=<new name> or output_dir=<folder>) or replace it: "
                f"{RETRY} --overwrite")
    return folder.refusal(resume=resume, overwrite=overwrite, what=what, retry=RETRY)


@dataclass
class RowPlan:
    """What `reproduce` will do for one row, decided before any training."""

    row: Row
    problem: str | None = None
    configs: list[Any] = field(default_factory=list)  # one per seed (train rows)
    chain: Any = None  # a generations Chain (chain rows)
    teacher_cfg: Any = None
    teacher_action: str = "-"  # -, reuse, train, file
    is_dependency: bool = False
    resume: bool = False  # continue / reuse what the run folders hold
    overwrite: bool = False  # delete what they hold before training
    jobs: list[str] = field(default_factory=list)  # names of its jobs in the plan (`build_plan`)

    @property
    def run_dirs(self) -> list[Path]:
        if self.chain is not None:
            return [self.chain.root]
        return [Path(c.output_dir) / c.name for c in self.configs]

    @property
    def status(self) -> str:
        if self.problem:
            return "cannot run"
        dirs = self.run_dirs
        if dirs and not self.overwrite and all(RunFolder(d).is_finished() for d in dirs) and self.chain is None:
            return "done (reused)"
        return "to train" + (" (teacher first)" if self.teacher_action == "train" else "")


def _dataset_problem(cfg: Any, cache: dict[str, str | None]) -> str | None:
    """Why the data of `cfg` cannot be built (None when it can), asked of its task once per dataset."""
    data_cfg = cfg.data
    key = json.dumps([cfg.task, data_cfg.name, data_cfg.root, data_cfg.train_split, data_cfg.val_split,
                      data_cfg.transform, cfg.detection.model_dump(mode="json") if cfg.detection is not None else None])
    if key not in cache:
        try:
            task_for(cfg).check_data(cfg)
            cache[key] = None
        except (DataError, ConfigError) as exc:
            cache[key] = f"dataset {data_cfg.name!r} is not available: {exc}"
    return cache[key]


def plan_row(row: Row, overrides: Sequence[str], root: Path, seeds: int, data_cache: dict, *,
             resume: bool = False, overwrite: bool = False) -> RowPlan:
    """Load and check everything a row needs; never trains. Problems become `RowPlan.problem`."""
    plan = RowPlan(row, resume=resume, overwrite=overwrite)
    if not row.config:
        plan.problem = "kdlab has no config for this row (yet)"
        return plan
    path = root / row.config
    if not path.is_file():
        plan.problem = f"config {row.config} does not exist (yet)"
        return plan
    shared, own = split_overrides(overrides)
    try:
        if is_chain_file(path):
            plan.chain = load_chain(path, list(shared) + list(own))
            plan.problem = (chains.chain_refusal(plan.chain, resume=resume, overwrite=overwrite)
                            or _dataset_problem(plan.chain.configs[0], data_cache))
            return plan
        teacher_override: list[str] = []
        if row.teacher_config and not any(o.startswith("teacher.checkpoint=") for o in own):
            tpath = root / row.teacher_config
            if not tpath.is_file():
                plan.problem = f"teacher config {row.teacher_config} does not exist (yet)"
                return plan
            plan.teacher_cfg = load_config(tpath, shared)
            t_dir = Path(plan.teacher_cfg.output_dir) / plan.teacher_cfg.name
            # The file the row's config names: last.pt (DKD/KD, the final epoch as the DKD authors
            # distil from) or best.pt (ReviewKD's official scripts; also when it names neither).
            named = load_config(path, list(shared) + list(own)).teacher
            t_folder = RunFolder(t_dir)
            t_file = t_folder.teacher_checkpoint(named.checkpoint if named is not None else None)
            teacher_override = [f"teacher.checkpoint={t_file}", "teacher.weights=null"]
            reusable = t_file.is_file() and t_folder.is_finished() and not t_folder.differences(plan.teacher_cfg)
            plan.teacher_action = "reuse" if reusable else "train"
            conflict = None if reusable else folder_problem(plan.teacher_cfg, resume=resume, overwrite=overwrite,
                                                             what="teacher run")
            if conflict:
                plan.problem = "teacher: " + conflict
                return plan
        cfg = load_config(path, list(shared) + list(own) + teacher_override)
        plan.configs = seed_configs(cfg, seeds) if seeds > 1 else [cfg]
        problems: list[str | None] = [_dataset_problem(cfg, data_cache)]
        if plan.teacher_cfg is not None:
            problems.append(_dataset_problem(plan.teacher_cfg, data_cache))
        if cfg.teacher is not None and plan.teacher_cfg is None:
            plan.teacher_action = "file"
            problems += [f"{missing}; put the file there or pass {missing.split()[0]}=PATH"
                         for missing in missing_teacher_files(cfg)]
        problems += [folder_problem(c, resume=resume, overwrite=overwrite) for c in plan.configs]
        unique = [p for i, p in enumerate(problems) if p and p not in problems[:i]]
        plan.problem = "; ".join(unique) or None
    except KDLabError as exc:
        plan.problem = f"{type(exc).__name__}: {exc}"
    return plan


def plan_rows(rows: Sequence[Row], overrides: Sequence[str] = (), *, root: str | Path | None = None,
              seeds: int = 1, all_rows: Sequence[Row] | None = None, resume: bool = False,
              overwrite: bool = False) -> list[RowPlan]:
    """Plans for `rows` and, first, for the baseline rows they are measured against.
    `resume` / `overwrite`: what to do with run folders that already hold runs (see `folder_problem`).
    A row that would train into a folder an earlier row trains with another config cannot run
    (`refuse_shared_folders`)."""
    table = {r.id: r for r in (all_rows or load_rows())}
    wanted = [r.id for r in rows]
    ordered: list[tuple[Row, bool]] = []
    for r in rows:
        if r.baseline and r.baseline not in wanted and all(o[0].id != r.baseline for o in ordered):
            ordered.append((table[r.baseline], True))
    ordered += [(r, False) for r in rows]
    cache: dict[str, str | None] = {}
    base = repo_root(root)
    plans = []
    for row, dep in ordered:
        p = plan_row(row, overrides, base, seeds, cache, resume=resume, overwrite=overwrite)
        p.is_dependency = dep
        plans.append(p)
    refuse_shared_folders(plans)
    return plans


# ------------------------------------------------------------------------------------ running
@dataclass
class Measured:
    """Mean over seeds (or the best generation of a chain) of the run results: the task's
    metrics (`RunResult.last`/`best`: top1/top5, bbox_ap/segm_ap, ...) by name."""

    last: dict[str, float]
    best: dict[str, float]
    n: int
    std_last: dict[str, float] = field(default_factory=dict)
    run_dirs: list[str] = field(default_factory=list)

    @classmethod
    def mean_of(cls, results: Sequence[RunResult], run_dirs: list[str]) -> "Measured":
        """Mean and sample std of every metric over `results` (one per seed)."""
        names = list(dict.fromkeys(m for r in results for m in (*r.last, *r.best)))
        last = {m: mean_std([r.last.get(m, math.nan) for r in results]) for m in names}
        best = {m: mean_std([r.best.get(m, math.nan) for r in results]) for m in names}
        return cls({m: v[0] for m, v in last.items()}, {m: v[0] for m, v in best.items()}, len(results),
                   {m: v[1] for m, v in last.items()}, run_dirs)


def base_metric(metric: str) -> str:
    """The measured metric a row's metric is computed from: `top1_error` -> `top1`,
    `top1_gain_best_generation` -> `top1`, `bbox_ap` -> `bbox_ap`."""
    return metric.removesuffix("_best_generation").removesuffix("_error").removesuffix("_gain")


def metric_values(row: Row, m: Measured, baseline: Measured | None = None) -> tuple[float, float]:
    """(last-epoch, best-epoch) value of the row's metric from a measurement: a metric the
    run's task reports, its error (100 - value) or its gain over the baseline row."""
    metric, base = row.metric.removesuffix("_best_generation"), base_metric(row.metric)
    if base not in m.last:
        raise KDLabError(f"{row.id}: metric {row.metric!r} needs {base!r}, which its runs do not report "
                         f"(they report {', '.join(m.last) or 'nothing'}); fix the row's metric in rows.yaml")
    last, best = m.last[base], m.best.get(base, math.nan)
    if metric.endswith("_error"):
        return 100.0 - last, 100.0 - best
    if metric.endswith("_gain"):
        if baseline is None:
            return math.nan, math.nan
        return last - baseline.last.get(base, math.nan), best - baseline.best.get(base, math.nan)
    return last, best


@dataclass
class Outcome:
    row: Row
    status: str
    last: float = math.nan
    best: float = math.nan
    n: int = 0
    run_dirs: list[str] = field(default_factory=list)
    problem: str | None = None
    is_dependency: bool = False

    def diffs(self) -> tuple[float, float]:
        pub = self.row.published
        if pub is None:
            return math.nan, math.nan
        return self.last - pub, self.best - pub

    def to_json(self) -> dict[str, Any]:
        # An undefined value (no measurement, an AP without detections) is null: JSON has no NaN.
        last, best, d_last, d_best = (None if math.isnan(v) else v for v in (self.last, self.best, *self.diffs()))
        return {"id": self.row.id, "metric": self.row.metric, "published": self.row.published, "status": self.status,
                "measured_last": last, "measured_best": best, "diff_last": d_last, "diff_best": d_best,
                "seeds": self.n, "run_dirs": self.run_dirs, "problem": self.problem, "config": self.row.config,
                "baseline_row": self.is_dependency}


def _row_jobs(p: RowPlan) -> tuple[Job | None, list[Job]]:
    """(the job training the row's teacher, or None; the jobs of its own runs, each seed waiting
    for that teacher). The teacher job carries the row's `resume`/`overwrite` like its runs
    (a finished teacher of the same config never gets one: `plan_row` reuses it)."""
    flags = {"resume": p.resume, "overwrite": p.overwrite, "retry": RETRY}
    teacher = None
    if p.teacher_cfg is not None and p.teacher_action == "train":
        teacher = Job.train(p.teacher_cfg, what="teacher run", **flags)
    after = [teacher.name] if teacher is not None else []
    return teacher, [Job.train(c, after=after, **flags) for c in p.configs]


def refuse_shared_folders(plans: Sequence[RowPlan]) -> None:
    """Give a row whose run folder an earlier row trains with another config that `problem`
    (the same config is one shared job: a teacher of several rows, a row that is another's
    teacher)."""
    taken: dict[str, tuple[Job, str]] = {}
    for p in plans:
        if p.problem or p.chain is not None:
            continue
        teacher, own = _row_jobs(p)
        jobs = ([teacher] if teacher is not None else []) + own
        for j in jobs:
            old = taken.get(j.name)
            if old is not None and (old[0].config != j.config or old[0].kind != j.kind):
                p.problem = (f"{j.run_dir} is also the run folder of row {old[1]}, with another config; give "
                             "one of them another name= (or output_dir=)")
                break
        else:
            taken.update({j.name: (j, p.row.id) for j in jobs if j.name not in taken})


def build_plan(plans: Sequence[RowPlan], name: str = "reproduce") -> Plan:
    """One `kdlab.plan.Plan` for every row without a problem: teachers first (one job per
    teacher, shared by the rows that use it), then each row's seeds (waiting for its teacher)
    or the generations of its chain; sets each row's `jobs`. A chain row's root is claimed here
    (`prepare_chain`; a claim that fails becomes the row's `problem`); `reproduce` releases it
    (`finish_chain`) whatever happens. Jobs run in subprocesses log to
    `<output_dir of the first row>/logs/<run name>.log`."""
    teachers: list[Job] = []
    runs: list[Job] = []
    for p in plans:
        if p.problem:
            continue
        if p.chain is not None:
            try:
                own = chains.prepare_chain(p.chain, resume=p.resume, overwrite=p.overwrite)
            except KDLabError as exc:
                p.problem = str(exc)
                continue
            p.jobs = [j.name for j in own]
            runs += own
            continue
        teacher, own = _row_jobs(p)
        if teacher is not None:
            teachers.append(teacher)
        p.jobs = [j.name for j in ([teacher] if teacher is not None else []) + own]
        runs += own
    plan = Plan(name)
    for job in teachers + runs:  # a row's run that is another row's teacher joins the teachers, trained once
        plan.add(job)
    first = next((p for p in plans if p.jobs), None)
    if first is not None:
        plan.log_dir = first.run_dirs[0].parent / "logs"
    return plan


def measure(p: RowPlan) -> Measured:
    """Read the row's measurement from its run folders: the mean over its seeds, or the best
    generation of its chain (by the row's metric)."""
    if p.chain is not None:
        results = [RunResult.from_json(p.chain.folder(m).read_result()) for m in p.chain.finished_generations()]
        if not results:
            raise KDLabError(f"{p.row.id}: the chain has no finished generation")
        key = base_metric(p.row.metric)
        best = max(results, key=lambda r: r.last.get(key, -math.inf))  # the best generation by the row's metric
        return Measured.mean_of([best], [str(p.chain.root)])
    dirs = p.run_dirs
    return Measured.mean_of([RunResult.from_json(RunFolder(d).read_result()) for d in dirs], [str(d) for d in dirs])


def _jobs_problem(p: RowPlan, report: PlanReport) -> tuple[str, str] | None:
    """(status, why) when a job of the row did not leave a run to read: `failed` with the errors
    of its failed jobs (or why they were skipped), `submitted` when they are queued on Slurm."""
    outcomes = [report.outcomes[n] for n in p.jobs if n in report.outcomes and not report.ok(n)]
    broken = [o for o in outcomes if o.status in ("failed", "interrupted")] or \
        [o for o in outcomes if o.status == "skipped"]
    if broken:
        return "failed", "; ".join(f"{o.job.label or o.job.name} {o.status}: {o.error}" for o in broken)
    if outcomes:
        return "submitted", (f"{len(outcomes)} job(s) submitted to Slurm; once they finish, run the same command "
                             "with --resume to measure the row")
    return None


def reproduce(plans: Sequence[RowPlan], options: ExecOptions | None = None) -> list[Outcome]:
    """Run every row without a problem as one plan (`build_plan`, executed by `run_plan_cli`:
    one after another, or as `options` say), then measure each row from its run folders; a
    failing job fails its own rows only."""
    try:
        plan = build_plan(plans)
        report = run_plan_cli(plan, options or ExecOptions()) if plan.jobs else PlanReport(plan, {})
    finally:
        for p in plans:
            if p.chain is not None and p.jobs:  # claimed by build_plan
                chains.finish_chain(p.chain)
    measured: dict[str, Measured] = {}
    out = []
    for p in plans:
        if p.problem:
            out.append(Outcome(p.row, "cannot run", problem=p.problem, is_dependency=p.is_dependency))
            continue
        unfinished = _jobs_problem(p, report)
        if unfinished:
            out.append(Outcome(p.row, unfinished[0], problem=unfinished[1],
                               run_dirs=[str(d) for d in p.run_dirs], is_dependency=p.is_dependency))
            continue
        try:
            m = measure(p)
        except KDLabError as exc:
            out.append(Outcome(p.row, "failed", problem=str(exc), is_dependency=p.is_dependency))
            continue
        measured[p.row.id] = m
        base = measured.get(p.row.baseline) if p.row.baseline else None
        if p.row.baseline and base is None:
            out.append(Outcome(p.row, "no baseline", n=m.n, run_dirs=m.run_dirs, is_dependency=p.is_dependency,
                               problem=f"its baseline row {p.row.baseline} could not be measured"))
            continue
        try:
            last, best = metric_values(p.row, m, base)
        except KDLabError as exc:  # the row asks for a metric its runs do not report
            out.append(Outcome(p.row, "failed", n=m.n, run_dirs=m.run_dirs, problem=str(exc),
                               is_dependency=p.is_dependency))
            continue
        out.append(Outcome(p.row, "measured", last, best, m.n, m.run_dirs, is_dependency=p.is_dependency))
    return out


__all__ = ["Measured", "Outcome", "RowPlan", "build_plan", "folder_problem", "measure", "metric_values", "plan_row",
           "plan_rows", "refuse_shared_folders", "repo_root", "reproduce", "split_overrides"]
