"""The activation-boundary loss of Heo, Lee, Yun, Choi, "Knowledge Transfer via Distillation of
Activation Boundaries Formed by Hidden Neurons", AAAI 2019 (arXiv 1811.03233).

The paper transfers whether each teacher neuron is active (its pre-activation > 0) and replaces
the non-differentiable agreement of activations by its alternative loss (Sec. 3.2), a squared
hinge with margin mu on the student's connected pre-activation s = r(S(I)) given the teacher's
pre-activation t = T(I):

    L(I) = || rho(t) * relu(mu - s) + (1 - rho(t)) * relu(mu + s) ||_2^2,    rho(t) = [t > 0]

As in the CRD benchmark (RepDistiller `distiller_zoo/AB.py`, from the authors' code
bhheo/AB_distillation), whose numbers kdlab reproduces: mu = 1, the squared norm summed over
every element of a stage's map and divided by the batch size, stage i of n weighted 2^(i-n+1)
(the deepest stage 1, each shallower one half the next), and the sum scaled by 3 / 1000.
"""
from __future__ import annotations

from typing import Sequence

from torch import Tensor

from kdlab.losses.kd import loss_dtype

#: The reference's overall scale, `loss / 1000 * 3`.
AB_SCALE = 3.0 / 1000.0


def activation_boundary_loss(student: Tensor, teacher: Tensor, margin: float = 1.0) -> Tensor:
    """The alternative loss of Heo et al. (Sec. 3.2) of one map, summed over all elements: for
    each neuron, (s + margin)^2 where the teacher is inactive (t <= 0) but s > -margin, and
    (s - margin)^2 where the teacher is active (t > 0) but s <= margin. `student` is the
    connected pre-activation map, `teacher` the teacher's (same shape, a constant). Computed in
    float32 (float64 stays float64)."""
    if student.shape != teacher.shape:
        raise ValueError(
            "the activation-boundary loss needs the connected student map and the teacher's map in "
            f"the same shape, got {tuple(student.shape)} and {tuple(teacher.shape)}"
        )
    dtype = loss_dtype(student, teacher)
    s, active = student.to(dtype), teacher.detach() > 0
    off = (s + margin).pow(2) * ((s > -margin) & ~active)
    on = (s - margin).pow(2) * ((s <= margin) & active)
    return (off + on).sum()


def ab_loss(student_maps: Sequence[Tensor], teacher_maps: Sequence[Tensor], margin: float = 1.0) -> Tensor:
    """The AB loss of the CRD benchmark: sum over stages i = 0..n-1 (shallow to deep) of
    2^(i-n+1) * activation_boundary_loss_i / batch size, times 3 / 1000."""
    if len(student_maps) != len(teacher_maps) or not student_maps:
        raise ValueError(
            f"the AB loss needs as many student as teacher maps, got {len(student_maps)} and {len(teacher_maps)}"
        )
    n, batch = len(student_maps), student_maps[0].shape[0]
    total = None
    for i, (s, t) in enumerate(zip(student_maps, teacher_maps)):
        term = 2.0 ** (i - n + 1) * activation_boundary_loss(s, t, margin)
        total = term if total is None else total + term
    return total / batch * AB_SCALE  # type: ignore[operator]


__all__ = ["AB_SCALE", "ab_loss", "activation_boundary_loss"]
