"""Analysis: calibration, class-correlation difference, per-sample terms, training curves
and the `kdlab analyze` report."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from kdlab.analysis.calibration import reliability
from kdlab.analysis.correlation import class_mean_logits, correlation_difference, difference_stats
from kdlab.analysis.curves import loss_terms, plot_curves, read_metrics
from kdlab.analysis.per_sample import per_sample_terms
from kdlab.errors import KDLabError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _is_png(path, min_bytes=2000):
    data = path.read_bytes()
    return data[:8] == PNG_MAGIC and len(data) > min_bytes


def _probs(confidences, correct):
    """Two-class probability rows with these max-probabilities, targets right or wrong as given."""
    p = torch.tensor(confidences, dtype=torch.float64)
    probs = torch.stack([p, 1 - p], 1)
    targets = torch.tensor([0 if c else 1 for c in correct])
    return probs, targets


def test_reliability_ece_by_hand():
    probs, targets = _probs([0.95, 0.95, 0.65, 0.65, 0.99], [1, 0, 1, 1, 1])
    r = reliability(probs, targets, bins=10)
    # Bin [0.9, 1.0): 3 samples, acc 2/3, conf (0.95+0.95+0.99)/3; bin [0.6, 0.7): 2 samples, acc 1, conf 0.65.
    gap_hi = abs(2 / 3 - (0.95 + 0.95 + 0.99) / 3)
    gap_lo = abs(1.0 - 0.65)
    assert r["count"][9] == 3 and r["count"][6] == 2 and sum(r["count"]) == 5
    assert r["ece"] == pytest.approx(3 / 5 * gap_hi + 2 / 5 * gap_lo, abs=1e-6)
    assert r["mce"] == pytest.approx(max(gap_hi, gap_lo), abs=1e-6)
    perfect = reliability(*_probs([0.75] * 4, [1, 1, 1, 0]), bins=4)
    assert perfect["ece"] == pytest.approx(0.0, abs=1e-7)
    # Logits are softmaxed (torchmetrics' rule: values outside [0, 1] are logits).
    logits = torch.tensor([[2.0, 0.0], [0.0, 3.0]])
    assert reliability(logits, torch.tensor([0, 0]), bins=10)["mean_confidence"] == pytest.approx(
        float(logits.softmax(1).max(1).values.mean()))


# The numbers of kdlab's own NumPy ECE/MCE (before torchmetrics computed them), on the logits of
# `_fixed_logits`, at 15 and 10 bins: the same confidences, bins and gaps, to float32 precision.
BEFORE_TORCHMETRICS = {
    15: {"ece": 0.21878242152929306, "mce": 0.7514233663678169, "mean_confidence": 0.6149237261414527,
         "accuracy_overall": 0.702, "count": [0, 0, 0, 4, 35, 33, 63, 64, 50, 53, 46, 47, 28, 46, 31]},
    10: {"ece": 0.2145801426768303, "mce": 0.3929312063588036, "mean_confidence": 0.6149237261414527,
         "accuracy_overall": 0.702, "count": [0, 0, 18, 54, 94, 83, 78, 68, 47, 58]},
}


def _fixed_logits():
    g = torch.Generator().manual_seed(2025)
    logits = (torch.randn(500, 10, generator=g) * 2.5).float()
    wrong = torch.rand(500, generator=g) < 0.35
    targets = torch.where(wrong, torch.randint(0, 10, (500,), generator=g), logits.argmax(1))
    return logits, targets


@pytest.mark.parametrize("bins", [15, 10])
def test_calibration_comes_from_torchmetrics_and_equals_the_earlier_numbers(bins):
    from torchmetrics.classification import MulticlassCalibrationError

    logits, targets = _fixed_logits()
    r = reliability(logits, targets, bins)
    before = BEFORE_TORCHMETRICS[bins]
    assert r["count"] == before["count"]
    for key in ("ece", "mce", "mean_confidence", "accuracy_overall"):
        assert r[key] == pytest.approx(before[key], abs=1e-6), key
    for norm, key in (("l1", "ece"), ("max", "mce")):
        metric = MulticlassCalibrationError(num_classes=10, n_bins=bins, norm=norm)
        assert r[key] == float(metric(logits, targets)), key
    # The diagram's bins are the ones the ECE sums over.
    share = np.asarray(r["count"]) / 500
    gaps = np.nan_to_num(np.abs(np.asarray(r["accuracy"]) - np.asarray(r["confidence"])))
    assert float((share * gaps).sum()) == pytest.approx(r["ece"], abs=1e-6)


def test_correlation_difference_matches_definition():
    rng = np.random.default_rng(0)
    targets = np.repeat(np.arange(4), 5)
    t_logits = rng.normal(size=(20, 4))
    m_t = class_mean_logits(t_logits, targets, 4)
    assert np.allclose(m_t[2], t_logits[targets == 2].mean(0))
    assert np.abs(correlation_difference(m_t, m_t)).max() == 0.0
    s_logits = t_logits.copy()
    s_logits[targets == 1, 3] += 1.5  # the student moves one off-diagonal entry by 1.5
    s_logits[:, 0] += 9.0  # and every class's logit 0: row 0 is the diagonal there
    d = correlation_difference(m_t, class_mean_logits(s_logits, targets, 4))
    assert d[1, 3] == pytest.approx(0.5)  # 1.5 / 3
    assert d[0, 0] == 0.0 and d[1, 0] == pytest.approx(3.0)
    stats = difference_stats(d)
    assert stats["max"] == pytest.approx(3.0)
    assert stats["mean"] == pytest.approx(d.sum() / 16)
    assert stats["mean_offdiag"] == pytest.approx(d.sum() / 12)


def test_per_sample_terms_decompose_kd():
    torch.manual_seed(0)
    s, t, y = torch.randn(16, 7), torch.randn(16, 7) * 3, torch.randint(0, 7, (16,))
    terms = per_sample_terms(s, t, y, temperature=4.0)
    ps, pt = (s / 4).log_softmax(1), (t / 4).log_softmax(1)
    kd = 16.0 * (pt.exp() * (pt - ps)).sum(1)
    assert np.allclose(terms["kd"], kd.numpy(), atol=1e-5)  # TCKD + (1 - p_t) NCKD = KD (DKD Eq. 7)
    assert np.allclose(terms["teacher_pt"], t.softmax(1).gather(1, y[:, None]).squeeze(1).numpy())
    assert (terms["nckd"] >= -1e-6).all()


def _write_metrics(run, rows):
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_plot_curves_draws_box_and_mask_ap_of_detection_runs(tmp_path, recwarn):
    nan = float("nan")
    box = [{"epoch": e, "train/loss": 2.0 / e, "val/bbox_ap": 10.0 * e, "val/bbox_ap50": 20.0 * e, "val/bbox_aps": nan,
            "val/segm_ap": nan} for e in (1, 2)]
    mask = [{**r, "val/segm_ap": 8.0 * r["epoch"]} for r in box]
    _write_metrics(tmp_path / "runs" / "box", box)
    _write_metrics(tmp_path / "runs" / "mask", mask)
    info = plot_curves([tmp_path / "runs" / "box"], tmp_path / "b.png")
    assert info["panels"] == ["bbox_ap", "train/loss"]  # no empty top-1 panel, no NaN-only AP panel
    both = plot_curves([tmp_path / "runs"], tmp_path / "m.png")
    assert both["panels"][:2] == ["bbox_ap", "segm_ap"] and _is_png(tmp_path / "m.png")
    assert not [w for w in recwarn if "legend" in str(w.message).lower()]


def test_plot_curves_overlays_runs(tmp_path):
    kd = [{"epoch": e, "lr": 0.05, "train/ce": 1.0 / e, "train/kd": 0.5 / e, "train/loss": 1.5 / e,
           "train/top1": 40 + e, "val/top1": 30 + e, "val/top5": 60.0, "stat/teacher_conf": 0.8} for e in (1, 2, 3)]
    dkd = [{"epoch": e, "lr": 0.05, "train/ce": 1.1 / e, "train/tckd": 0.1, "train/nckd": 0.4, "train/loss": 1.6 / e,
            "train/top1": 41 + e, "val/top1": 32 + e, "val/top5": 61.0} for e in (1, 2, 3)]
    _write_metrics(tmp_path / "runs" / "kd", kd)
    _write_metrics(tmp_path / "runs" / "dkd", dkd)
    info = plot_curves([tmp_path / "runs" / "kd", tmp_path / "runs" / "dkd"], tmp_path / "c.png", stats=True, lr=True)
    assert _is_png(tmp_path / "c.png")
    assert info["runs"] == ["kd", "dkd"]
    assert info["panels"] == ["top1", "train/ce", "train/kd", "train/nckd", "train/tckd", "train/loss",
                              "stat/teacher_conf", "lr"]
    # A folder of runs stands for every run below it.
    assert plot_curves([tmp_path / "runs"], tmp_path / "all.png")["runs"] == ["dkd", "kd"]
    assert loss_terms({"a": read_metrics(tmp_path / "runs" / "kd")}) == ["train/ce", "train/kd", "train/loss"]
    with pytest.raises(KDLabError, match="metrics.jsonl"):
        plot_curves([tmp_path / "nope"], tmp_path / "x.png")


def _fake_checkpoint(path, model_name, seed, cfg):
    """A checkpoint in the trainer's format for a randomly initialised model (no training)."""
    from kdlab.engine.checkpoint import Checkpoint
    from kdlab.models import create_model

    torch.manual_seed(seed)
    model = create_model(model_name, num_classes=10)
    Checkpoint.for_model(model, model_name, 10, method=cfg["method"]["name"], epoch=1, config=cfg).save(path)
    return path


def test_analyze_report(make_config, tmp_path, capsys):
    from kdlab.cli import main
    from kdlab.config import config_to_dict, load_config

    cfg = config_to_dict(load_config(data=make_config(method={"name": "kd", "temperature": 2.0},
                                                      teacher={"name": "resnet8", "checkpoint": "unused.pt"})))
    teacher = _fake_checkpoint(tmp_path / "t.pt", "resnet8", 1, {**cfg, "method": {"name": "vanilla"}})
    student = _fake_checkpoint(tmp_path / "s.pt", "resnet8", 2, cfg)
    out = tmp_path / "report"
    rc = main(["analyze", "--teacher", str(teacher), "--student", str(student), "--out", str(out),
               "--split", "val", "train", "--max-samples", "120", "--device", "cpu"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "class-correlation difference: max" in printed and "ECE" in printed
    for name in ("per_sample_val.png", "per_sample_train.png", "correlation_diff.png", "reliability.png"):
        assert _is_png(out / name), name
    metrics = json.loads((out / "metrics.json").read_text())
    val = metrics["splits"]["val"]
    assert val["samples"] == 120 and metrics["splits"]["train"]["samples"] == 120
    assert metrics["temperature"] == 2.0  # the student's method.temperature
    diff = np.load(out / "correlation_diff.npy")
    assert diff.shape == (10, 10) and np.all(np.diag(diff) == 0)
    assert val["correlation_diff"]["max"] == pytest.approx(float(diff.max()))
    assert 0.0 <= val["calibration"]["student"]["ece"] <= 1.0
    rows = (out / "per_sample_val.csv").read_text().splitlines()
    assert rows[0].startswith("index,target") and len(rows) == 121
    report = (out / "report.md").read_text()
    for name in ("per_sample_val.png", "correlation_diff.png", "reliability.png"):
        assert f"({name})" in report
    assert "<img src='reliability.png'" in (out / "report.html").read_text()
    # A teacher of another class count is refused with one clear message.
    from kdlab.engine.checkpoint import Checkpoint
    from kdlab.models import create_model

    other = tmp_path / "o.pt"
    Checkpoint.for_model(create_model("resnet8", num_classes=100), "resnet8", 100, config=cfg).save(other)
    assert main(["analyze", "--teacher", str(other), "--student", str(student), "--out", str(out)]) == 2
    assert "100 classes" in capsys.readouterr().err


def test_plot_command(tmp_path, capsys):
    from kdlab.cli import main

    _write_metrics(tmp_path / "r1", [{"epoch": 1, "lr": 0.1, "train/ce": 2.0, "train/loss": 2.0, "train/top1": 10.0,
                                       "val/top1": 12.0, "val/top5": 50.0}])
    assert main(["plot", str(tmp_path / "r1"), "--out", str(tmp_path / "p.png")]) == 0
    assert _is_png(tmp_path / "p.png", 1000)
    assert main(["plot", str(tmp_path / "missing"), "--out", str(tmp_path / "q.png")]) == 2
    assert "does not exist" in capsys.readouterr().err
