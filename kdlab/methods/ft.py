"""FT: a paraphraser first learns to reconstruct the teacher's last feature map, then the student
and a translator learn to produce the paraphraser's factors (Kim, Park, Kwak, "Paraphrasing
Complex Network: Network Compression via Factor Transfer", NeurIPS 2018).

As in the CRD benchmark (RepDistiller `--distill factor`, PAPERS.md section 6), in two phases
owned by the method (`kdlab.methods.phases`):

- init phase, epochs 1..init_epochs (30): the paraphraser alone learns the reconstruction loss
  on the teacher's last stage output (RepDistiller `feat_t[-2]`: `Features.raw_stages[-1]`); the
  student does not run (no training accuracy in these epochs);
- main phase: ce_weight * CE + ft_weight * L_FT(translator(student's last stage output),
  paraphraser encoder(teacher's)); the paraphraser is frozen (run without gradients: the
  reference leaves it out of its optimizer), the translator trains with the student.

The paraphraser and translator are RepDistiller's `Paraphraser` (three 3x3 convs down to
`rate` x the teacher's channels and three transposed convs back, LeakyReLU 0.1, no batch norm) and
`Translator` (three 3x3 convs from the student's channels to the same factor width, with batch
norm), sized at construction from one dummy forward of each network.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, NonNegativeFloat
from torch import Tensor, nn

from kdlab.schema.experiment import MethodConfig
from kdlab.errors import ConfigError
from kdlab.losses import cross_entropy
from kdlab.losses.ft import ft_loss, reconstruction_loss
from kdlab.methods import register_method
from kdlab.methods.base import Batch, StepOutput
from kdlab.methods.phases import InitPhaseConfig, PhasedDistiller
from kdlab.methods.stages import probe_pair


class FTConfig(InitPhaseConfig):
    # RepDistiller: -r 1 -b 200 (main phase); the init phase's MSE is unweighted; rate k = 0.5.
    name: Literal["ft"] = "ft"
    ce_weight: NonNegativeFloat = 1.0
    ft_weight: NonNegativeFloat = 200.0
    reconstruction_weight: NonNegativeFloat = 1.0
    rate: float = Field(default=0.5, gt=0.0, le=1.0, description="factor channels / teacher channels (k)")


def conv_stack(channels: list[int], *, transposed: bool = False, batch_norm: bool = False) -> nn.Sequential:
    """3x3, stride 1, padding 1 (transposed) convs through `channels`, each followed by batch norm
    (optionally) and LeakyReLU(0.1): the blocks of RepDistiller's Paraphraser and Translator."""
    conv = nn.ConvTranspose2d if transposed else nn.Conv2d
    layers: list[nn.Module] = []
    for cin, cout in zip(channels[:-1], channels[1:]):
        layers += [conv(cin, cout, 3, 1, 1), nn.BatchNorm2d(cout) if batch_norm else nn.Identity(), nn.LeakyReLU(0.1)]
    return nn.Sequential(*layers)


class Paraphraser(nn.Module):
    """RepDistiller `Paraphraser(t_shape, k, use_bn=False)`: encoder C -> C -> kC -> kC, decoder
    kC -> kC -> C -> C."""

    def __init__(self, channels: int, factor_channels: int) -> None:
        super().__init__()
        self.encoder = conv_stack([channels, channels, factor_channels, factor_channels])
        self.decoder = conv_stack([factor_channels, factor_channels, channels, channels], transposed=True)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(the factor, the reconstruction)."""
        factor = self.encoder(x)
        return factor, self.decoder(factor)


def translator(channels: int, factor_channels: int) -> nn.Sequential:
    """RepDistiller `Translator(s_shape, t_shape, k, use_bn=True)`: C_s -> C_s -> kC_t -> kC_t."""
    return conv_stack([channels, channels, factor_channels, factor_channels], batch_norm=True)


@register_method("ft")
class FT(PhasedDistiller):
    """Paraphraser init phase, then factor transfer through a translator."""

    Config = FTConfig
    needs_teacher_features = True
    loss_names = ("ce", "ft", "reconstruction")

    def __init__(self, student: nn.Module, teacher: nn.Module | None, cfg: MethodConfig, *,
                 input_size: tuple[int, int, int] = (3, 32, 32), num_classes: int | None = None) -> None:
        super().__init__(student, teacher, cfg, input_size=input_size, num_classes=num_classes)
        c: FTConfig = cfg  # type: ignore[assignment]
        s_info, t_info = probe_pair("ft", student, teacher, self.input_size)
        s, t = s_info.raw_stages[-1], t_info.raw_stages[-1]
        factor_channels = int(t.channels * c.rate)
        if factor_channels < 1:
            raise ConfigError(
                f"FT's factor has int({t.channels} teacher channels x method.rate {c.rate}) = 0 channels; "
                f"raise method.rate to at least {1 / t.channels:.3g}"
            )
        self.paraphraser = Paraphraser(t.channels, factor_channels)
        self.translator = translator(s.channels, factor_channels)

    def forward_train(self, batch: Batch, epoch: int) -> StepOutput:
        cfg: FTConfig = self.cfg  # type: ignore[assignment]
        _, t = self.teacher_forward(batch.images, features=True)
        teacher_map = t.raw_stages[-1]
        if self.in_init_phase(epoch):
            _, rec = self.paraphraser(teacher_map)
            logits = None
            active = {"reconstruction": cfg.reconstruction_weight * reconstruction_loss(rec, teacher_map)}
        else:
            logits, s = self.student(batch.images, features=True)
            with torch.no_grad():  # the paraphraser is frozen after the init phase
                teacher_factor = self.paraphraser.encoder(teacher_map)
            active = {
                "ce": cfg.ce_weight * cross_entropy(logits, batch.targets),
                "ft": cfg.ft_weight * ft_loss(self.translator(s.raw_stages[-1]), teacher_factor),
            }
        return self.output(logits, active, epoch)


__all__ = ["FT", "FTConfig", "Paraphraser", "translator"]
