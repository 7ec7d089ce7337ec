"""A grid of images with detected boxes: one row per image, one column per model (the ground
truth first), each box labelled with its class and score (`kdlab demo --task detection`)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from matplotlib.patches import Rectangle

from torch import Tensor

from kdlab.analysis.plotting import new_figure, save_figure

#: One colour per class (cycled).
PALETTE = ("#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#9a6324")


def draw_detections(images: Sequence[Tensor], columns: Sequence[tuple[str, Sequence[dict[str, Tensor]]]],
                    class_names: Sequence[str], path: str | Path, *, score_threshold: float = 0.5,
                    title: str | None = None) -> Path:
    """Draw `images` (C, H, W floats in [0, 1]) with each column's boxes.

    columns: (title, one dict per image with `boxes` (K, 4) xyxy, `labels` (K,) in 1..C and
    optionally `scores` (K,)); boxes scoring below `score_threshold` are left out.
    """
    fig, axes = new_figure(len(images), len(columns), width=2.6, height=2.3)
    for r, image in enumerate(images):
        pixels = image.detach().permute(1, 2, 0).clamp(0, 1).cpu().numpy()
        for c, (name, outputs) in enumerate(columns):
            ax = axes[r][c]
            ax.imshow(pixels)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(name, fontsize=9)
            out = outputs[r]
            scores = out.get("scores")
            for k, (box, label) in enumerate(zip(out["boxes"].tolist(), out["labels"].tolist())):
                score = None if scores is None else float(scores[k])
                if score is not None and score < score_threshold:
                    continue
                colour = PALETTE[(int(label) - 1) % len(PALETTE)]
                x1, y1, x2, y2 = box
                ax.add_patch(_rectangle((x1, y1), x2 - x1, y2 - y1, colour))
                text = class_names[int(label) - 1] + ("" if score is None else f" {score:.2f}")
                ax.text(x1, y1 - 1, text, color="white", fontsize=6, va="bottom",
                        bbox={"facecolor": colour, "alpha": 0.8, "pad": 1, "linewidth": 0})
    if title:
        fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)


def _rectangle(xy: tuple[float, float], w: float, h: float, colour: str):
    return Rectangle(xy, w, h, fill=False, edgecolor=colour, linewidth=1.5)


__all__ = ["draw_detections"]
