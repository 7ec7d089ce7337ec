"""The report of a chain of generations: one row per generation, one per ensemble.

For each finished generation m it evaluates the checkpoint the chain hands on
(`chain.checkpoint`: best.pt or last.pt) on the validation set once, and reads its
`result.json` and `metrics.jsonl` (through `kdlab.engine.run_folder.RunFolder`):

- top-1 / top-5 at the last epoch and at the best epoch (papers report either);
- the teacher's mean target probability on the training batches it taught (from the
  training log, `stat/teacher_conf` of the last epoch; none for the patriarch or lam = 0);
- the generation's own mean target probability on the validation set (how peaked it is as
  the next teacher);
- the secondary-information metrics of `kdlab.analysis.secondary` (kdlab's operationalisation
  of the paper's Dist^C / Dist^S), when a class -> group mapping is known;

and the accuracy of the ensemble of generations 0..g-1 (averaged softmax) for g = 1..N+1.
Writes `<chain root>/generations.json` and `generations.md`.
"""
from __future__ import annotations

import io
import json
import math
from typing import Any

import torch

from kdlab.analysis.secondary import resolve_groups, secondary_metrics
from kdlab.data import build_datasets
from kdlab.engine.build import eval_loader
from kdlab.engine.checkpoint import build_model_from_checkpoint
from kdlab.engine.device import resolve_device
from kdlab.engine.evaluate import autocast_context
from kdlab.engine.result import RunResult
from kdlab.errors import KDLabError
from kdlab.generations.config import Chain
from kdlab.text_table import print_table


@torch.no_grad()
def collect_logits(model: torch.nn.Module, loader, device: torch.device, amp: str = "none") -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (N, C) float32 on CPU, targets (N,)) of `model` over `loader`."""
    model.eval()
    outs, targets = [], []
    for batch in loader:
        images = batch[0].to(device, non_blocking=True)
        with autocast_context(device, amp):
            logits = model(images)
        outs.append(logits.float().cpu())
        targets.append(batch[1].cpu())
    return torch.cat(outs), torch.cat(targets)


def topk_accuracy(probs: torch.Tensor, targets: torch.Tensor, k: int) -> float:
    """Top-k accuracy in % (k capped at the number of classes)."""
    k = min(k, probs.size(1))
    hits = (probs.topk(k, dim=1).indices == targets[:, None]).any(1)
    return 100.0 * hits.double().mean().item()


def mean_target_prob(probs: torch.Tensor, targets: torch.Tensor) -> float:
    return probs.gather(1, targets[:, None]).double().mean().item()


def describe_generation(chain: Chain, m: int) -> str:
    s = chain.settings
    if m > 0:
        return f"student, lam {s.lam_of(m):g}, tau {s.tau:g}"
    p = s.patriarch
    if p.kind == "tsd":
        return f"patriarch, TSD eta {p.eta:g} k {p.k}" + ("" if p.scores == "logits" else " (probs)") + (
            "" if p.primary == "target" else " (primary top-1)")
    if p.kind == "label_smoothing":
        return f"patriarch, label smoothing {p.smoothing:g}"
    if p.kind == "confidence_penalty":
        return f"patriarch, confidence penalty {p.penalty:g}"
    return "patriarch, strict (CE)"


def build_report(chain: Chain) -> dict[str, Any]:
    """Evaluate every finished generation and their ensembles; return the report as data."""
    gens = chain.finished_generations()
    if not gens:
        raise KDLabError(
            f"no finished generation under {chain.root} (generation 0 needs result.json and "
            f"{chain.settings.checkpoint}.pt); run 'kdlab generations CONFIG' first"
        )
    cfg0 = chain.configs[0]
    device = resolve_device(cfg0.train.device)
    bundle = build_datasets(cfg0.data)
    loader = eval_loader(bundle.val, cfg0.data, device.type)
    groups, group_source = None, None
    if chain.settings.groups is not None:
        groups, group_source = resolve_groups(chain.settings.groups, bundle.class_names), "chain.groups"
    elif bundle.coarse_of is not None:
        groups, group_source = list(bundle.coarse_of), "CIFAR-100 coarse classes (20 superclasses)"
    k = min(chain.settings.patriarch.k, bundle.num_classes)

    rows: list[dict[str, Any]] = []
    ensembles: list[dict[str, Any]] = []
    prob_sum: torch.Tensor | None = None
    targets: torch.Tensor | None = None
    for m in gens:
        folder = chain.folder(m)
        model, _ = build_model_from_checkpoint(chain.checkpoint(m), chain.configs[m].model.name, bundle.num_classes)
        model.to(device)
        logits, targets = collect_logits(model, loader, device, chain.configs[m].train.amp)
        del model
        # float64 softmax: confident models keep their tiny non-target mass (float32 rounds it to 0).
        probs = logits.double().softmax(1)
        # Generations are classification runs (softmax ensembles): their task reports top1/top5.
        result = RunResult.from_json(folder.read_result())
        row: dict[str, Any] = {
            "gen": m,
            "loss": describe_generation(chain, m),
            "lam": None if m == 0 else chain.settings.lam_of(m),
            "top1_last": result.last.get("top1"),
            "top5_last": result.last.get("top5"),
            "top1_best": result.best.get("top1"),
            "top5_best": result.best.get("top5"),
            "best_epoch": result.best_epoch,
            "last_epoch": result.epochs,
            "checkpoint": chain.settings.checkpoint,
            "checkpoint_top1": topk_accuracy(probs, targets, 1),
            "checkpoint_top5": topk_accuracy(probs, targets, 5),
            "teacher_conf_train": folder.last_metric("stat/teacher_conf") if m > 0 else None,
            "own_conf_val": mean_target_prob(probs, targets),
        }
        if groups is not None:
            row.update(secondary_metrics(probs.numpy(), targets.numpy(), groups, k))
        rows.append(row)
        prob_sum = probs if prob_sum is None else prob_sum + probs
        avg = prob_sum / (m + 1)
        ensembles.append({
            "members": m + 1,
            "generations": f"gen0..gen{m}" if m else "gen0",
            "top1": topk_accuracy(avg, targets, 1),
            "top5": topk_accuracy(avg, targets, 5),
            "mean_target_prob": mean_target_prob(avg, targets),
        })
    return {
        "chain": chain.name,
        "root": str(chain.root),
        "label": chain.settings.label,
        "settings": chain.settings.model_dump(mode="json"),
        "finished": len(gens),
        "planned": len(chain.configs),
        "val_samples": int(targets.numel()) if targets is not None else 0,
        "groups": group_source,
        "k": k,
        "generations": rows,
        "ensembles": ensembles,
    }


def _cell(value: Any, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def generation_table(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    k = report["k"]
    headers = ["gen", "loss", "top-1 last", "top-5 last", "top-1 best", "top-5 best", "best ep", "last ep",
               "teacher p_t (train)", "own p_t (val)"]
    with_groups = report["groups"] is not None
    if with_groups:
        headers += ["in-group mass", f"top-{k - 1} in group", "similarity rho"]
    rows = []
    for r in report["generations"]:
        row = [str(r["gen"]), r["loss"], _cell(r["top1_last"]), _cell(r["top5_last"]), _cell(r["top1_best"]),
               _cell(r["top5_best"]), str(r["best_epoch"]), str(r["last_epoch"]),
               _cell(r["teacher_conf_train"], 3), _cell(r["own_conf_val"], 3)]
        if with_groups:
            row += [_cell(r["in_group_mass"], 3), _cell(r["top_secondary_in_group"], 3),
                    _cell(r["similarity_rank_corr"], 3)]
        rows.append(row)
    return headers, rows


def ensemble_table(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    headers = ["ensemble (averaged softmax)", "top-1", "top-5", "mean p_t (val)"]
    rows = [[e["generations"], _cell(e["top1"]), _cell(e["top5"]), _cell(e["mean_target_prob"], 3)]
            for e in report["ensembles"]]
    return headers, rows


def render_markdown(report: dict[str, Any]) -> str:
    out = io.StringIO()
    s = report["settings"]
    print(f"# {report['chain']}: {report['label']}\n", file=out)
    print(f"Patriarch `{s['patriarch']['kind']}`, eta {s['patriarch']['eta']:g}, lam {s['lam']}, tau {s['tau']:g}, "
          f"{report['finished']} of {report['planned']} generations finished; teacher of generation m+1 = "
          f"`{s['checkpoint']}.pt` of generation m. Accuracies in % on {report['val_samples']} validation "
          f"images; p_t = mean probability of the true class.\n", file=out)
    print_table(*generation_table(report), file=out)
    print("", file=out)
    print_table(*ensemble_table(report), file=out)
    if report["groups"] is not None:
        chance = next((r.get("in_group_chance") for r in report["generations"]), None)
        print(f"\nSecondary-information metrics (kdlab's operationalisation of the paper's Dist^C / Dist^S, "
              f"not its formulas; see docs/tolerant.md) use {report['groups']} as the semantic hierarchy; "
              f"chance level of the two in-group shares: {_cell(chance, 3)}.", file=out)
    return out.getvalue()


def write_report(chain: Chain) -> dict[str, Any]:
    """Build the report, write generations.json / generations.md under the chain root, return it."""
    report = build_report(chain)
    (chain.root / "generations.json").write_text(json.dumps(report, indent=2) + "\n")
    (chain.root / "generations.md").write_text(render_markdown(report))
    return report


__all__ = ["build_report", "collect_logits", "ensemble_table", "generation_table", "render_markdown",
           "topk_accuracy", "write_report"]
