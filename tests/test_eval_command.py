"""`kdlab eval` needs the checkpoint's model and data only, and prints valid JSON."""
from __future__ import annotations

import json
import math
from typing import Literal

import pytest

from kdlab.cli import main
from kdlab.commands.eval import metrics_report
from kdlab.config import validate_config
from kdlab.engine.trainer import Trainer
from kdlab.methods import METHODS
from kdlab.methods.vanilla import Vanilla
from kdlab.schema.experiment import MethodConfig


class GoneConfig(MethodConfig):
    name: Literal["gone"] = "gone"
    label_smoothing: float = 0.1


class Gone(Vanilla):
    """A method that exists while the test trains with it, as an uninstalled plugin's would."""

    Config = GoneConfig


def test_a_checkpoint_whose_method_is_not_installed_still_evaluates(make_config, capsys):
    with METHODS.registered("gone", Gone):
        result = Trainer(validate_config(make_config(name="gone_run", method={"name": "gone"}))).fit()
    assert "gone" not in METHODS
    assert main(["eval", result.run_dir, "--device", "cpu"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["top1"] == pytest.approx(result.best["top1"], abs=1e-6) and report["undefined"] == []
    with pytest.raises(Exception, match="unknown method 'gone'"):  # training still needs it, clearly
        validate_config(make_config(method={"name": "gone"}))


def test_undefined_metrics_are_null_and_named():
    report = metrics_report({"bbox_ap": 12.5, "bbox_aps": math.nan}, checkpoint="c.pt", epoch=3)
    assert json.loads(json.dumps(report, allow_nan=False)) == {
        "checkpoint": "c.pt", "epoch": 3, "bbox_ap": 12.5, "bbox_aps": None, "undefined": ["bbox_aps"]}
