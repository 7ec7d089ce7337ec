"""docs/own-model.md opens with a complete offline example on the user's own small images: its
config files and commands run exactly as written, from a fresh folder, on a generated 4-class
ImageFolder set of 32-pixel images (PIL), with no weight file and no network."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "own-model.md"
SECTION = "## First: your own small images, offline, no pretrained weights"
RUNS = ("teacher", "kd", "dkd", "reviewkd", "alone")


def example_section() -> str:
    text = DOC.read_text()
    assert re.findall(r"^## .*", text, flags=re.M)[0] == SECTION, "the doc must open with the example"
    start = text.index(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    return text[start:end if end >= 0 else None]


def code_blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)


def config_files(section: str) -> dict[str, str]:
    """Each yaml block names its file on its first line (`# teacher.yaml`)."""
    files = {}
    for block in code_blocks(section, "yaml"):
        first = block.splitlines()[0]
        match = re.fullmatch(r"# (\S+\.yaml)", first.strip())
        assert match, f"a yaml block of the example does not name its file: {first!r}"
        files[match.group(1)] = block
    return files


def write_images(root: Path, classes=("cat", "dog", "fox", "owl"), per_class=(4, 2), size=32) -> None:
    """my_data/{train,val}/<class>/NNNN.png: a colour per class plus noise, written with PIL."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in zip(("train", "val"), per_class):
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            base = np.array([60 * c, 255 - 60 * c, 120], dtype=np.float64)
            for i in range(n):
                pixels = np.clip(base + rng.normal(0, 40, (size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i:04d}.png")


def test_the_example_is_complete():
    section = example_section()
    files = config_files(section)
    assert set(files) == {"my_recipe.yaml", "teacher.yaml", "student.yaml"}
    assert "weights" not in section.split("```bash")[0].split("Three config files")[1]  # no weight file
    [commands] = code_blocks(section, "bash")
    for step in ("kdlab train teacher.yaml", "method=dkd", "method=reviewkd", "method=vanilla teacher=null",
                 "kdlab results", "kdlab plot", "kdlab analyze"):
        assert step in commands, step


@pytest.mark.slow
def test_the_example_runs_as_written(tmp_path):
    section = example_section()
    for name, text in config_files(section).items():
        (tmp_path / name).write_text(text)
    write_images(tmp_path / "my_data")
    [commands] = code_blocks(section, "bash")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", "-e", "-c", commands], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for run in RUNS:
        result = json.loads((tmp_path / "runs" / run / "result.json").read_text())
        assert result["epochs"] == 1 and 0.0 <= result["last"]["top1"] <= 100.0, run
    table = proc.stdout
    assert all(re.search(rf"^\| {run}\s", table, flags=re.M) for run in RUNS), table
    assert (tmp_path / "curves.png").stat().st_size > 2000
    report = (tmp_path / "report" / "report.md").read_text()
    assert "Calibration" in report
    # The 32-pixel images were seen at 32 pixels, by the settings the doc names.
    saved = (tmp_path / "runs" / "teacher" / "config.yaml").read_text()
    assert "image_size: 32" in saved and "transform: cifar" in saved


def test_imagefolder_recipes_fit_a_small_machine_and_name_their_weight_file(tmp_path, monkeypatch):
    from kdlab.config import load_config
    from kdlab.errors import CheckpointError
    from kdlab.models.weights import read_state_dict

    for path in sorted((ROOT / "configs" / "imagefolder").glob("*.yaml")):
        assert load_config(path).data.num_workers == "auto", path.name  # no 8 workers on a 2-core machine
    teacher = load_config(ROOT / "configs" / "imagefolder" / "teacher_resnet50.yaml")
    monkeypatch.chdir(tmp_path)  # no weight file here
    with pytest.raises(CheckpointError) as err:
        read_state_dict(teacher.model.weights)
    message = str(err.value)
    assert "'resnet50-0676ba61.pth'" in message and "resnet18" not in message and "docs/own-model.md" in message
