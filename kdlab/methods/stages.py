"""Which feature tensors a feature method distils: probing a pair's feature shapes, choosing a
stage by its 1-based number, pairing the student's stages with the teacher's. One home for what
the feature baselines (FitNet, AT, NST, SP, PKT, RKD, CC, VID, KDSVD, OFD, AB, FT, FSP) share, each
refusal one ConfigError that names the pair and the fix."""
from __future__ import annotations

from typing import Literal, Sequence

from torch import nn

from kdlab.errors import ConfigError
from kdlab.models import FeatureInfo, StageInfo, feature_info


def model_name(model: nn.Module) -> str:
    """The model's registry label where it has one, else its class name: how errors name it."""
    return getattr(model, "label", None) or type(model).__name__


def describe_stages(model: nn.Module, stages: Sequence[StageInfo]) -> str:
    """`Name (3 stages: 64x32x32, ...)`, to name a model in an error."""
    shapes = ", ".join(f"{s.channels}x{s.height}x{s.width}" for s in stages)
    return f"{model_name(model)} ({len(stages)} stages: {shapes or 'none'})"


def probe_pair(method: str, student: nn.Module, teacher: nn.Module | None,
               input_size: tuple[int, ...]) -> tuple[FeatureInfo, FeatureInfo]:
    """Both networks' feature shapes from one dummy forward each, or one ConfigError that names
    the method, the pair and why it cannot serve it."""
    assert teacher is not None
    try:
        return (feature_info(student, tuple(input_size)),  # type: ignore[arg-type]
                feature_info(teacher, tuple(input_size)))  # type: ignore[arg-type]
    except ConfigError as exc:
        raise ConfigError(f"method {method} cannot distil {model_name(teacher)} -> {model_name(student)}: "
                          f"{exc}") from None


def stage_shape(model: nn.Module, role: str, stage: int, option: str, input_size: tuple[int, ...]) -> StageInfo:
    """Shape of `model`'s raw stage `stage` (1-based), from one dummy forward, or a ConfigError."""
    stages = feature_info(model, tuple(input_size)).raw_stages  # type: ignore[arg-type]
    if not 1 <= stage <= len(stages):
        shapes = ", ".join(f"{i + 1}: {s.channels}x{s.height}x{s.width}" for i, s in enumerate(stages))
        raise ConfigError(
            f"method.{option}={stage} is not a stage of the {role} ({type(model).__name__}), whose "
            f"stages are {shapes or 'none'}; choose one of 1..{len(stages)}"
        )
    return stages[stage - 1]


def paired_stages(method: str, student: nn.Module, teacher: nn.Module, s_info: Sequence[StageInfo],
                  t_info: Sequence[StageInfo], student_stages: list[int] | None, teacher_stages: list[int] | None,
                  unchosen: Literal["every", "deepest"]) -> tuple[list[int], list[int]]:
    """0-based indices into the two stage lists `s_info` / `t_info`, paired one to one in order:
    the chosen 1-based lists; for a null list, every stage of that network (`unchosen="every"`,
    AT and NST: the references zip every stage) or its deepest stages, as many as the other list
    pairs, the min of the two counts when both are null (`"deepest"`, OFD: mdistiller's
    `_align_list`). A ConfigError names the pair and why when a stage does not exist or the two
    lists differ in length."""
    pair = f"student {describe_stages(student, s_info)}, teacher {describe_stages(teacher, t_info)}"
    given = student_stages if student_stages is not None else teacher_stages
    count = len(given) if given is not None else min(len(s_info), len(t_info))
    chosen = []
    for role, info, picked in (("student", s_info, student_stages), ("teacher", t_info, teacher_stages)):
        if picked is not None:
            numbers = list(picked)
        elif unchosen == "every":
            numbers = list(range(1, len(info) + 1))
        else:
            numbers = list(range(len(info) - count + 1, len(info) + 1))
        if not numbers or any(not 1 <= i <= len(info) for i in numbers):
            raise ConfigError(
                f"{method}: method.{role}_stages={picked if picked is not None else numbers} is not a non-empty "
                f"list of the {role}'s stages ({pair}); the {role} has stages 1..{len(info)}: choose stages "
                f"from 1..{len(info)}, as many for both networks"
            )
        chosen.append([i - 1 for i in numbers])
    if len(chosen[0]) != len(chosen[1]):
        raise ConfigError(
            f"{method} pairs the student's and the teacher's stages one to one, but it would pair "
            f"{len(chosen[0])} student stages with {len(chosen[1])} teacher stages ({pair}), lists of different "
            "lengths; set method.student_stages and method.teacher_stages to lists of equal length"
        )
    return chosen[0], chosen[1]


__all__ = ["describe_stages", "model_name", "paired_stages", "probe_pair", "stage_shape"]
