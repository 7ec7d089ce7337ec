"""Feature capture shared by the wrappers of models kdlab did not write (`tv:`, `timm:`, `py:`).

A wrapper marks the modules whose output (a stage) or input (a pre-activation: the input of
a stage's final activation) it wants with `watch_output` / `watch_input`, then runs the
model inside `recording(modules)` and reads `recorded_output(m)` / `recorded_input(m)`.
Outside `recording` the hooks return at once, so a plain `model(x)` costs nothing extra.

The hooks are module-level functions and what they record lives on the watched module
itself, not in a closure: `copy.deepcopy(model)` (EMA, generations) then yields a copy whose
hooks record on the copied modules, never on the original's.

In-place operations would corrupt a kept tensor (torchvision's ResNet block does
`out += identity; relu(out)` in place, so a naive hook on that sum later holds its ReLU).
Two defences, chosen by the wrapper: `disable_inplace` switches off every module's
`inplace` flag, enough when the library's in-place work goes through modules (timm) or
the graph is rewritten (torchvision's traced graph); `copy=True` makes the hook keep a
clone, needed for user modules whose functional in-place ops kdlab cannot see.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterable, Iterator

from torch import Tensor, nn

from kdlab.errors import ConfigError, KDLabError

#: Modules treated as "a stage's final activation".
ACTIVATION_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.Hardswish, nn.SiLU, nn.GELU, nn.LeakyReLU, nn.ELU, nn.SELU,
    nn.CELU, nn.Mish, nn.PReLU, nn.Hardtanh,
)

#: The smallest down-sampling factor counted as a stage (the KD literature's stages are
#: the strides 4, 8, 16, 32 of ImageNet networks).
MIN_STAGE_STRIDE = 4

_RECORDING = "_kdlab_recording"
_OUTPUT = "_kdlab_output"
_INPUT = "_kdlab_input"


def disable_inplace(module: nn.Module) -> None:
    """Turn off `inplace` on every submodule (ReLU, Hardswish, Dropout, ...): captured
    features must not be overwritten later in the same forward."""
    for m in module.modules():
        if isinstance(getattr(m, "inplace", None), bool):
            m.inplace = False


def _keep_output(module: nn.Module, args: Any, output: Any) -> None:
    if getattr(module, _RECORDING, False):
        setattr(module, _OUTPUT, output)


def _keep_output_copy(module: nn.Module, args: Any, output: Any) -> None:
    if getattr(module, _RECORDING, False):
        setattr(module, _OUTPUT, output.clone())


def _keep_input(module: nn.Module, args: tuple[Any, ...]) -> None:
    if getattr(module, _RECORDING, False):
        setattr(module, _INPUT, args[0])


def _keep_input_copy(module: nn.Module, args: tuple[Any, ...]) -> None:
    if getattr(module, _RECORDING, False):
        setattr(module, _INPUT, args[0].clone())


def watch_output(module: nn.Module, *, copy: bool) -> None:
    """Record `module`'s output while recording (the last call wins when it runs twice)."""
    module.register_forward_hook(_keep_output_copy if copy else _keep_output)


def watch_input(module: nn.Module, *, copy: bool) -> None:
    """Record `module`'s first input while recording, taken right before it runs."""
    module.register_forward_pre_hook(_keep_input_copy if copy else _keep_input)


@contextmanager
def recording(modules: Iterable[nn.Module]) -> Iterator[None]:
    """Let the hooks of `modules` record during the block; afterwards every recorded
    tensor is dropped, so nothing outlives the forward that produced it."""
    modules = list(modules)
    for m in modules:
        setattr(m, _RECORDING, True)
    try:
        yield
    finally:
        for m in modules:
            m.__dict__.pop(_RECORDING, None)
            m.__dict__.pop(_OUTPUT, None)
            m.__dict__.pop(_INPUT, None)


def recorded_output(module: nn.Module) -> Tensor | None:
    """What `module` returned inside the current `recording` block (None: it did not run)."""
    return module.__dict__.get(_OUTPUT)


def recorded_input(module: nn.Module) -> Tensor | None:
    """What `module` received inside the current `recording` block (None: it did not run)."""
    return module.__dict__.get(_INPUT)


def pooled_vector(pooled: Tensor) -> Tensor:
    """The (N, C) vector a head reads: flattened, or averaged over space when the head's
    input is still a map (SqueezeNet)."""
    return pooled.mean((2, 3)) if pooled.dim() == 4 else pooled.flatten(1)


def no_features_error(label: str, why: str) -> KDLabError:
    """The error of a feature request to a model that has no stage features."""
    return ConfigError(
        f"model {label!r} exposes no stage features ({why}); use it with a logits-only method "
        "(kd, dkd, vanilla), or wrap it yourself with kdlab.models.adapter.wrap_model(module, "
        "stages=[...]) and name it with the py: prefix (docs/own-model.md)"
    )
