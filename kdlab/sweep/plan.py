"""A sweep as one `kdlab.plan.Plan`, every config built and every folder checked first.

For each point and seed: the base config, the sweep's `overrides:`, the command line's, the
point's values, then `output_dir=<output_dir>/<sweep name>`, `name=<point>_seed<seed>`,
`train.seed=<seed>`. A point that does not make a valid config is one `ConfigError` naming the
sweep file, the key(s) at fault and their values. The plan:

- the teacher (`sweep.teacher`): one job training its own config into `<output_dir>/<its
  name>` (the folder `kdlab train`/`reproduce` use), unless a finished run of that config is
  there (reused); every student gets `teacher.checkpoint=<that run>/last.pt` or `best.pt`,
  the file the base config's `teacher.checkpoint` names, and waits for the job;
- with `teacher_cache: true`, one job building `<sweep folder>/teacher_cache` after the
  teacher; every student gets `teacher.cache=<it>` and waits for it;
- one job per (point, seed), or one per generation when the base is a generations chain
  (`kdlab generations`; generation m waits for m - 1).

A run folder holding a run of another config is refused before anything trains (unless
`overwrite`); a finished run of the same config is reused, an interrupted one continues.
Overrides: `method.*`, `teacher.*` and `name` apply to the students only, every other key
(data.root, train.epochs, output_dir, train.device, ...) to the teacher too.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from kdlab.config.loader import config_to_dict, load_config, override_section, split_overrides
from kdlab.engine.result import RunResult
from kdlab.engine.run_folder import RunFolder
from kdlab.errors import ConfigError, DataError, KDLabError
from kdlab.generations.config import Chain, is_chain_file, load_chain
from kdlab.plan import Job, Plan, PlanReport
from kdlab.plan.jobs import missing_teacher_files
from kdlab.sweep.config import Point, Sweep

RETRY = "kdlab sweep SWEEP.yaml"
CACHE_FOLDER = "teacher_cache"
LOG_FOLDER = "logs"


@dataclass
class PlannedRun:
    """One (point, seed): its run folder (a chain's root for a generations base), its config(s)
    and what the plan does with it: train, continue, reuse or retrain."""

    point: Point
    seed: int
    run_dir: Path
    configs: list[Any]  # one ExperimentConfig, or one per generation of a chain
    action: str
    chain: Chain | None = None
    jobs: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.run_dir.name


@dataclass
class SweepPlan:
    """What `kdlab sweep` will do, decided before anything trains."""

    sweep: Sweep
    root: Path
    runs: list[PlannedRun]
    plan: Plan
    teacher_config: Any = None
    teacher_dir: Path | None = None
    teacher_action: str = "-"  # -: none, reuse, train, continue, retrain, file
    cache_dir: Path | None = None
    cache_action: str = "-"

    def runs_of(self, point: Point) -> list[PlannedRun]:
        return [r for r in self.runs if r.point.label == point.label]


def _assign(key: str, value: Any) -> str:
    """`key=value` whose value reads back (YAML) as `value` itself: JSON is YAML."""
    return f"{key}={json.dumps(value)}"


class _Builder:
    """Loads the configs of one sweep with its overrides; errors name the sweep file."""

    def __init__(self, sweep: Sweep, overrides: Sequence[str]) -> None:
        self.sweep = sweep
        given = list(sweep.settings.overrides) + list(overrides)
        for text in overrides:
            section, key = override_section(text), text.split("=", 1)[0].strip()
            if section == "name":
                raise ConfigError(f"{text!r}: a sweep names its runs <point>_seed<seed> itself; change sweep.name "
                                  f"in {sweep.path} (or output_dir=) to put them elsewhere")
            if key in sweep.keys:
                raise ConfigError(f"{text!r}: {key} is a key the sweep varies ({sweep.path}); change its values "
                                  "there, or drop the override")
        self.shared, self.own = split_overrides(given)
        self.chain = is_chain_file(sweep.base)
        if self.chain and sweep.teacher is not None:
            raise ConfigError(f"{sweep.path}: sweep.teacher is set but sweep.base {sweep.settings.base} is a "
                              "generations chain, which trains its own teachers; remove sweep.teacher")
        if self.chain and sweep.settings.teacher_cache:
            raise ConfigError(f"{sweep.path}: teacher_cache is set but sweep.base {sweep.settings.base} is a "
                              "generations chain (each generation has its own teacher); remove teacher_cache")

    def load(self, extra: Sequence[str], where: str) -> Any:
        """The base (config or chain) with the overrides and `extra`."""
        texts = self.shared + self.own + list(extra)
        try:
            return load_chain(self.sweep.base, texts) if self.chain else load_config(self.sweep.base, texts)
        except ConfigError as exc:
            raise ConfigError(f"{self.sweep.path}: {where}: {exc}") from None

    def base(self) -> Any:
        return self.load([], f"sweep.base {self.sweep.settings.base} with the sweep's overrides")

    def point(self, point: Point, extra: Sequence[str] = ()) -> Any:
        """The point's config; a failure names the key(s) that fail on their own (else all)."""
        texts = [_assign(k, v) for k, v in point.values.items()]
        load = load_chain if self.chain else load_config
        try:
            return load(self.sweep.base, self.shared + self.own + texts + list(extra))
        except ConfigError as exc:
            culprits = []
            for key, text in zip(point.values, texts):
                try:
                    load(self.sweep.base, self.shared + self.own + [text] + list(extra))
                except ConfigError:
                    culprits.append(key)
            named = ", ".join(f"{k}={point.values[k]!r}" for k in (culprits or point.values))
            raise ConfigError(f"{self.sweep.path}: point {point.label}: {named} does not make a valid "
                              f"{'chain' if self.chain else 'config'} of {self.sweep.settings.base}: {exc}") from None


def _folder_problem(folder: RunFolder, cfg: Any, overwrite: bool, what: str) -> str | None:
    """Why `cfg` may not train into `folder` (None when it may): another process writes it, or
    it holds a run of another config and `overwrite` was not given."""
    busy = folder.busy()
    if busy:
        return busy
    if overwrite or not folder.holds_run():
        return None
    diffs = folder.differences(cfg)
    if diffs:
        return (f"{folder.path} already holds a {what} of another config ({'; '.join(diffs[:3])}); change "
                f"sweep.name (or output_dir=) to train elsewhere, or replace it: {RETRY} --overwrite")
    return None


def _run_dirs(run: PlannedRun) -> list[Path]:
    """The run folders of a planned run: its own, or its chain's generations."""
    if run.chain is not None:
        return [run.chain.run_dir(m) for m in range(len(run.configs))]
    return [run.run_dir]


def _action(folder: RunFolder, overwrite: bool) -> str:
    if not folder.holds_run():
        return "train"
    if overwrite:
        return "retrain"
    return "reuse" if folder.is_finished() else "continue"


def _check_cache(sweep: Sweep, configs: Sequence[Any]) -> None:
    """Refuse a shared teacher-output cache that some student could not use, with the reason."""
    from kdlab.methods import method_class  # lazy: the method registry imports every method

    first = configs[0]
    if first.teacher is None:
        raise ConfigError(f"{sweep.path}: teacher_cache is set but the students have no teacher: section; "
                          "remove teacher_cache")
    for cfg in configs:
        cls = method_class(cfg.method.name)
        if not cls.requires_teacher or cls.needs_teacher_features:
            why = "uses no teacher" if not cls.requires_teacher else "needs the teacher's features, not only its logits"
            raise ConfigError(f"{sweep.path}: teacher_cache is set but method {cfg.method.name!r} ({cfg.name}) {why}; "
                              "a teacher-output cache serves logit-only methods (kd, dkd, generation): remove "
                              "teacher_cache")
        if cfg.data.augment not in ("standard", "none"):
            raise ConfigError(f"{sweep.path}: teacher_cache is set but {cfg.name} trains with data.augment="
                              f"{cfg.data.augment}, a continuous augmentation the cache cannot hold (it stores the "
                              "crop/flip views only): remove teacher_cache")
        for section in ("data", "teacher"):
            mine, theirs = config_to_dict(cfg)[section], config_to_dict(first)[section]
            if mine != theirs:
                keys = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
                raise ConfigError(f"{sweep.path}: teacher_cache shares one cache among every student, but "
                                  f"{cfg.name} and {first.name} differ in {section}.{', '.join(keys)}; remove "
                                  "teacher_cache (or vary other keys)")


def plan_sweep(sweep: Sweep, overrides: Sequence[str] = (), *, overwrite: bool = False,
               check_folders: bool = True) -> SweepPlan:
    """Build every config of the sweep and its plan; trains nothing. `overwrite`: retrain what
    the run folders hold. `check_folders=False` (`--report`): a folder of another config is
    not refused (the summary leaves it out)."""
    b = _Builder(sweep, overrides)
    base = b.base()
    output_dir = base.root.parent if b.chain else Path(base.output_dir)
    root = output_dir / sweep.name
    out = SweepPlan(sweep, root, [], Plan(f"sweep {sweep.name}", log_dir=root / LOG_FOLDER))
    problems: list[str] = []
    student_extra: list[str] = []
    teacher_job: Job | None = None
    if sweep.teacher is not None:
        teacher_job = _plan_teacher(out, b, base, overwrite, problems if check_folders else [])
        assert out.teacher_dir is not None
        student_extra = [_assign("teacher.checkpoint", str(RunFolder(out.teacher_dir).teacher_checkpoint(base.teacher.checkpoint))),
                         "teacher.weights=null"]
    elif not b.chain and base.teacher is not None:
        out.teacher_action = "file"
        for missing in missing_teacher_files(base) if check_folders else []:
            problems.append(f"{missing}; put the file there, pass {missing.split()[0]}=PATH, or name "
                            f"the teacher's config as sweep.teacher in {sweep.path} to train it first")
    if sweep.settings.teacher_cache:
        out.cache_dir = root / CACHE_FOLDER
        student_extra.append(_assign("teacher.cache", str(out.cache_dir)))
    for point in sweep.points:
        first = b.point(point, student_extra)
        seed0 = (first.configs[0] if b.chain else first).train.seed
        for k in range(sweep.seeds):
            seed = seed0 + k
            name = f"{point.label}_seed{seed}"
            extra = student_extra + [_assign("output_dir", str(root)), _assign("name", name), f"train.seed={seed}"]
            loaded = b.point(point, extra)
            configs = loaded.configs if b.chain else [loaded]
            run = PlannedRun(point, seed, root / name, configs, "train", chain=loaded if b.chain else None)
            actions = []
            for cfg, d in zip(configs, _run_dirs(run)):
                folder = RunFolder(d)
                problem = _folder_problem(folder, cfg, overwrite, "run") if check_folders else None
                if problem:
                    problems.append(problem)
                actions.append(_action(folder, overwrite))
            run.action = actions[0] if len(set(actions)) == 1 else "continue"
            out.runs.append(run)
    if problems:
        raise ConfigError(f"{sweep.path}: the sweep cannot run; nothing was trained:\n  - "
                          + "\n  - ".join(dict.fromkeys(problems)))
    waits = []
    if teacher_job is not None:
        waits = [out.plan.add(teacher_job).name]
    if out.cache_dir is not None:
        configs = [c for r in out.runs for c in r.configs]
        _check_cache(sweep, configs)
        cache = Job.cache(configs[0], out.cache_dir, after=waits, label=f"{sweep.name}/{CACHE_FOLDER}", retry=RETRY)
        out.cache_action = "reuse" if teacher_job is None and cache.is_finished() else "build"
        waits = [out.plan.add(cache).name]
    for run in out.runs:
        after = list(waits)
        for m, (cfg, d) in enumerate(zip(run.configs, _run_dirs(run))):
            job = Job.train(cfg, run_dir=d, after=after, resume=True, overwrite=overwrite, retry=RETRY,
                            label=f"{run.name}/gen{m}" if run.chain is not None else run.name,
                            what="generation" if run.chain is not None else "run")
            run.jobs.append(out.plan.add(job).name)
            after = [job.name]
    out.plan.check()
    return out


def _plan_teacher(out: SweepPlan, b: _Builder, base: Any, overwrite: bool, problems: list[str]) -> Job | None:
    """Resolve the sweep's teacher: reuse its finished run, or one job training it."""
    sweep = out.sweep
    if base.teacher is None:
        raise ConfigError(f"{sweep.path}: sweep.teacher is set but sweep.base {sweep.settings.base} has no "
                          "teacher: section (the model to load the teacher's checkpoint into); add one, or remove "
                          "sweep.teacher")
    assert sweep.teacher is not None
    try:
        tcfg = load_config(sweep.teacher, b.shared)
    except ConfigError as exc:
        raise ConfigError(f"{sweep.path}: sweep.teacher {sweep.settings.teacher}: {exc}") from None
    folder = RunFolder.of(tcfg)
    out.teacher_config, out.teacher_dir = tcfg, folder.path
    t_file = folder.teacher_checkpoint(base.teacher.checkpoint)
    if t_file.is_file() and folder.is_finished() and not folder.differences(tcfg):
        out.teacher_action = "reuse"  # a finished teacher of this config is only read: never retrained
        return None
    problem = _folder_problem(folder, tcfg, overwrite, "teacher run")
    out.teacher_action = _action(folder, overwrite)
    if problem:
        problems.append("teacher: " + problem)
    elif out.teacher_action == "reuse":  # finished with this config, but without the file the students load
        out.teacher_action = "train"
        problems.append(f"teacher: {folder.path} holds a finished run without {t_file.name}, the checkpoint "
                        f"the students load; retrain it: {RETRY} --overwrite")
    return Job.train(tcfg, what="teacher run", resume=True, overwrite=overwrite, retry=RETRY,
                     label=f"teacher {tcfg.name}")


def check_data(sp: SweepPlan) -> None:
    """Build the datasets the sweep trains on once (each task's `check_data`), so that a missing
    dataset is one message before anything runs instead of one failure per run."""
    from kdlab.engine.tasks import task_for  # lazy: the task registry imports the data packages

    seen: set[str] = set()
    configs = ([sp.teacher_config] if sp.teacher_config is not None and sp.teacher_action != "reuse" else []) + \
        [c for r in sp.runs for c in r.configs]
    for cfg in configs:
        key = json.dumps([cfg.task, config_to_dict(cfg)["data"]], sort_keys=True)
        if key in seen:
            continue
        seen.add(key)
        try:
            task_for(cfg).check_data(cfg)
        except (DataError, ConfigError) as exc:
            raise DataError(f"{sp.sweep.path}: dataset {cfg.data.name!r} of {cfg.name} is not available: {exc}; "
                            "pass data.root=PATH") from None


# ------------------------------------------------------------------------------ results
@dataclass
class RunOutcome:
    """A planned run after the plan: its result when finished (a chain: its best generation by
    the metric), else why not."""

    run: PlannedRun
    result: RunResult | None
    status: str  # done, reused, failed, skipped, interrupted, submitted, not finished, another config
    generation: int | None = None


def _best_generation(run: PlannedRun, metric: str | None) -> tuple[RunResult | None, int | None]:
    assert run.chain is not None
    results = []
    for m in run.chain.finished_generations():
        if RunFolder(run.chain.run_dir(m)).differences(run.configs[m]):
            break
        results.append((m, RunResult.from_json(run.chain.folder(m).read_result())))
    if not results:
        return None, None
    key = metric or results[0][1].primary_metric
    m, best = max(results, key=lambda mr: _finite(mr[1].last.get(key)))
    return best, m


def _finite(x: float | None) -> float:
    return x if x is not None and not math.isnan(x) else -math.inf


def collect(sp: SweepPlan, report: PlanReport | None = None, metric: str | None = None) -> list[RunOutcome]:
    """Every planned run's result, read from its folder (what is finished now), and its status:
    the plan's outcome of its jobs when it ran (`report`: done, reused, or the first of failed /
    skipped / interrupted / submitted), else finished / not finished. A finished folder of
    another config (`--report` does not refuse it) gives no result."""
    out = []
    for run in sp.runs:
        result, generation = None, None
        status = ""
        try:
            if run.chain is not None:
                result, generation = _best_generation(run, metric)
            else:
                folder = RunFolder(run.run_dir)
                if folder.is_finished():
                    if folder.differences(run.configs[0]):
                        status = "another config"
                    else:
                        result = RunResult.from_json(folder.read_result())
        except KDLabError as exc:
            status = f"unreadable: {exc}"
        if report is not None:
            states = [report.outcomes[n].status for n in run.jobs if n in report.outcomes]
            bad = [s for s in states if s not in ("done", "reused")]
            status = bad[0] if bad else ("reused" if states and all(s == "reused" for s in states) else "done")
        elif not status:
            status = "finished" if result is not None else "not finished"
        out.append(RunOutcome(run, result, status, generation))
    return out


__all__ = ["PlannedRun", "RunOutcome", "SweepPlan", "check_data", "collect", "plan_sweep"]
