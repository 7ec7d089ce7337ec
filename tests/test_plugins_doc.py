"""docs/methods.md's walk-through "Your method in your own folder", run as written: its files are
written into a temporary folder outside the repository and its commands run there with the
installed `kdlab`, one process each, as a user would type them.

The plugin-package part really installs the documented pyproject.toml: `pip install .` runs as
`pip install --no-deps --no-build-isolation --target SITE .` (no network, nothing installed into
the environment), and the command after it sees SITE on PYTHONPATH, so kdlab finds the package's
`kdlab.plugins` entry point through importlib.metadata as it would after a plain `pip install`.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

DOC = Path(__file__).resolve().parents[1] / "docs" / "methods.md"
SECTION = "### Your method in your own folder"
KDLAB = Path(sys.executable).parent / "kdlab"


def walkthrough() -> tuple[dict[str, str], list[str]]:
    """The section's files (blocks whose first line is `# NAME`) and commands (bash blocks, in order)."""
    text = DOC.read_text()
    start = text.index(SECTION)
    section = text[start:text.index("\n### ", start + 1)]
    files, commands = {}, []
    for lang, body in re.findall(r"```(\w*)\n(.*?)```", section, flags=re.S):
        if lang == "bash":
            commands += [line.strip() for line in body.splitlines() if line.strip()]
        elif lang:
            first = body.splitlines()[0]
            assert first.startswith("# "), f"a {lang} block of the walk-through must start with '# FILE'"
            files[first[2:].strip()] = body
    # The method file is the documented method above the section.
    method = next(b for b in re.findall(r"```python\n(.*?)```", text[:start], flags=re.S)
                  if b.startswith("# my_methods/attention.py"))
    files["my_methods/attention.py"] = method
    files["my_methods/__init__.py"] = ""
    return files, commands


def test_walkthrough_names_every_step():
    files, commands = walkthrough()
    assert {"teacher.yaml", "attention.yaml", "kd.yaml", "pyproject.toml"} <= set(files)
    verbs = [c.split()[1] for c in commands]
    assert {"train", "eval", "results", "install"} <= set(verbs)
    assert any("--resume" in c for c in commands) and any("--import" in c for c in commands)


@pytest.mark.slow
def test_walkthrough_runs_as_written_outside_the_repository(tmp_path):
    files, commands = walkthrough()
    project = tmp_path / "my_project"
    for name, body in files.items():
        (project / name).parent.mkdir(parents=True, exist_ok=True)
        (project / name).write_text(body)
    site = tmp_path / "site"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(OMP_NUM_THREADS="1", PYTHONNOUSERSITE="1")
    outputs = []
    for command in commands:
        argv = shlex.split(command)
        if argv[:2] == ["pip", "install"]:
            argv = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(site), *argv[2:]]
            env["PYTHONPATH"] = str(site)
        else:
            assert argv[0] == "kdlab", command
            argv[0] = str(KDLAB)
        done = subprocess.run(argv, cwd=project, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"{command}\n{done.stdout}\n{done.stderr}"
        outputs.append((command, done.stdout, done.stderr))

    runs = project / "runs"
    plugin = str((project / "my_methods" / "attention.py").resolve())
    saved = yaml.safe_load((runs / "digits_attention" / "config.yaml").read_text())
    assert saved["imports"] == [plugin] and saved["method"]["at_weight"] == 500
    default = yaml.safe_load((runs / "digits_attention_default" / "config.yaml").read_text())
    assert default["imports"] == [plugin]  # from --import
    assert "temperature" not in default["method"] and default["method"]["at_weight"] == 1000.0
    by_command = {c: (out, err) for c, out, err in outputs}
    evaluated = json.loads(by_command["kdlab eval runs/digits_attention"][0])
    assert 0 <= evaluated["top1"] <= 100
    switched = next(err for c, _, err in outputs if "--import" in c)
    assert "temperature" in switched and "dropped" in switched  # the log note of method.name=attention
    table = next(out for c, out, _ in outputs if c.startswith("kdlab results"))
    for name in ("digits_teacher", "digits_kd", "digits_attention", "digits_attention_default"):
        assert name in table
    # The package run: no imports anywhere, the entry point registered the method.
    package_run = yaml.safe_load((runs / "digits_attention_pkg" / "config.yaml").read_text())
    assert package_run["imports"] == [] and package_run["method"]["name"] == "attention"
    assert (runs / "digits_attention_pkg" / "result.json").is_file()
    assert not str(project).startswith(str(DOC.parents[1]))
