"""Model zoo: the CIFAR/ImageNet architectures of the KD literature, with stage features.

Public API: `create_model`, `list_models`, `feature_info`, `Features`, `FeatureClassifier`.
"""
from kdlab.models.features import FeatureClassifier, FeatureInfo, Features, StageInfo, feature_info
from kdlab.models.registry import MODELS, create_model, list_models, register_model, register_prefix

# Importing the zoo modules registers their constructors.
from kdlab.models import zoo as _zoo  # noqa: F401,E402
# Prefixes tv:/timm:/py:/det: (torchvision, timm, custom modules, torchvision's detectors); their
# libraries load lazily.
from kdlab.models import adapter as _adapter  # noqa: F401,E402
from kdlab.models import timm_models as _timm_models  # noqa: F401,E402
from kdlab.models import torchvision_models as _torchvision_models  # noqa: F401,E402
# det: is registered here too, so that the registry does not depend on what the caller imported
# first (`kdlab train` of a detection config, for example).
from kdlab.models import detection as _detection  # noqa: F401,E402

__all__ = [
    "FeatureClassifier",
    "FeatureInfo",
    "Features",
    "StageInfo",
    "feature_info",
    "MODELS",
    "create_model",
    "list_models",
    "register_model",
    "register_prefix",
]
