"""`kdlab sweep SWEEP.yaml`: one experiment trained over a grid (or a list) of settings and
seeds, summarised as mean ± std per point (sweep.md, sweep.json, sweep.png).

- `kdlab.sweep.config`: the sweep file (`load_sweep`): which experiment, which keys vary, how
  many seeds, which teacher to train first;
- `kdlab.sweep.plan`: the sweep as one `kdlab.plan.Plan` (`plan_sweep`), every config
  validated and every run folder checked before anything trains;
- `kdlab.sweep.summary`: the tables and the figure, from the finished runs.

docs/sweeps.md is the reference.
"""
from kdlab.sweep.config import Point, Sweep, load_sweep

__all__ = ["Point", "Sweep", "load_sweep"]
