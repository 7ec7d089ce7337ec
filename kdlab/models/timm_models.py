"""timm models as kdlab models: the `timm:NAME` prefix (timm is an optional dependency).

    create_model("timm:convnext_atto", num_classes=10, weights="w.safetensors", reset_head=True)

Weights are never downloaded: `weights=PATH` loads a local state dict with timm's key names;
`reset_head=True` keeps a head of another class count out of the load
(`kdlab.models.weights`). Other keyword arguments go to `timm.create_model`.

Stage features come from `forward_intermediates` (the API behind `features_only`) at the
`feature_info` entries of reduction 4, 8, 16, 32 (the last one per reduction), and the
pooled vector from `forward_head(x, pre_logits=True)`. timm returns no pre-activation
features: kdlab finds, with one dummy forward at construction, the activation module that
produces each stage's output (e.g. `layer1.1.act2` in a timm ResNet) and records its input
with a forward pre-hook (`kdlab.models.capture`). Stages that end without an activation
(ConvNeXt: a stage ends with the residual add) have pre = post. The raw stages are the
stages (kdlab looks for no post-stage normalisation here). Every module's `inplace` flag is
switched off, so the recorded inputs stay intact without a copy.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from kdlab.errors import ConfigError
from kdlab.models.capture import (
    ACTIVATION_MODULES,
    MIN_STAGE_STRIDE,
    disable_inplace,
    no_features_error,
    pooled_vector,
    recorded_input,
    recording,
    watch_input,
)
from kdlab.models.features import FeatureClassifier, Features
from kdlab.models.registry import register_prefix
from kdlab.models.weights import load_weights
from kdlab.registry import closest


def _import_timm(label: str):
    try:
        import timm  # lazy: optional, and slow to import: only when a timm: model is built
    except ImportError:
        raise ConfigError(
            f"model {label!r} needs the optional package timm, which is not installed; "
            "install it with: pip install 'kdlab[timm]' (or pip install timm)"
        ) from None
    return timm


class TimmClassifier(FeatureClassifier):
    """A timm model with stage features from `forward_intermediates` (see module docstring).

    `self.net` is the timm model itself, so the state dict is timm's prefixed by `net.`.
    `stage_modules` / `preact_modules` name what was found for each stage.
    """

    default_input_size = (3, 224, 224)

    def __init__(self, net: nn.Module, label: str) -> None:
        super().__init__()
        self.label = label
        disable_inplace(net)
        self.net = net
        self._why_no_features = ""
        self._preact_mods: list[nn.Module | None] = []
        self._classifier_is_head = True
        self.indices: list[int] = []
        self.stage_modules: list[str] = []
        self.preact_modules: list[str | None] = []
        if not hasattr(net, "forward_intermediates"):
            self._why_no_features = "this timm model has no forward_intermediates"
            return
        info = list(getattr(net, "feature_info", None) or [])
        last_by_reduction: dict[int, int] = {}
        for i, entry in enumerate(info):
            if int(entry.get("reduction", 0)) >= MIN_STAGE_STRIDE:
                last_by_reduction[int(entry["reduction"])] = i
        self.indices = sorted(last_by_reduction.values())
        if not self.indices:
            self._why_no_features = f"its feature_info lists no stage of stride >= {MIN_STAGE_STRIDE}"
            return
        self.stage_modules = [str(info[i]["module"]) for i in self.indices]
        self._discover_preact()
        # Plain list (not a ModuleList: these modules are registered under self.net already);
        # deepcopy maps it onto the copied modules, whose hook is the same stateless function.
        self._preact_mods = [self.net.get_submodule(n) if n else None for n in self.preact_modules]
        for module in self._preact_mods:
            if module is not None:
                watch_input(module, copy=False)  # inplace is off: no copy needed

    @torch.no_grad()
    def _discover_preact(self) -> None:
        """One dummy forward: which activation module outputs each stage's tensor."""
        last: dict[int, tuple[str, Tensor]] = {}
        handles = []
        for j, stage_name in enumerate(self.stage_modules):
            for sub, module in self.net.get_submodule(stage_name).named_modules():
                if isinstance(module, ACTIVATION_MODULES):
                    full = f"{stage_name}.{sub}"

                    def record(m, a, out, j=j, full=full):
                        last[j] = (full, out)

                    handles.append(module.register_forward_hook(record))
        was_training = self.net.training
        self.net.eval()
        try:
            size = tuple(self.net.pretrained_cfg.get("input_size", (3, 224, 224)))
            side = 64 if min(size[1:]) >= 64 else min(size[1:])
            try:
                x = torch.zeros(1, 3, side, side)
                final, inters = self.net.forward_intermediates(x, indices=self.indices)
            except Exception:  # models with a fixed input size
                x = torch.zeros(1, *size)
                final, inters = self.net.forward_intermediates(x, indices=self.indices)
            pooled = pooled_vector(self.net.forward_head(final, pre_logits=True))
            head_out = self.net.forward_head(final)
            self._classifier_is_head = bool(torch.allclose(self.net.get_classifier()(pooled), head_out, atol=1e-5))
        finally:
            self.net.train(was_training)
            for h in handles:
                h.remove()
        self.preact_modules = [
            last[j][0] if j in last and last[j][1] is inters[j] else None
            for j in range(len(self.indices))
        ]

    def get_classifier(self) -> nn.Module:
        return self.net.get_classifier()

    def forward_features(self, x: Tensor) -> tuple[Tensor, Features]:
        if not self.indices:
            raise no_features_error(self.label, self._why_no_features)
        watched = [m for m in self._preact_mods if m is not None]
        with recording(watched):
            final, stages = self.net.forward_intermediates(x, indices=self.indices)
            found = [None if m is None else recorded_input(m) for m in self._preact_mods]
        pre = [s if p is None else p for p, s in zip(found, stages)]  # None: pre = post
        pooled = pooled_vector(self.net.forward_head(final, pre_logits=True))
        if self._classifier_is_head:
            logits = self.net.get_classifier()(pooled)  # one head pass: pooled and logits agree
        else:
            logits = self.net.forward_head(final)
        return logits, Features(list(stages), pre, pooled)

    def forward(self, x: Tensor, features: bool = False):
        if features:
            return self.forward_features(x)
        return self.net(x)


def timm_model(name: str, num_classes: int = 1000, weights: str | None = None,
               reset_head: bool = False, **kwargs: Any) -> TimmClassifier:
    """`timm:NAME`: any timm model, random init or a local weight file (timm's key names)."""
    label = f"timm:{name}"
    timm = _import_timm(label)
    if not timm.is_model(name):
        hint = closest(name, timm.list_models())
        similar = timm.list_models(f"*{name.split('_')[0]}*")[:12]
        raise ConfigError(
            f"unknown timm model {label!r}.{f' Did you mean timm:{hint}?' if hint else ''} "
            f"Similar names: {', '.join(similar) or 'none'} (timm.list_models() lists all)"
        )
    if kwargs.pop("pretrained", False) or kwargs.get("pretrained_cfg_overlay"):
        raise ConfigError(f"{label}: kdlab never downloads weights; set model.weights to a local file instead")
    try:
        net = timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)
    except TypeError as exc:
        raise ConfigError(f"{label} does not accept model.kwargs {sorted(kwargs)}: {exc}; remove them") from None
    if weights:
        classifier = net.get_classifier()
        head = next((q for q, module in net.named_modules() if module is classifier), None)
        load_weights(net, weights, label=label, head=head, reset_head=reset_head)
    return TimmClassifier(net, label)


register_prefix("timm", timm_model)
