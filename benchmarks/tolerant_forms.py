"""Where each generation of some `kdlab generations` chains puts its probability (docs/tolerant.md,
"Which TSD form"): top-1, the mean target probability p_t, the mean probability of the most likely
wrong class, and the mass on the K - 1 most likely wrong classes, on the validation set, from each
generation's last.pt.

    python benchmarks/tolerant_forms.py RUNS/CHAIN_NAME [RUNS/OTHER_CHAIN ...] [--k 5]

The `generations.md` report of each chain gives the accuracies and p_t as well; this adds the
secondary-class columns that compare the patriarch's loss forms.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
import yaml

from kdlab.schema.experiment import DataConfig
from kdlab.data import build_datasets
from kdlab.engine.build import eval_loader
from kdlab.engine.checkpoint import build_model_from_checkpoint
from kdlab.generations.report import collect_logits


def secondary_profile(logits: torch.Tensor, targets: torch.Tensor, k: int) -> dict[str, float]:
    """Validation-set means of how a model spreads its probability (float64 softmax)."""
    p = logits.double().softmax(1)
    p_t = p.gather(1, targets[:, None]).squeeze(1)
    wrong = p.scatter(1, targets[:, None], -1.0).topk(k - 1, dim=1).values  # the K - 1 likeliest wrong classes
    return {
        "top1": 100.0 * (p.argmax(1) == targets).double().mean().item(),
        "p_t": p_t.mean().item(),
        "p_max": p.max(1).values.mean().item(),
        "wrong_1": wrong[:, 0].mean().item(),
        f"wrong_top{k - 1}": wrong.sum(1).mean().item(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("chains", nargs="+", type=Path, help="chain folders (<output_dir>/<name>)")
    parser.add_argument("--k", type=int, default=5, help="K of the TSD term: K - 1 secondary classes")
    args = parser.parse_args()
    loader, header = None, None
    for chain in args.chains:
        gens = [d for d in chain.glob("gen*") if d.is_dir() and d.name[3:].isdigit()]
        for gen in sorted(gens, key=lambda d: int(d.name[3:])):
            if not (gen / "result.json").is_file():
                continue  # unfinished generation
            raw = yaml.safe_load((gen / "config.yaml").read_text())
            if loader is None:  # every chain compared must share the validation set
                data_cfg = DataConfig.model_validate(raw["data"])
                loader = eval_loader(build_datasets(data_cfg).val, data_cfg, "cpu")
            model, _ = build_model_from_checkpoint(gen / "last.pt", raw["model"]["name"])
            row = secondary_profile(*collect_logits(model, loader, torch.device("cpu")), args.k)
            if header is None:
                header = ["chain", "gen", *row]
                print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
            print(f"| {chain.name} | {gen.name[3:]} | " + " | ".join(f"{v:.3f}" for v in row.values()) + " |")


if __name__ == "__main__":
    main()
