"""Plans of runs and the one executor that runs them (`--seeds`, `generations`, `reproduce`,
the demo and `kdlab sweep` all build a `Plan` and hand it to `execute`).

A plan is a graph of jobs: each job trains one run folder (or builds one teacher-output cache)
from a validated config and may wait for others (a student for its teacher, generation m for
generation m - 1). The executor skips finished runs, resumes interrupted ones, isolates
failures (the jobs that do not depend on a failed one go on) and ends with a table of what
was done; running the same command again continues where it stopped. Jobs run one after
another in this process, N at once in subprocesses (`--jobs`), or on Slurm through submitit
(`--launcher slurm`, `kdlab.plan.slurm`).
"""
from kdlab.plan.executor import ExecOptions, Outcome, PlanReport, execute
from kdlab.plan.jobs import Job, Plan, run_job

__all__ = ["ExecOptions", "Job", "Outcome", "Plan", "PlanReport", "execute", "run_job"]
