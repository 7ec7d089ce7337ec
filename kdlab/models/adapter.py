"""Any `nn.Module` classifier as a kdlab model: `wrap_model` and the `py:` prefix.

    from kdlab.models.adapter import wrap_model

    def build(num_classes: int = 10, **kwargs):
        net = MyNet(num_classes)                       # any module: images -> logits
        return wrap_model(
            net,
            stages=["block1", "block2", "block3"],     # modules whose output is a stage, shallow -> deep
            preact=["block1.act", "block2.act", None], # each stage's final activation (its INPUT is
                                                       # the pre-activation), None: pre = post
            classifier="fc",                           # the head; its input is the pooled vector
        )

and in a config: `model: {name: "py:my_models.py:build"}` (a file, relative to the working
directory) or `py:my_package.models:build` (an importable module). The function receives
`num_classes=` and the config's `model.kwargs`; `model.weights` is loaded into the
wrapped module (`wrapped.net`) with the same strict checks as torchvision/timm weights.

Features are captured by forward hooks (`kdlab.models.capture`) that CLONE what they see,
so in-place operations later in the forward (`relu_`, `+=`, `ReLU(inplace=True)`) cannot
corrupt them: a stage is its module's output copied right after the module returns, a
pre-activation is the input of the named activation copied right before it runs (when one
activation module is called several times in a forward, as torchvision's ResNet blocks
reuse `relu`, the last call counts). Hooks only record while features are requested; a
plain `model(x)` costs nothing. The raw stages are the stages (a wrapped model declares no
post-stage normalisation).
"""
from __future__ import annotations

import hashlib
import importlib
import sys
from pathlib import Path
from typing import Any, Sequence

from torch import Tensor, nn

from kdlab.errors import ConfigError
from kdlab.registry import import_file
from kdlab.models.capture import (
    pooled_vector,
    recorded_input,
    recorded_output,
    recording,
    watch_input,
    watch_output,
)
from kdlab.models.features import FeatureClassifier, Features
from kdlab.models.registry import register_prefix
from kdlab.models.weights import head_prefix, load_weights
from kdlab.registry import closest


class CustomClassifier(FeatureClassifier):
    """Wrap `net` (images -> logits) so `model(x, features=True)` returns kdlab `Features`.

    stages: names (as in `net.named_modules()`) of the modules whose outputs are the stages.
    preact: per stage, the name of the activation module whose input is that stage's
        pre-activation, or None (pre = post); default all None.
    classifier: name of the head module; the pooled vector is its input (flattened, or
        averaged over space if it is a map).
    pooled: name of a module whose output is the pooled vector (instead of the head's input).
    If neither `classifier` nor `pooled` is given, the pooled vector is the global average
    of the last stage.
    """

    def __init__(
        self,
        net: nn.Module,
        stages: Sequence[str],
        *,
        preact: Sequence[str | None] | None = None,
        classifier: str | None = None,
        pooled: str | None = None,
        input_size: tuple[int, int, int] = (3, 224, 224),
    ) -> None:
        super().__init__()
        self.net = net
        self.default_input_size = tuple(input_size)  # type: ignore[assignment]
        modules = dict(net.named_modules())
        preact = list(preact) if preact is not None else [None] * len(stages)
        if not stages:
            raise ConfigError("wrap_model: give at least one stage module name in stages=[...]")
        if len(preact) != len(stages):
            raise ConfigError(
                f"wrap_model: preact has {len(preact)} entries but stages has {len(stages)}; give one "
                "activation name (or None) per stage"
            )
        for name in [*stages, *[p for p in preact if p], *[n for n in (classifier, pooled) if n]]:
            if name not in modules or name == "":
                hint = closest(name, [m for m in modules if m])
                raise ConfigError(
                    f"wrap_model: {type(net).__name__} has no submodule {name!r}"
                    f"{f'; did you mean {hint!r}?' if hint else ''} (names as in net.named_modules())"
                )
        self.stage_names = list(stages)
        self.preact_names = preact
        self.classifier_name = classifier
        self.pooled_name = pooled
        # Plain lists of the (already registered) submodules, in a fixed order.
        self._stage_mods = [modules[n] for n in stages]
        self._preact_mods = [modules[p] if p else None for p in preact]
        self._pooled_mod = modules[pooled] if pooled else None
        self._head_mod = modules[classifier] if classifier else None
        # Copies: a user module may modify a tensor in place after kdlab has seen it.
        for m in self._stage_mods:
            watch_output(m, copy=True)
        for m in self._preact_mods:
            if m is not None:
                watch_input(m, copy=True)
        if self._pooled_mod is not None:
            watch_output(self._pooled_mod, copy=True)
        elif self._head_mod is not None:
            watch_input(self._head_mod, copy=True)

    def _watched(self) -> list[nn.Module]:
        mods = [*self._stage_mods, *[m for m in self._preact_mods if m is not None]]
        mods += [m for m in (self._pooled_mod, self._head_mod) if m is not None]
        return mods

    def get_classifier(self) -> nn.Module:
        return self._head_mod if self._head_mod is not None else nn.Identity()

    def forward_features(self, x: Tensor) -> tuple[Tensor, Features]:
        with recording(self._watched()):
            logits = self.net(x)
            stages = [recorded_output(m) for m in self._stage_mods]
            pre = [s if m is None else recorded_input(m) for m, s in zip(self._preact_mods, stages)]
            if self._pooled_mod is not None:
                pooled = recorded_output(self._pooled_mod)
            elif self._head_mod is not None:
                pooled = recorded_input(self._head_mod)
            else:
                pooled = stages[-1]
        if any(t is None for t in (*stages, *pre, pooled)):
            raise ConfigError(
                f"wrap_model: a named module did not run in {type(self.net).__name__}.forward; "
                f"check stages={self.stage_names}, preact={self.preact_names}, "
                f"classifier={self.classifier_name!r}, pooled={self.pooled_name!r}"
            )
        if not isinstance(logits, Tensor):
            raise ConfigError(
                f"wrap_model: {type(self.net).__name__}.forward must return the logits tensor, got "
                f"{type(logits).__name__}; wrap it in a module whose forward returns only the logits"
            )
        return logits, Features(stages, pre, pooled_vector(pooled))

    def forward(self, x: Tensor, features: bool = False):
        if features:
            return self.forward_features(x)
        return self.net(x)


def wrap_model(
    net: nn.Module,
    stages: Sequence[str],
    *,
    preact: Sequence[str | None] | None = None,
    classifier: str | None = None,
    pooled: str | None = None,
    input_size: tuple[int, int, int] = (3, 224, 224),
) -> CustomClassifier:
    """Make any classifier a kdlab model (see `CustomClassifier` and the module docstring)."""
    return CustomClassifier(net, stages, preact=preact, classifier=classifier, pooled=pooled,
                            input_size=input_size)


# ============================================================================ py: prefix
def _load_module(target: str, label: str):
    if target.endswith(".py"):
        path = Path(target).expanduser().resolve()
        if not path.is_file():
            raise ConfigError(f"model {label!r}: file {str(path)!r} does not exist (paths are relative "
                              "to the working directory); fix the path after 'py:'")
        key = "kdlab_user_" + hashlib.sha1(str(path).encode()).hexdigest()[:12]
        if key in sys.modules:
            return sys.modules[key]
        return import_file(path, key)
    try:
        return importlib.import_module(target)
    except ModuleNotFoundError as exc:
        if exc.name and target.startswith(exc.name) and "" not in sys.path and "." not in sys.path:
            sys.path.insert(0, "")  # the console script does not put the working directory on sys.path
            try:
                return importlib.import_module(target)
            except ModuleNotFoundError:
                pass
        raise ConfigError(f"model {label!r}: cannot import module {target!r} ({exc}); "
                          "put it on PYTHONPATH or name a file: py:path/to/file.py:function") from None


def python_model(spec: str, num_classes: int = 1000, weights: str | None = None,
                 reset_head: bool = False, **kwargs: Any) -> FeatureClassifier:
    """`py:MODULE:FUNCTION` / `py:FILE.py:FUNCTION`: a user function returning a FeatureClassifier."""
    label = f"py:{spec}"
    target, sep, attr = spec.rpartition(":")
    if not sep or not target or not attr:
        raise ConfigError(f"model {label!r}: write py:package.module:function or py:path/to/file.py:function")
    module = _load_module(target, label)
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ConfigError(f"model {label!r}: {target!r} has no function {attr!r}")
    model = fn(num_classes=num_classes, **kwargs)
    if not isinstance(model, FeatureClassifier):
        raise ConfigError(
            f"model {label!r}: {attr}() returned a {type(model).__name__}, not a kdlab FeatureClassifier; "
            "return kdlab.models.adapter.wrap_model(net, stages=[...], classifier=...) instead"
        )
    if weights:
        inner = model.net if isinstance(model, CustomClassifier) else model
        load_weights(inner, weights, label=label, head=head_prefix(inner, num_classes), reset_head=reset_head)
    return model


register_prefix("py", python_model)
