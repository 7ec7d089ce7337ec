"""The command line: help that teaches, the demo end to end, eval, train."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from kdlab.cli import build_parser, main
from kdlab.commands.demo import MARKER, demo_steps
from kdlab.config import config_to_dict, load_config
from kdlab.generations import load_chain

ROOT = Path(__file__).resolve().parents[1]


def test_top_level_help_lists_commands_and_examples(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for word in ("train", "eval", "demo", "examples:", "--resume"):
        assert word in out


@pytest.mark.parametrize("command", ["train", "eval", "demo"])
def test_each_subcommand_explains_itself(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    out = capsys.readouterr().out
    assert len(out.splitlines()) > 5 and "usage: kdlab " + command in out


def test_every_registered_command_has_help():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name, p in sub.choices.items():
        assert p.description, f"kdlab {name} has no description"


def _comparable(cfg) -> dict:
    """A validated experiment config without what the demo sets per invocation (output folder,
    device, progress bars, TensorBoard) and with teacher checkpoints reduced to <run>/<file>."""
    out = config_to_dict(cfg)
    out.pop("output_dir")
    out["train"].update(device="auto", progress=True, tensorboard=True)
    if out.get("teacher"):
        path = Path(out["teacher"]["checkpoint"])
        out["teacher"]["checkpoint"] = f"{path.parent.name}/{path.name}"
    return out


def test_digits_config_files_are_the_demo_s_experiments(tmp_path):
    steps = demo_steps(str(tmp_path))
    assert {s.file for s in steps} == {p.name for p in (ROOT / "configs" / "digits").glob("*.yaml")}
    for step in steps:
        path = ROOT / "configs" / "digits" / step.file
        if step.chain:
            from_file, embedded = load_chain(path), load_chain(data=step.raw)
            assert from_file.name == embedded.name and from_file.settings == embedded.settings, step.file
            pairs = list(zip(from_file.configs, embedded.configs))
            assert len(pairs) == 3, step.file  # a patriarch and two generations
        else:
            pairs = [(load_config(path), load_config(data=step.raw))]
        for a, b in pairs:
            assert _comparable(a) == _comparable(b), step.file


ROWS = ["teacher (resnet20", "student alone", "KD", "DKD", "ReviewKD",
        "tolerant D(0.6, 0.6): patriarch", "tolerant D(0.6, 0.6): generation 1",
        "tolerant D(0.6, 0.6): generation 2", "strict D(1.0, 0.6): patriarch",
        "strict D(1.0, 0.6): generation 1", "strict D(1.0, 0.6): generation 2"]


def _table(out: str) -> dict[str, list[str]]:
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in out.splitlines() if line.startswith("| ")]
    return {r[0]: r[1:] for r in rows[1:]}


@pytest.mark.slow
def test_demo_end_to_end_small(tmp_path, capsys):
    """Every run of the demo for one epoch (--scale 0.03): the table, the figure, the run folders;
    then the demo again into the same folder: it replaces the first and gives the same numbers."""
    out_dir, figure = tmp_path / "demo", tmp_path / "img" / "demo.png"
    argv = ["-q", "demo", "--output-dir", str(out_dir), "--figure", str(figure), "--scale", "0.03", "--device", "cpu"]
    assert main(argv) == 0
    first = capsys.readouterr()
    table = _table(first.out)
    assert [label[:len(want)] for label, want in zip(table, ROWS)] == ROWS
    assert table["KD"][0] == "kd" and table["ReviewKD"][0] == "reviewkd"
    assert table["strict D(1.0, 0.6): generation 2"][0] == "generation"
    alone = float(table["student alone (resnet8, 200 digits)"][1])
    assert float(table["DKD"][3]) == pytest.approx(float(table["DKD"][1]) - alone, abs=0.011)  # the gain column
    assert f"figure: {figure}" in first.out
    png = figure.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    for run in ("digits_teacher_resnet20", "digits_student_resnet8", "digits_kd_resnet20_resnet8",
                "digits_dkd_resnet20_resnet8", "digits_reviewkd_resnet20_resnet8",
                "digits_chain_tolerant_resnet8/gen2", "digits_chain_strict_resnet8/gen2"):
        assert (out_dir / run / "result.json").is_file(), run
    # eval reproduces the teacher's logged accuracy from its checkpoint
    ckpt = out_dir / "digits_teacher_resnet20" / "last.pt"
    assert main(["eval", str(ckpt), "--device", "cpu"]) == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    logged = json.loads((out_dir / "digits_teacher_resnet20" / "result.json").read_text())
    assert got["top1"] == pytest.approx(logged["last"]["top1"], abs=1e-6)

    assert main(argv) == 0  # again: the earlier demo is replaced, not refused, and nothing changes
    second = capsys.readouterr()
    assert "replacing the earlier demo" in second.err
    strip_time = lambda t: {k: v[:-1] for k, v in t.items()}  # noqa: E731
    assert strip_time(_table(second.out)) == strip_time(table)
    assert figure.read_bytes() == png


def test_demo_refuses_a_folder_it_did_not_write(tmp_path, capsys):
    (tmp_path / "digits_student_resnet8").mkdir()
    assert main(["demo", "--output-dir", str(tmp_path), "--scale", "0.03", "--device", "cpu"]) == 2
    assert "not written by 'kdlab demo'" in capsys.readouterr().err
    assert not (tmp_path / MARKER).exists() and not (tmp_path / "digits_teacher_resnet20").exists()


def test_demo_plan_teacher_first_students_after_it_chains_in_sequence(tmp_path):
    """The demo is one plan: the distilled students wait for the teacher, each generation for the
    one before; the student alone and the two patriarchs wait for nothing (with --jobs they start
    beside the teacher)."""
    from kdlab.commands.demo import demo_plan
    from kdlab.generations.runner import finish_chain

    steps = demo_steps(str(tmp_path), scale=0.03, device="cpu", progress=False)
    plan, chains = demo_plan(steps, overwrite=False, log_dir=tmp_path / "logs")
    for chain in chains:
        finish_chain(chain, report=False)
    plan.check()
    after = {Path(j.run_dir).relative_to(tmp_path).as_posix(): [Path(a).relative_to(tmp_path).as_posix()
                                                                for a in j.after] for j in plan.jobs}
    teacher = "digits_teacher_resnet20"
    assert list(after)[0] == teacher and after[teacher] == [] and after["digits_student_resnet8"] == []
    for student in ("digits_kd_resnet20_resnet8", "digits_dkd_resnet20_resnet8", "digits_reviewkd_resnet20_resnet8"):
        assert after[student] == [teacher]
    for chain in ("digits_chain_tolerant_resnet8", "digits_chain_strict_resnet8"):
        assert [after[f"{chain}/gen{m}"] for m in range(3)] == [[], [f"{chain}/gen0"], [f"{chain}/gen1"]]
    assert len(plan.jobs) == 11 and plan.log_dir == tmp_path / "logs"


def test_demo_with_a_failed_teacher_shows_it_and_finishes_the_rest(tmp_path, capsys, monkeypatch):
    """The teacher fails: the three distilled students are skipped and shown so in the table, the
    student alone and the chains train, the figure is drawn, the demo exits 1."""
    from kdlab.engine import launch
    from kdlab.errors import KDLabError

    real_train_run = launch.train_run

    def failing_teacher(cfg, **kw):
        if cfg.name == "digits_teacher_resnet20":
            raise KDLabError("the teacher broke")
        return real_train_run(cfg, **kw)

    monkeypatch.setattr(launch, "train_run", failing_teacher)
    out_dir, figure = tmp_path / "demo", tmp_path / "demo.png"
    argv = ["-q", "demo", "--output-dir", str(out_dir), "--figure", str(figure), "--scale", "0.03", "--device", "cpu"]
    assert main(argv) == 1
    out = capsys.readouterr().out
    table = _table(out)
    assert table["teacher (resnet20, all digits)"][:2] == ["vanilla", "failed"]
    for label, method in (("KD", "kd"), ("DKD", "dkd"), ("ReviewKD", "reviewkd")):
        assert table[label][:2] == [method, "skipped"]
    alone = float(table["student alone (resnet8, 200 digits)"][1])
    assert alone == pytest.approx(json.loads((out_dir / "digits_student_resnet8/result.json").read_text())["last"]["top1"],
                                  abs=0.005)
    assert (out_dir / "digits_chain_strict_resnet8/gen2/result.json").is_file()
    assert float(table["strict D(1.0, 0.6): generation 2"][3]) == pytest.approx(
        float(table["strict D(1.0, 0.6): generation 2"][1]) - alone, abs=0.011)  # gains: against the alone
    assert "the teacher broke" in out  # the executor's table says why
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_overrides_after_an_option_are_still_overrides(tmp_path, monkeypatch):
    seen = {}

    def fake_run(args):
        seen["overrides"], seen["resume"] = args.overrides, args.resume
        return 0

    import kdlab.commands.train as train_cmd

    monkeypatch.setattr(train_cmd, "run", fake_run)
    assert main(["train", "c.yaml", "a.b=1", "--resume", "c.d=2"]) == 0
    assert seen == {"overrides": ["a.b=1", "c.d=2"], "resume": True}
    with pytest.raises(SystemExit):
        main(["train", "c.yaml", "--resume", "--bogus"])
