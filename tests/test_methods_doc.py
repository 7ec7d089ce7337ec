"""docs/methods.md's worked example is a real method: it registers, loads from a config, trains
end to end through the trainer, and its loss behaves as documented."""
from __future__ import annotations

import math
import re
import sys
import types
from pathlib import Path

import pytest
import torch

from kdlab.config import load_config
from kdlab.engine.checkpoint import Checkpoint
from kdlab.engine.trainer import Trainer
from kdlab.methods import METHODS
from kdlab.methods.base import Batch

DOC = Path(__file__).resolve().parents[1] / "docs" / "methods.md"


@pytest.fixture(scope="module")
def example():
    """Execute the documented method file once, registering `attention` for this module only."""
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    source = next(b for b in blocks if "@register_method(\"attention\")" in b)
    module = types.ModuleType("docs_methods_example")
    sys.modules[module.__name__] = module  # pydantic resolves the config's annotations there
    try:
        exec(compile(source, str(DOC), "exec"), module.__dict__)  # noqa: S102 - our own documentation
        yield module.__dict__
    finally:
        sys.modules.pop(module.__name__, None)
        if "attention" in METHODS:
            METHODS.unregister("attention")


def test_attention_loss_is_zero_for_identical_maps_and_positive_otherwise(example):
    feats = [torch.randn(4, 8, 8, 8), torch.randn(4, 16, 4, 4)]
    assert example["attention_loss"](feats, feats).item() == pytest.approx(0.0, abs=1e-7)
    other = [f.flip(-1) for f in feats]
    assert example["attention_loss"](feats, other).item() > 0
    # Scale-invariant per sample: the maps are normalised.
    scaled = [3.0 * f for f in feats]
    assert example["attention_loss"](feats, scaled).item() == pytest.approx(0.0, abs=1e-6)


def test_documented_method_trains_end_to_end(example, make_config, tmp_path):
    from kdlab.models import create_model

    teacher = tmp_path / "teacher.pt"
    Checkpoint.for_model(create_model("resnet8", num_classes=10), "resnet8", 10).save(teacher)
    raw = make_config(method={"name": "attention", "at_weight": 100.0},
                      teacher={"name": "resnet8", "checkpoint": str(teacher)})
    result = Trainer(load_config(data=raw)).fit()
    row = result.history[-1]
    assert math.isfinite(row["train/at"]) and row["train/at"] > 0
    assert "stat/teacher_top1" in row
    cls = METHODS.get("attention")
    assert cls.needs_teacher_features and cls.requires_teacher


def test_documented_method_step_matches_its_formula(example):
    from kdlab.models import create_model

    torch.manual_seed(0)
    student, teacher = create_model("resnet8", num_classes=10), create_model("resnet20", num_classes=10)
    cls = METHODS.get("attention")
    d = cls(student, teacher, cls.Config(ce_weight=0.0, at_weight=2.0), input_size=(3, 32, 32), num_classes=10)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    out = d(Batch(x, y), 1)  # the student in training mode, the teacher in eval mode, as here:
    _, s = student(x, features=True)
    _, t = teacher(x, features=True)
    expected = sum((example["attention_map"](a) - example["attention_map"](b)).pow(2).mean()
                   for a, b in zip(s.stages, t.stages))
    torch.testing.assert_close(out.losses["at"], 2.0 * expected, rtol=1e-4, atol=1e-6)
