"""torchvision classifiers as kdlab models: the `tv:NAME` prefix.

    create_model("tv:resnet18", num_classes=10)                   # random init
    create_model("tv:resnet34", num_classes=1000, weights="resnet34.pth")

Weights are never downloaded: `weights=PATH` (the config's `model.weights`) loads a local
state dict; `reset_head=True` keeps a head of another class count out of the load
(`kdlab.models.weights`). Other keyword arguments go to torchvision's constructor.

Stage features come from `torchvision.models.feature_extraction` (torch.fx), so every
torchvision CNN is handled by one rule. The model is traced once, node shapes are
propagated on a 128x128 dummy input, and the stages are the last node of each child of the
trunk (`features`, `layers` or `trunk_output` when the model has one, else the model's own
children) at every resolution of stride 4 or more: for a ResNet `layer1`..`layer4`, for
MobileNet/EfficientNet/ConvNeXt the last `features.N` block before each down-sampling. The
pre-activation of a stage is the input of its final activation when the stage ends with
one (`layerK.<last>.add` for ResNets; the BN before the final ReLU6/Hardswish of a
MobileNet's last block, reachable because `open_sequential_leaves` lets the tracer into
`Conv2dNormActivation`); a stage that ends without an activation (MobileNetV2/V3 linear
bottlenecks, ConvNeXt) has pre = post. A single activation applied right after the trunk
(DenseNet's `relu` after `norm5`) is absorbed into the last stage. The raw stages are the
stages (kdlab looks for no post-stage normalisation here). The pooled vector is the input
of the head module (`fc`, `classifier`, `head`), averaged over space if it is still a map.
Transformers (`vit_*`, `swin_*`, `maxvit_*`) are logits-only: KD and DKD work, stage
methods do not.

In-place safety: every module's `inplace` flag is switched off (`capture.disable_inplace`)
and the traced graph's in-place functional calls are rewritten out of place, so the
extractor's outputs are the values the next operation consumed;
`tests/test_external_models.py` checks the pre-activations against a recomputation.
"""
from __future__ import annotations

import logging
import operator
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdlab.errors import ConfigError
from kdlab.models.capture import (
    ACTIVATION_MODULES,
    MIN_STAGE_STRIDE,
    disable_inplace,
    no_features_error,
    pooled_vector,
)
from kdlab.models.features import FeatureClassifier, Features
from kdlab.models.registry import register_prefix
from kdlab.models.weights import head_prefix, load_weights
from kdlab.registry import closest

log = logging.getLogger("kdlab")

#: Functions treated as "the stage's final activation" in traced graphs.
ACTIVATION_FUNCTIONS: set[Callable[..., Any]] = {
    F.relu, torch.relu, F.relu6, F.hardswish, F.silu, F.gelu, F.leaky_relu, F.elu, F.selu,
    F.celu, F.mish, F.hardtanh,
}
#: In-place functions rewritten to their out-of-place twins in traced graphs.
INPLACE_FUNCTIONS: dict[Callable[..., Any], Callable[..., Any]] = {
    torch.relu_: torch.relu, F.relu_: F.relu, operator.iadd: operator.add,
    operator.imul: operator.mul,
}
INPLACE_METHODS = {"relu_": "relu", "add_": "add", "mul_": "mul", "clamp_": "clamp"}

#: Stage discovery: side of the dummy input; trunk and head module names; logits-only families.
_DISCOVERY_SIDE = 128
_TRUNKS = ("features", "layers", "trunk_output")
_HEADS = ("fc", "classifier", "head", "heads")
_LOGITS_ONLY = ("vit_", "swin_", "swin3d", "maxvit_")

@dataclass(frozen=True)
class StageNodes:
    """torch.fx node names (torchvision's naming) of the tensors a TorchvisionClassifier returns."""

    post: tuple[str, ...]
    pre: tuple[str, ...]
    pooled: str
    logits: str
    head: str


def _is_activation(node: Any, root: nn.Module) -> bool:
    if node.op == "call_module":
        try:
            return isinstance(root.get_submodule(node.target), ACTIVATION_MODULES)
        except AttributeError:
            return False
    if node.op == "call_function":
        return node.target in ACTIVATION_FUNCTIONS or node.target in (torch.relu_, F.relu_)
    if node.op == "call_method":
        return node.target in ("relu", "relu_")
    return False


def discover_stage_nodes(net: nn.Module, side: int = _DISCOVERY_SIDE) -> StageNodes:
    """Trace `net` with torchvision's node naming and pick its stage, pooled and logit nodes.

    Raises ValueError with the reason when the model cannot be traced or has no stages.
    """
    # torchvision is imported when a tv: model is built, not with kdlab.models: keeps
    # `kdlab --help` fast.
    from torch.fx import GraphModule  # lazy: FX tracing only for tv: models
    from torch.fx.passes.shape_prop import ShapeProp  # lazy: FX tracing only for tv: models
    from torchvision.models.feature_extraction import NodePathTracer, _set_default_tracer_kwargs  # lazy: FX tracing only for tv: models

    was_training = net.training
    net.eval()
    try:
        tracer = NodePathTracer(**_set_default_tracer_kwargs(None))
        graph = tracer.trace(net)
        param = next(net.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        with torch.no_grad():
            ShapeProp(GraphModule(tracer.root, graph)).propagate(torch.zeros(1, 3, side, side, device=device))
    except Exception as exc:  # dynamic control flow, fixed input sizes, ...
        raise ValueError(f"torch.fx could not trace it: {type(exc).__name__}: {str(exc)[:200]}") from None
    finally:
        net.train(was_training)
    qual = tracer.node_to_qualname
    nodes = [n for n in graph.nodes if n in qual]

    def shape(node: Any) -> tuple[int, ...] | None:
        meta = node.meta.get("tensor_meta")
        return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None

    def last_node_of(prefix: str) -> Any:
        found = None
        for n in nodes:
            q = qual[n]
            if q == prefix or q.startswith(prefix + "."):
                found = n
        return found

    children = dict(net.named_children())
    trunk = next((t for t in _TRUNKS if t in children and len(list(children[t].children())) >= 2), None)
    names = ([f"{trunk}.{c}" for c, _ in children[trunk].named_children()] if trunk
             else list(children))
    by_resolution: dict[int, Any] = {}
    for name in names:
        node = last_node_of(name)
        s = shape(node) if node is not None else None
        if s is None or len(s) != 4 or s[2] <= 1 or side // s[2] < MIN_STAGE_STRIDE:
            continue
        by_resolution[s[2]] = node  # later children at the same resolution win
    if not by_resolution:
        raise ValueError("no convolutional feature maps of stride >= 4 were found")
    order = {n: i for i, n in enumerate(nodes)}
    posts = sorted(by_resolution.values(), key=order.__getitem__)
    post_names, pre_names = [], []
    for node in posts:
        users = list(node.users)
        if _is_activation(node, net) and node.args and node.args[0] in qual:
            pre, post = node.args[0], node
        elif len(users) == 1 and users[0] in qual and _is_activation(users[0], net) and shape(users[0]) == shape(node):
            pre, post = node, users[0]  # e.g. DenseNet: F.relu(features) after the trunk
        else:
            pre = post = node
        post_names.append(qual[post])
        pre_names.append(qual[pre])
    head = next((h for h in _HEADS if h in children), None)
    if head is None:
        raise ValueError(f"no classifier head module (looked for {', '.join(_HEADS)})")
    first_head = next(n for n in nodes if qual[n] == head or qual[n].startswith(head + "."))
    pooled = first_head.args[0] if first_head.args else None
    output = next(n for n in graph.nodes if n.op == "output")
    logits = output.args[0]
    if pooled not in qual or logits not in qual:
        raise ValueError("its head input or output is not a single tensor")
    return StageNodes(tuple(post_names), tuple(pre_names), qual[pooled], qual[logits], head)


def open_sequential_leaves(net: nn.Module) -> None:
    """torchvision's tracer keeps every `torchvision.ops` module as one opaque node, among
    them `Conv2dNormActivation` (conv + BN + activation), which ends many MobileNet,
    EfficientNet and RegNet stages: its BN output, the stage's pre-activation, would be out
    of reach. Such modules are plain Sequentials (no forward of their own), so they are
    re-typed as `nn.Sequential`; the computation and the state-dict keys stay the same."""
    for m in net.modules():
        cls = type(m)
        if cls is not nn.Sequential and isinstance(m, nn.Sequential) and cls.forward is nn.Sequential.forward \
                and cls.__module__.startswith("torchvision.ops"):
            m.__class__ = nn.Sequential


def _rewrite_inplace(graph: Any) -> None:
    for node in graph.nodes:
        if node.kwargs.get("inplace") is True:
            node.kwargs = {**node.kwargs, "inplace": False}
        if node.op == "call_function" and node.target in INPLACE_FUNCTIONS:
            node.target = INPLACE_FUNCTIONS[node.target]
        elif node.op == "call_method" and node.target in INPLACE_METHODS:
            node.target = INPLACE_METHODS[node.target]


class TorchvisionClassifier(FeatureClassifier):
    """A torchvision classifier whose forward is its `create_feature_extractor` graph.

    `self.net` is the extractor (a GraphModule holding the model's own submodules under
    their original names, so its state dict is the torchvision one prefixed by `net.`).
    It returns the logits and, in the same forward, the stage, pre-activation and pooled
    tensors (`self.nodes` names them). Models that cannot be traced keep `net` as is and
    are logits-only.
    """

    default_input_size = (3, 224, 224)

    def __init__(self, net: nn.Module, label: str) -> None:
        super().__init__()
        from torchvision.models.feature_extraction import create_feature_extractor  # lazy: --help speed

        self.label = label
        disable_inplace(net)
        open_sequential_leaves(net)
        self.nodes: StageNodes | None = None
        self._why_no_features = ""
        if label.split(":", 1)[-1].startswith(_LOGITS_ONLY):
            self._why_no_features = "transformers have no convolutional stages"
        else:
            try:
                self.nodes = discover_stage_nodes(net)
            except ValueError as exc:
                self._why_no_features = str(exc)
                log.warning("%s: %s; only its logits are available", label, exc)
        if self.nodes is None:
            self.net = net
            return
        nodes = self.nodes
        wanted = [*nodes.post, *nodes.pre, nodes.pooled, nodes.logits]
        self._keys = {name: f"t{i}" for i, name in enumerate(dict.fromkeys(wanted))}
        was_training = net.training
        extractor = create_feature_extractor(net, return_nodes=dict(self._keys))
        for graph in (extractor.train_graph, extractor.eval_graph):
            _rewrite_inplace(graph)
        extractor.graph = extractor.train_graph if extractor.training else extractor.eval_graph  # recompile
        extractor.train(was_training)
        self.net = extractor

    def get_classifier(self) -> nn.Module:
        if self.nodes is not None:
            return self.net.get_submodule(self.nodes.head)
        children = dict(self.net.named_children())
        return next((children[h] for h in _HEADS if h in children), nn.Identity())

    def forward_features(self, x: Tensor) -> tuple[Tensor, Features]:
        if self.nodes is None:
            raise no_features_error(self.label, self._why_no_features)
        out = self.net(x)
        k, n = self._keys, self.nodes
        stages = [out[k[name]] for name in n.post]
        pre = [out[k[name]] for name in n.pre]
        return out[k[n.logits]], Features(stages, pre, pooled_vector(out[k[n.pooled]]))

    def forward(self, x: Tensor, features: bool = False):
        if features:
            return self.forward_features(x)
        if self.nodes is None:
            return self.net(x)
        return self.net(x)[self._keys[self.nodes.logits]]


def torchvision_model(name: str, num_classes: int = 1000, weights: str | None = None,
                      reset_head: bool = False, **kwargs: Any) -> TorchvisionClassifier:
    """`tv:NAME`: any torchvision classification model, random init or a local weight file."""
    import torchvision  # lazy: keeps `kdlab --help` fast
    from torchvision import models

    label = f"tv:{name}"
    names = sorted(models.list_models(module=models))
    if name not in names:
        hint = closest(name, names)
        raise ConfigError(
            f"unknown torchvision classifier {label!r}.{f' Did you mean tv:{hint}?' if hint else ''} "
            f"torchvision {torchvision.__version__} has: {', '.join(names)}"
        )
    if kwargs.pop("pretrained", False):
        raise ConfigError(f"{label}: kdlab never downloads weights; set model.weights to a local file instead")
    if name in ("googlenet", "inception_v3"):
        kwargs.setdefault("aux_logits", False)  # one logits tensor in train mode too
        kwargs.setdefault("init_weights", True)
    try:
        net = models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
    except TypeError as exc:
        raise ConfigError(f"{label} does not accept model.kwargs {sorted(kwargs)}: {exc}; remove them") from None
    if weights:
        load_weights(net, weights, label=label, head=head_prefix(net, num_classes), reset_head=reset_head)
    return TorchvisionClassifier(net, label)


register_prefix("tv", torchvision_model)
