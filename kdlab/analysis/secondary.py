"""Secondary-information metrics: does a model's non-target probability follow semantics?

Yang et al. (arXiv 1805.05551) measure the quality of a teacher's secondary information with
two metrics, Dist^C and Dist^S (class-level and semantic distances). Their exact formulas were
not available to kdlab, so these three are **kdlab's operationalisation**, not the paper's
numbers. Each takes a matrix of predicted probabilities (N, C), the targets (N,) and a
class -> group mapping (`groups[c]`, -1 for a class outside every group), for example
CIFAR-100's 20 coarse classes (`DataBundle.coarse_of`):

- `in_group_mass`: the share of the non-target probability that stays inside the target's
  group, averaged over samples. Chance level (uniform non-target mass): (|G| - 1) / (C - 1).
- `top_secondary_in_group`: the share of the K - 1 highest non-target classes that belong to
  the target's group (averaged over samples and the K - 1 slots). Same chance level.
- `similarity_rank_corr`: Spearman rank correlation, over class pairs, between the model's
  class-to-class similarity (for classes a, b: the mean non-target distribution the model gives
  class-a samples at b, symmetrised) and the semantic similarity (1 for the same group, 0 else).
  0 = no agreement; higher = the model's secondary classes respect the hierarchy.

Samples whose target has no group (-1) or is alone in its group are left out.
All functions are pure (numpy in, floats out).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import yaml
from scipy.stats import spearmanr

from kdlab.errors import ConfigError


def _as_arrays(probs: Any, targets: Any, groups: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    p = np.asarray(probs.detach().cpu() if hasattr(probs, "detach") else probs, dtype=np.float64)
    t = np.asarray(targets.detach().cpu() if hasattr(targets, "detach") else targets, dtype=np.int64)
    g = np.asarray(list(groups), dtype=np.int64)
    if p.ndim != 2 or t.shape != (p.shape[0],):
        raise ValueError(f"probs must be (N, C) and targets (N,), got {p.shape} and {t.shape}")
    if g.shape != (p.shape[1],):
        raise ValueError(f"groups must map each of the {p.shape[1]} classes to a group, got {g.shape[0]} entries")
    return p, t, g


def _same_group(g: np.ndarray) -> np.ndarray:
    """(C, C) bool: a and b are different classes of the same (known) group."""
    same = (g[:, None] == g[None, :]) & (g[:, None] >= 0)
    np.fill_diagonal(same, False)
    return same


def _usable(t: np.ndarray, same: np.ndarray) -> np.ndarray:
    """Samples whose target has at least one other class in its group."""
    return same.sum(1)[t] > 0


def chance_in_group(groups: Sequence[int], targets: Any | None = None) -> float:
    """Expected value of the two in-group shares for uniform non-target probability."""
    g = np.asarray(list(groups), dtype=np.int64)
    same = _same_group(g)
    c = len(g)
    t = np.arange(c) if targets is None else np.asarray(targets, dtype=np.int64)
    ok = _usable(t, same)
    if not ok.any():
        return float("nan")
    return float((same.sum(1)[t[ok]] / (c - 1)).mean())


def in_group_mass(probs: Any, targets: Any, groups: Sequence[int]) -> float:
    """Mean over samples of sum_{j != t, group(j) = group(t)} p_j / sum_{j != t} p_j."""
    p, t, g = _as_arrays(probs, targets, groups)
    same = _same_group(g)
    ok = _usable(t, same)
    p, t = p[ok], t[ok]
    if len(t) == 0:
        return float("nan")
    rows = np.arange(len(t))
    others = p.copy()
    others[rows, t] = 0.0
    non_target = others.sum(1)  # summed directly: 1 - p_t cancels badly for confident models
    inside = (p * same[t]).sum(1)
    valid = non_target > 0  # a one-hot prediction has no secondary information to measure
    if not valid.any():
        return float("nan")
    return float((inside[valid] / non_target[valid]).mean())


def top_secondary_in_group(probs: Any, targets: Any, groups: Sequence[int], k: int = 5) -> float:
    """Share of the K - 1 highest non-target classes that are in the target's group."""
    p, t, g = _as_arrays(probs, targets, groups)
    c = p.shape[1]
    if not 2 <= k <= c:
        raise ValueError(f"k={k} must be between 2 and the number of classes ({c})")
    same = _same_group(g)
    ok = _usable(t, same)
    p, t = p[ok].copy(), t[ok]
    if len(t) == 0:
        return float("nan")
    rows = np.arange(len(t))
    p[rows, t] = -np.inf
    # argpartition: the k - 1 largest without a full sort (C may be 1000).
    top = np.argpartition(-p, k - 2, axis=1)[:, : k - 1]
    hits = same[t[:, None], top]
    return float(hits.mean())


def class_similarity(probs: Any, targets: Any, num_classes: int | None = None) -> np.ndarray:
    """(C, C) model similarity: row a is the mean non-target distribution p_j / (1 - p_t) over
    samples of class a (diagonal 0), then symmetrised. Rows of unseen classes are NaN."""
    p = np.asarray(probs.detach().cpu() if hasattr(probs, "detach") else probs, dtype=np.float64)
    t = np.asarray(targets.detach().cpu() if hasattr(targets, "detach") else targets, dtype=np.int64)
    c = num_classes or p.shape[1]
    rows = np.arange(len(t))
    q = p.copy()
    q[rows, t] = 0.0
    denom = q.sum(1, keepdims=True)
    q = np.divide(q, denom, out=np.zeros_like(q), where=denom > 0)
    sums = np.zeros((c, c))
    np.add.at(sums, t, q)
    counts = np.bincount(t, minlength=c).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = sums / counts[:, None]
    mean[counts == 0] = np.nan
    return 0.5 * (mean + mean.T)


def similarity_rank_corr(probs: Any, targets: Any, groups: Sequence[int]) -> float:
    """Spearman correlation between `class_similarity` and same-group indicators over the class
    pairs a < b whose classes both have samples and a group."""
    p, t, g = _as_arrays(probs, targets, groups)
    sim = class_similarity(p, t, p.shape[1])
    iu = np.triu_indices(len(g), k=1)
    model = sim[iu]
    semantic = ((g[:, None] == g[None, :]) & (g[:, None] >= 0))[iu].astype(np.float64)
    keep = np.isfinite(model) & (g[iu[0]] >= 0) & (g[iu[1]] >= 0)
    model, semantic = model[keep], semantic[keep]
    if len(model) < 3 or semantic.min() == semantic.max() or model.min() == model.max():
        return float("nan")
    return float(spearmanr(model, semantic).statistic)


def secondary_metrics(probs: Any, targets: Any, groups: Sequence[int], k: int = 5) -> dict[str, float]:
    """All three metrics plus the chance level of the two in-group shares."""
    return {
        "in_group_mass": in_group_mass(probs, targets, groups),
        "top_secondary_in_group": top_secondary_in_group(probs, targets, groups, k),
        "similarity_rank_corr": similarity_rank_corr(probs, targets, groups),
        "in_group_chance": chance_in_group(groups, np.asarray(targets)),
    }


def resolve_groups(spec: Any, class_names: Sequence[str], where: str = "chain.groups") -> list[int]:
    """A class -> group list from a user's spec:

    - a list of C integers (group of each class, -1 for none);
    - a mapping group name -> list of class names or indices (classes left out get -1);
    - a path (str) to a YAML or JSON file holding either.
    """
    c = len(class_names)
    if isinstance(spec, str):
        path = Path(spec).expanduser()
        if not path.is_file():
            raise ConfigError(f"{where}: file {spec!r} does not exist; give a YAML/JSON file or an inline list")
        try:
            spec = yaml.safe_load(path.read_text()) if path.suffix != ".json" else json.loads(path.read_text())
        except (yaml.YAMLError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{where}: {spec!r} cannot be parsed ({exc}); fix the file") from None
    if isinstance(spec, (list, tuple)):
        if len(spec) != c or not all(isinstance(v, int) for v in spec):
            raise ConfigError(
                f"{where}: a list must give an integer group for each of the {c} classes "
                f"(got {len(spec)} entries); or use a mapping group -> [class names]"
            )
        return [int(v) for v in spec]
    if isinstance(spec, dict):
        index = {name: i for i, name in enumerate(class_names)}
        out = [-1] * c
        for gi, (group, members) in enumerate(spec.items()):
            if not isinstance(members, (list, tuple)):
                raise ConfigError(f"{where}: group {group!r} must list its classes, e.g. {group}: [cat, dog]")
            for m in members:
                i = m if isinstance(m, int) else index.get(str(m))
                if i is None or not 0 <= i < c:
                    raise ConfigError(
                        f"{where}: group {group!r} names unknown class {m!r}; "
                        f"classes are {', '.join(class_names[:20])}{' ...' if c > 20 else ''}"
                    )
                if out[i] != -1:
                    raise ConfigError(f"{where}: class {class_names[i]!r} is in two groups; put it in one")
                out[i] = gi
        return out
    raise ConfigError(f"{where}: expected a list of group ids, a mapping group -> classes, or a file path")


__all__ = [
    "chance_in_group",
    "class_similarity",
    "in_group_mass",
    "resolve_groups",
    "secondary_metrics",
    "similarity_rank_corr",
    "top_secondary_in_group",
]
