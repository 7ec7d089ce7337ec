"""Loss functions: pure functions of tensors, one file per paper.

Each function's docstring names the paper and equation it implements.
"""
from kdlab.losses.kd import cross_entropy, kd_loss, reduce_loss, teacher_target_confidence
from kdlab.losses.dkd import DKDTerms, dkd_loss, dkd_terms, nckd_loss, tckd_loss

__all__ = ["cross_entropy", "kd_loss", "reduce_loss", "teacher_target_confidence"]
__all__ += ["DKDTerms", "dkd_loss", "dkd_terms", "nckd_loss", "tckd_loss"]

from kdlab.losses.tolerant import (  # noqa: E402
    confidence_penalty_loss,
    label_smoothing_loss,
    prediction_entropy,
    tolerant_teacher_loss,
    tsd_loss,
)

__all__ += ["confidence_penalty_loss", "label_smoothing_loss", "prediction_entropy",
            "tolerant_teacher_loss", "tsd_loss"]

from kdlab.losses.hcl import HCL_POOL_SIZES, hcl_level, hcl_level_losses, hcl_loss  # noqa: E402

__all__ += ["HCL_POOL_SIZES", "hcl_level", "hcl_level_losses", "hcl_loss"]

from kdlab.losses.fitnet import hint_loss  # noqa: E402

__all__ += ["hint_loss"]

from kdlab.losses.crd import (  # noqa: E402
    NCE_EPS,
    contrast_indices,
    contrast_logits,
    crd_nce_loss,
    init_memory,
    momentum_update,
    nce_log_normalizer,
    negative_pool,
)

__all__ += ["NCE_EPS", "contrast_indices", "contrast_logits", "crd_nce_loss", "init_memory",
            "momentum_update", "nce_log_normalizer", "negative_pool"]
