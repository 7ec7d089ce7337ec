"""Training in generations: the chain config (D(eta, lam) notation, the embedded patriarch
config, validation, overrides, base files), the chain runner (hand-over of checkpoints,
skip/resume, refusal of stale folders), the report (per-generation rows, ensembles, secondary
metrics) and the CLI."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml

from kdlab.cli import main
from kdlab.engine.callbacks import Callback
from kdlab.errors import CheckpointError, ConfigError
from kdlab.engine import launch
from kdlab.generations.config import format_notation, load_chain, parse_notation
from kdlab.generations.runner import run_chain
from kdlab.methods.tolerant import TolerantConfig

ROOT = Path(__file__).resolve().parents[1]
CHAIN_CONFIGS = sorted((ROOT / "configs").glob("*/generations/*.yaml"))


def chain_data(tmp_path, make_config, **chain) -> dict:
    exp = make_config(name="chain")
    exp["output_dir"] = str(tmp_path / "runs")
    settings = {"notation": "D(0.6, 0.6)", "generations": 2, "seed_offset": 0}
    settings.update(chain)
    return {"experiment": exp, "chain": settings}


# ----------------------------------------------------------------------------- config
def test_notation_round_trip_and_errors():
    assert parse_notation("D(0.6, 0.6)") == (0.6, 0.6)
    assert parse_notation(" D( 1.0 ,0.5 ) ") == (1.0, 0.5)
    assert format_notation(0.7, 0.6) == "D(0.7, 0.6)"
    assert format_notation(1.0, [0.5, 0.6]) == "D(1.0, 0.5/0.6)"
    with pytest.raises(ValueError, match="D\\(eta, lambda\\)"):
        parse_notation("(0.6, 0.6)")


def test_notation_sets_eta_lambda_and_patriarch(tmp_path, make_config):
    chain = load_chain(data=chain_data(tmp_path, make_config))
    s = chain.settings
    assert isinstance(s.patriarch, TolerantConfig)  # the method's own config, not a mirror of it
    assert (s.patriarch.eta, s.lam, s.patriarch.kind) == (0.6, 0.6, "tsd")
    gen0, gen1, gen2 = chain.configs
    assert gen0.method.name == "tolerant" and gen0.method.kind == "tsd" and gen0.method.eta == 0.6
    assert gen0.method == s.patriarch
    assert gen0.teacher is None
    assert gen1.method.name == "generation" and gen1.method.lam == 0.6 and gen1.method.tau == 1.0
    assert Path(gen1.teacher.checkpoint) == tmp_path / "runs/chain/gen0/last.pt"
    assert Path(gen2.teacher.checkpoint) == tmp_path / "runs/chain/gen1/last.pt"
    assert gen2.teacher.name == gen2.model.name == "resnet8"
    strict = load_chain(data=chain_data(tmp_path, make_config, notation="D(1.0, 0.5)"))
    assert strict.settings.patriarch.kind == "strict" and strict.configs[0].method.kind == "strict"
    assert strict.settings.label == "D(1.0, 0.5)"


def test_patriarch_block_is_the_tolerant_config(tmp_path, make_config):
    """Every field of the tolerant method's config is a patriarch setting, defaults included,
    and reaches generation 0 unchanged."""
    fields = {"k": 3, "scores": "probabilities", "primary": "top1"}
    chain = load_chain(data=chain_data(tmp_path, make_config, notation="D(0.5, 0.6)", patriarch=fields))
    method = chain.configs[0].method
    assert (method.k, method.scores, method.primary, method.eta) == (3, "probabilities", "top1", 0.5)
    defaults = load_chain(data=chain_data(tmp_path, make_config, notation=None)).settings.patriarch
    assert defaults == TolerantConfig()
    soft = load_chain(data=chain_data(tmp_path, make_config, notation=None,
                                      patriarch={"kind": "label_smoothing", "smoothing": 0.2}))
    assert soft.configs[0].method.smoothing == 0.2 and soft.settings.patriarch.eta == 1.0
    assert soft.settings.label == "LS(0.2), lam 0.6"
    chain = load_chain(data=chain_data(tmp_path, make_config), overrides=["chain.patriarch.k=4"])
    assert chain.configs[0].method.k == 4


def test_defaults_best_checkpoint_and_per_generation_lambda(tmp_path, make_config):
    data = chain_data(tmp_path, make_config, notation=None, checkpoint="best", lam=[0.5, 0.7], seed_offset=3)
    chain = load_chain(data=data)
    assert chain.settings.patriarch.eta == 0.6 and chain.settings.patriarch.kind == "tsd"
    assert [c.method.lam for c in chain.configs[1:]] == [0.5, 0.7]
    assert chain.configs[1].teacher.checkpoint.endswith("gen0/best.pt")
    assert [c.train.seed for c in chain.configs] == [0, 3, 6]
    assert chain.settings.label == "D(0.6, 0.5/0.7)"


@pytest.mark.parametrize("chain,match", [
    ({"notation": "D(0.6, 0.6)", "patriarch": {"eta": 0.7}}, "says eta=0.6 but chain.patriarch.eta=0.7"),
    ({"notation": "D(0.6, 0.6)", "lam": 0.5}, "says lam=0.6"),
    ({"notation": "D(0.6)"}, "must look like 'D\\(eta, lambda\\)'"),
    ({"notation": None, "patriarch": {"eta": 0.5, "scores": "logits"}}, "chain.patriarch.eta: eta=0.5 is outside"),
    ({"notation": None, "patriarch": {"kind": "strict", "eta": 0.6}}, "only applies to kind 'tsd'"),
    ({"notation": None, "patriarch": {"kind": "label_smoothing", "eta": 0.8}}, "only applies to kind 'tsd'"),
    ({"patriarch": {"kk": 3}}, "unknown key 'chain.patriarch.kk'; did you mean 'chain.patriarch.k'"),
    ({"k": 3}, "chain.k is a setting of the patriarch: write it as chain.patriarch.k"),
    ({"patriarch": "strict"}, "chain.patriarch"),
    ({"lam": [0.6]}, "lists 1 values for 2 generations"),
    ({"notation": "D(1.0, 0.0)", "seed_offset": 0}, "identical copy"),
    ({"lamda": 0.6}, "unknown key 'chain.lamda'; did you mean 'chain.lam'"),
    ({"checkpoint": "final"}, "chain.checkpoint"),
])
def test_bad_chain_settings_are_one_clear_error(tmp_path, make_config, chain, match):
    with pytest.raises(ConfigError, match=match):
        load_chain(data=chain_data(tmp_path, make_config, **chain))


def test_experiment_block_errors(tmp_path, make_config):
    data = chain_data(tmp_path, make_config)
    data["experiment"]["method"] = {"name": "kd"}
    with pytest.raises(ConfigError, match="experiment.method is set"):
        load_chain(data=data)
    data = chain_data(tmp_path, make_config)
    data["experiment"]["optim"]["lrr"] = 0.1
    with pytest.raises(ConfigError, match=r"(?s)experiment block.*did you mean 'optim.lr'"):
        load_chain(data=data)
    with pytest.raises(ConfigError, match="missing required key 'experiment'"):
        load_chain(data={"chain": {"generations": 1}})


def test_overrides_route_experiment_keys(tmp_path, make_config):
    chain = load_chain(data=chain_data(tmp_path, make_config),
                       overrides=["train.epochs=3", "chain.generations=1", "experiment.optim.lr=0.2"])
    assert len(chain.configs) == 2
    assert all(c.train.epochs == 3 and c.optim.lr == 0.2 for c in chain.configs)


def test_base_files_for_chain_and_experiment(tmp_path, make_config):
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump({"optim": {"lr": 0.3}, "train": {"epochs": 4}}))
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub/common.yaml").write_text(yaml.safe_dump({"chain": {"generations": 1, "tau": 2.0}}))
    exp = make_config(name="c")
    del exp["optim"]
    exp["train"].pop("epochs")
    exp["base"] = ["recipe.yaml"]
    (tmp_path / "chain.yaml").write_text(yaml.safe_dump(
        {"base": ["sub/common.yaml"], "experiment": exp, "chain": {"notation": "D(0.7, 0.6)"}}))
    chain = load_chain(tmp_path / "chain.yaml")
    assert chain.configs[0].optim.lr == 0.3 and chain.configs[0].train.epochs == 4
    assert chain.settings.tau == 2.0 and len(chain.configs) == 2 and chain.settings.patriarch.eta == 0.7


@pytest.mark.parametrize("path", CHAIN_CONFIGS, ids=lambda p: f"{p.parent.parent.name}/{p.name}")
def test_shipped_chain_configs_validate(path):
    from kdlab.models import list_models
    from kdlab.models.registry import _PREFIXES

    chain = load_chain(path)
    s = chain.settings
    assert s.notation is not None and parse_notation(s.notation) == (s.patriarch.eta, s.lam)
    name = chain.configs[0].model.name
    if ":" in name:
        assert name == "tv:resnet18" and chain.configs[0].data.name == "imagefolder"
        if "tv" in _PREFIXES:  # torchvision support registered: the model must build
            from kdlab.models import create_model

            assert sum(p.numel() for p in create_model(name, num_classes=1000).parameters()) > 11e6
    else:
        assert name in list_models()


def test_paper_settings_are_all_shipped():
    names = {p.name for p in CHAIN_CONFIGS}
    for arch in ("resnet56", "densenet100_bc", "densenet190_bc"):
        for d in ("d10_00", "d10_05", "d10_06", "d06_06", "d07_06"):
            assert f"{arch}_{d}.yaml" in names
    assert "resnet18_d06_06.yaml" in names


# ----------------------------------------------------------------------------- running
def _result(run_dir: Path) -> dict:
    return json.loads((run_dir / "result.json").read_text())


@pytest.mark.slow
def test_chain_end_to_end_report(tmp_path, make_config):
    data = chain_data(tmp_path, make_config, groups={"small": [0, 1, 2, 3, 4], "large": [5, 6, 7, 8, 9]})
    chain = load_chain(data=data)
    report = run_chain(chain)
    root = tmp_path / "runs/chain"
    for m in range(3):
        assert (root / f"gen{m}/result.json").is_file()
    saved = yaml.safe_load((root / "gen1/config.yaml").read_text())
    assert saved["teacher"]["checkpoint"] == str(root / "gen0/last.pt")
    assert saved["method"] == {"name": "generation", "lam": 0.6, "tau": 1.0}
    log = [json.loads(line) for line in (root / "gen1/metrics.jsonl").read_text().splitlines()]
    assert "train/kd" in log[-1] and "stat/teacher_conf" in log[-1]
    on_disk = json.loads((root / "generations.json").read_text())
    assert on_disk["label"] == report["label"] == "D(0.6, 0.6)"
    rows = on_disk["generations"]
    assert [r["gen"] for r in rows] == [0, 1, 2]
    for m, row in enumerate(rows):
        res = _result(root / f"gen{m}")
        assert row["top1_last"] == res["last"]["top1"] and row["best_epoch"] == res["best_epoch"]
        # the evaluated checkpoint is last.pt, whose accuracy is the last epoch's
        assert row["checkpoint_top1"] == pytest.approx(res["last"]["top1"], abs=1e-6)
        assert 0.0 <= row["in_group_mass"] <= 1.0 and 0.0 <= row["top_secondary_in_group"] <= 1.0
        assert row["in_group_chance"] == pytest.approx(4 / 9)
    assert rows[0]["teacher_conf_train"] is None and rows[1]["teacher_conf_train"] is not None
    ens = on_disk["ensembles"]
    assert [e["members"] for e in ens] == [1, 2, 3]
    assert ens[0]["top1"] == pytest.approx(rows[0]["checkpoint_top1"])
    md = (root / "generations.md").read_text()
    assert "D(0.6, 0.6)" in md and "gen0..gen2" in md and "Dist^C" in md
    assert yaml.safe_load((root / "chain.yaml").read_text())["chain"]["patriarch"]["eta"] == 0.6


class _StopAfterEpoch(Callback):
    """Ctrl-C right after the checkpoint of `epoch` of the run in folder `run_name` is saved
    (extra callbacks fire after the built-in checkpointing)."""

    def __init__(self, run_name: str, epoch: int) -> None:
        self.run_name, self.epoch = run_name, epoch

    def on_epoch_end(self, run, epoch, row) -> None:
        if run.folder.path.name == self.run_name and epoch == self.epoch:
            raise KeyboardInterrupt


@pytest.mark.slow
def test_interrupted_chain_resumes_where_it_stopped(tmp_path, make_config, monkeypatch):
    data = chain_data(tmp_path, make_config, generations=2)
    data["experiment"]["train"]["epochs"] = 2
    chain = load_chain(data=data)
    root = tmp_path / "runs/chain"
    real_train_run = launch.train_run  # what every plan job trains with (kdlab.plan.run_job)
    monkeypatch.setattr(launch, "train_run",
                        lambda cfg, **kw: real_train_run(cfg, callbacks=[_StopAfterEpoch("gen1", 1)], **kw))
    with pytest.raises(KeyboardInterrupt):
        run_chain(chain)
    monkeypatch.setattr(launch, "train_run", real_train_run)
    assert (root / "gen0/result.json").is_file() and not (root / "gen1/result.json").exists()
    gen0_mtime = (root / "gen0/last.pt").stat().st_mtime_ns
    first_epoch = (root / "gen1/metrics.jsonl").read_text().splitlines()[0]

    report = run_chain(load_chain(data=data), resume=True)
    assert (root / "gen0/last.pt").stat().st_mtime_ns == gen0_mtime  # not retrained
    lines = (root / "gen1/metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [1, 2] and lines[0] == first_epoch
    assert report["finished"] == 3

    # A finished chain is not retrained; a changed one is refused with the difference named.
    mtimes = [(root / f"gen{m}/last.pt").stat().st_mtime_ns for m in range(3)]
    run_chain(load_chain(data=data), resume=True, report=False)
    assert [(root / f"gen{m}/last.pt").stat().st_mtime_ns for m in range(3)] == mtimes
    changed = chain_data(tmp_path, make_config, notation="D(0.7, 0.6)")
    changed["experiment"]["train"]["epochs"] = 2
    with pytest.raises(ConfigError, match=r"gen0 holds generation 0 trained with another config "
                                          r"\(method.eta: 0.6 -> 0.7.*--overwrite"):
        run_chain(load_chain(data=changed), resume=True)
    # A teacher rewritten after its student finished breaks the chain: refused.
    later = (root / "gen1/result.json").stat().st_mtime + 5
    os.utime(root / "gen0/last.pt", (later, later))
    with pytest.raises(CheckpointError, match="rewritten after generation 1 finished training"):
        run_chain(load_chain(data=data), resume=True)


def test_report_uses_cifar100_coarse_classes(tmp_path, make_config):
    try:
        from tests.fakedata import write_cifar100
    except ImportError:  # tests/ itself on sys.path
        from fakedata import write_cifar100  # type: ignore[no-redef]

    write_cifar100(tmp_path / "c100", n_train=100, n_test=100)
    data = chain_data(tmp_path, make_config, generations=0)
    data["experiment"]["data"] = {"name": "cifar100", "root": str(tmp_path / "c100"), "batch_size": 50,
                                  "num_workers": 0}
    report = run_chain(load_chain(data=data))
    assert report["groups"].startswith("CIFAR-100 coarse")
    assert report["generations"][0]["in_group_chance"] == pytest.approx(4 / 99)
    assert len(report["ensembles"]) == 1


# ----------------------------------------------------------------------------- CLI
def test_cli_dry_run_report_and_errors(tmp_path, make_config, capsys):
    path = tmp_path / "chain.yaml"
    path.write_text(yaml.safe_dump(chain_data(tmp_path, make_config)))
    assert main(["generations", str(path), "chain.generations=1", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "D(0.6, 0.6)" in out and "patriarch, TSD eta 0.6 k 5" in out and "gen0/last.pt" in out
    assert main(["generations", str(path), "chain.notation=D(0.4, 0.6)", "chain.patriarch.scores=logits"]) == 2
    assert "eta=0.4 is outside (0.5, 1]" in capsys.readouterr().err
    assert main(["generations", str(path), "--report"]) == 2
    assert "no finished generation" in capsys.readouterr().err
    assert not (tmp_path / "runs/chain/gen0").exists()
    with pytest.raises(SystemExit) as info:
        main(["generations", str(path), "--resume", "--overwrite"])
    assert info.value.code == 2 and "not allowed with argument --resume" in capsys.readouterr().err



# ----------------------------------------------------------------------------- as a plan
def _weights(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)["model_state"]


def test_chain_is_a_plan_of_generations_each_waiting_for_the_one_before(tmp_path, make_config):
    from kdlab.generations.runner import finish_chain, prepare_chain

    chain = load_chain(data=chain_data(tmp_path, make_config))
    jobs = prepare_chain(chain, after=["teacher"])
    try:
        assert [j.run_dir for j in jobs] == [str(chain.run_dir(m)) for m in range(3)]
        assert [j.after for j in jobs] == [("teacher",), (jobs[0].name,), (jobs[1].name,)]
        assert [j.label for j in jobs] == ["chain gen0", "chain gen1", "chain gen2"]
        assert all(j.resume and not j.overwrite for j in jobs)
        assert [j.experiment() for j in jobs] == chain.configs  # the configs travel as data, unchanged
        assert (tmp_path / "runs/chain/chain.yaml").is_file()
    finally:
        assert finish_chain(chain) is None  # nothing finished: no report


def test_jobs_2_trains_the_same_weights_as_in_process(tmp_path, make_config, monkeypatch, capsys):
    """Each generation in a worker process (`--jobs 2`, one thread like this process) ends with
    the weights the in-process run gives, tensor for tensor."""
    from kdlab.plan import executor

    data = chain_data(tmp_path, make_config, generations=1)
    run_chain(load_chain(data=data))
    here = tmp_path / "runs/chain"
    data["experiment"]["output_dir"] = str(tmp_path / "workers")
    path = tmp_path / "chain.yaml"
    path.write_text(yaml.safe_dump(data))
    monkeypatch.setattr(executor, "threads_per_job", lambda jobs, cores=None: 1)
    assert main(["generations", str(path), "--jobs", "2"]) == 0
    assert {r[0]: r[1] for r in _job_rows(capsys.readouterr().out)} == {"chain gen0": "done", "chain gen1": "done"}
    there = tmp_path / "workers/chain"
    assert (tmp_path / "workers/logs/chain_gen1.log").is_file()  # it ran in a worker
    for m in (0, 1):
        a, b = _weights(here / f"gen{m}/last.pt"), _weights(there / f"gen{m}/last.pt")
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), f"gen{m} {key}"
    assert json.loads((there / "generations.json").read_text())["finished"] == 2


def test_failed_generation_skips_the_later_ones_and_a_rerun_continues(tmp_path, make_config, capsys):
    """Generation 1 cannot read its teacher: it fails, generation 2 is skipped, the command exits
    1; once the checkpoint is back, --resume trains 1 and 2 and keeps generation 0."""
    data = chain_data(tmp_path, make_config)
    path = tmp_path / "chain.yaml"
    path.write_text(yaml.safe_dump(data))
    run_chain(load_chain(data=data), stop_after=0)
    root = tmp_path / "runs/chain"
    teacher = root / "gen0/last.pt"
    good = teacher.read_bytes()
    gen0 = [(root / "gen0" / f).stat().st_mtime_ns for f in ("result.json", "metrics.jsonl")]
    teacher.write_bytes(b"not a checkpoint")

    assert main(["generations", str(path), "--resume"]) == 1
    captured = capsys.readouterr()
    status = {r[0]: r[1] for r in _job_rows(captured.out)}
    assert status == {"chain gen0": "reused", "chain gen1": "failed", "chain gen2": "skipped"}
    assert "--resume" in captured.err
    assert not (root / "gen1/result.json").exists() and not (root / "generations.json").exists()

    teacher.write_bytes(good)
    assert main(["generations", str(path), "--resume"]) == 0
    out = capsys.readouterr().out
    assert {r[0]: r[1] for r in _job_rows(out)} == {"chain gen0": "reused", "chain gen1": "done",
                                                    "chain gen2": "done"}
    assert [(root / "gen0" / f).stat().st_mtime_ns for f in ("result.json", "metrics.jsonl")] == gen0
    assert json.loads((root / "generations.json").read_text())["finished"] == 3


def _job_rows(out: str) -> list[list[str]]:
    """The rows of the executor's table of jobs (run, status, min, note): its runs are the chain's."""
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in out.splitlines()
            if line.startswith("| chain gen")]
    return [r for r in rows if len(r) == 4]


def test_jobs_under_torchrun_is_refused(tmp_path, make_config, monkeypatch, capsys):
    path = tmp_path / "chain.yaml"
    path.write_text(yaml.safe_dump(chain_data(tmp_path, make_config)))
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["generations", str(path), "--jobs", "2"]) == 2
    assert "--jobs 2 starts runs of its own, but under torchrun" in capsys.readouterr().err
    assert not (tmp_path / "runs/chain").exists()
