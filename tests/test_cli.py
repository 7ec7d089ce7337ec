"""The command line: help that teaches, the demo end to end, eval, train."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from kdlab.cli import build_parser, main
from kdlab.commands.demo import demo_configs
from kdlab.config import load_config

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


def test_digits_config_files_match_the_demo(tmp_path):
    files = ["teacher.yaml", "student_alone.yaml", "kd.yaml"]
    for file, raw in zip(files, demo_configs(str(tmp_path))):
        from_file = load_config(ROOT / "configs" / "digits" / file).model_dump()
        embedded = load_config(data=raw).model_dump()
        for cfg in (from_file, embedded):
            cfg.pop("output_dir")
            cfg["train"].update(device="auto", progress=True, tensorboard=True)
            if cfg.get("teacher"):
                cfg["teacher"]["checkpoint"] = Path(cfg["teacher"]["checkpoint"]).name
        assert from_file == embedded, file


def test_demo_end_to_end_small(tmp_path, capsys):
    assert main(["-q", "demo", "--output-dir", str(tmp_path / "demo"), "--scale", "0.1", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "teacher (resnet20" in out and "student + KD" in out and "top-1 last" in out
    for run in ("digits_teacher_resnet20", "digits_student_resnet8", "digits_kd_resnet20_resnet8"):
        assert (tmp_path / "demo" / run / "result.json").is_file()
    # and eval reproduces the teacher's logged accuracy from its checkpoint
    ckpt = tmp_path / "demo" / "digits_teacher_resnet20" / "last.pt"
    assert main(["eval", str(ckpt), "--device", "cpu"]) == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    logged = json.loads((tmp_path / "demo" / "digits_teacher_resnet20" / "result.json").read_text())
    assert got["top1"] == pytest.approx(logged["last_top1"], abs=1e-6)


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
