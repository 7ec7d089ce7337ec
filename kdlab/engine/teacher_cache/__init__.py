"""Teacher-output cache: the frozen teacher's logits for every view of every image, stored
rounded to float16.

The teacher never changes, and CIFAR's augmentation has 162 views per image (see
`kdlab.data.views`), so its logits can be computed once for all of them and reused by
every student, seed and hyper-parameter sweep distilled from it. Training then looks up the
logits of the view each sample drew instead of running the teacher: a KD or DKD step costs
about a student step.

The logits are fp16-rounded, not exact (at most 2^-11 relative per logit): measured on the
digits demo teacher, KD (T = 4 and 1) and DKD losses from them differ from the float32
teacher's by about 1e-5 relative per batch (at most 3e-4), their gradients by about 2e-4
(docs/speed.md, "fp16 rounding error"; `benchmarks/cache_fp16_error.py`).

Three modules: `format` (the folder layout, meta.json, identity hashes, reading and the
stale-cache checks), `build` (`build_cache`, run by `kdlab cache-teacher`) and `feed` (the
trainer's lookup by drawn view, `teacher_feed`). Continuous augmentations (RandomResizedCrop,
AutoAugment) have no finite view set and feature methods need more than logits: both are
refused.
"""
from kdlab.engine.teacher_cache.build import build_cache
from kdlab.engine.teacher_cache.feed import TeacherFeed, check_method, check_view_replay, teacher_feed
from kdlab.engine.teacher_cache.format import (
    FORMAT,
    LOGITS_FILE,
    META_FILE,
    VERSION,
    StaleCacheError,
    TeacherCache,
    expected_meta,
    open_cache,
    train_spec,
)

__all__ = [
    "FORMAT",
    "LOGITS_FILE",
    "META_FILE",
    "VERSION",
    "StaleCacheError",
    "TeacherCache",
    "TeacherFeed",
    "build_cache",
    "check_method",
    "check_view_replay",
    "expected_meta",
    "open_cache",
    "teacher_feed",
    "train_spec",
]
