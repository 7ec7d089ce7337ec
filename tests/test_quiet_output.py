"""Progress bars: drawn on a terminal only, never with `kdlab -q` or `train.progress=false`; a log
file gets the one line per epoch and no carriage-return bar updates."""
from __future__ import annotations

import fcntl
import io
import logging
import os
import pty
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest

from kdlab.cli import build_parser
from kdlab.config import load_config
from kdlab.engine.callbacks import bars_wanted
from kdlab.engine.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]


class _Stream(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


@pytest.fixture
def kdlab_level():
    logger = logging.getLogger("kdlab")
    before = logger.level
    yield logger.setLevel
    logger.setLevel(before)


@pytest.mark.parametrize("tty, level, enabled, drawn", [
    (True, logging.INFO, True, True),
    (False, logging.INFO, True, False),      # a log file or a pipe
    (True, logging.WARNING, True, False),    # kdlab -q
    (True, logging.INFO, False, False),      # train.progress=false
])
def test_bars_only_on_a_terminal_without_quiet(monkeypatch, kdlab_level, make_config, tty, level, enabled, drawn):
    stream = _Stream(tty)
    monkeypatch.setattr(sys, "stderr", stream)
    kdlab_level(level)
    assert bars_wanted(enabled) is drawn
    Trainer(load_config(data=make_config(train={"progress": enabled}))).fit()
    assert ("\r" in stream.getvalue()) is drawn and ("epoch 1" in stream.getvalue()) is drawn


def test_help_names_quiet_and_train_progress(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "-q, --quiet" in text and "no progress bars" in text and "train.progress=false" in text
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "train.progress=false" in text and "train.save" in text


def _kdlab_train(tmp_path, *args, terminal: bool) -> str:
    """stderr of `kdlab [args] train` on tiny digits, written to a pseudo-terminal or a file."""
    cmd = [sys.executable, "-m", "kdlab", *args, "train", str(ROOT / "configs/digits/teacher.yaml"),
           f"output_dir={tmp_path / 'runs'}", f"name=r{len(list(tmp_path.glob('*')))}", "train.epochs=2",
           "data.train_subset=128", "train.device=cpu", "train.tensorboard=false", "train.check_every=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if not terminal:
        log = tmp_path / f"log{len(list(tmp_path.glob('log*')))}.txt"
        with log.open("w") as f:
            subprocess.run(cmd, stderr=f, stdout=subprocess.DEVNULL, env=env, check=True, timeout=300)
        return log.read_text()
    master, slave = pty.openpty()
    # A real terminal's size (a new pseudo-terminal has 0 columns, in which tqdm draws nothing).
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    proc = subprocess.Popen(cmd, stderr=slave, stdout=subprocess.DEVNULL, env=env)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 4096)
        except OSError:  # the terminal closed: the process ended
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    assert proc.wait(timeout=300) == 0
    return b"".join(chunks).decode(errors="replace")


@pytest.mark.slow
def test_kdlab_train_bars_on_a_terminal_not_in_a_file_nor_with_q(tmp_path):
    on_terminal = _kdlab_train(tmp_path, terminal=True)
    assert "\r" in on_terminal and ("it/s" in on_terminal or "s/it" in on_terminal)
    in_file = _kdlab_train(tmp_path, terminal=False)
    assert "\r" not in in_file
    epoch_lines = [line for line in in_file.splitlines() if line.startswith("epoch ")]
    assert [line.split()[1] for line in epoch_lines] == ["1/2", "2/2"]  # one line per epoch
    quiet = _kdlab_train(tmp_path, "-q", terminal=True)
    assert "\r" not in quiet and "epoch 1" not in quiet
