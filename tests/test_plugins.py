"""Plugins (kdlab.config.plugins): a method defined outside kdlab reaches every command through a
config's `imports:`, `--import` or a `kdlab.plugins` entry point; failures are one clear error;
`method.name=X` over another method's file starts X from its defaults."""
from __future__ import annotations

import importlib.metadata
import logging
import sys
import uuid
from pathlib import Path

import pytest
import yaml

from kdlab.cli import build_parser
from kdlab.commands._common import resumed_run_imports
from kdlab.config import load_config, read_yaml, validate_config
from kdlab.config import plugins
from kdlab.config.plugins import PluginError, command_line_imports, resolve_specs
from kdlab.errors import ConfigError
from kdlab.methods import METHODS
from kdlab.schema.compare import experiment_identity

from conftest import forget_plugins

PLUGIN = '''\
from typing import Literal

from kdlab.losses import cross_entropy
from kdlab.methods import register_method
from kdlab.methods.base import Distiller, StepOutput
from kdlab.schema import MethodConfig


class PlugConfig(MethodConfig):
    name: Literal["{name}"] = "{name}"
    weight: float = 1.0


@register_method("{name}")
class Plug(Distiller):
    Config = PlugConfig
    requires_teacher = False

    def forward_train(self, batch, epoch):
        logits = self.student(batch.images)
        return StepOutput(logits, {{"ce": self.cfg.weight * cross_entropy(logits, batch.targets)}}, {{}})
'''


@pytest.fixture
def plugin_file(tmp_path):
    """Writes plugin files registering a method of a fresh name; forgets them afterwards."""
    written: list[tuple[Path, str]] = []

    def write(relative: str = "lib/plug.py") -> tuple[Path, str]:
        name = f"plug_{uuid.uuid4().hex[:8]}"
        path = tmp_path / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(PLUGIN.format(name=name))
        written.append((path, name))
        return path, name

    yield write
    forget_plugins(written)


def write_yaml(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data))
    return path


# --------------------------------------------------------------------------- imports: in a config
def test_config_imports_are_relative_to_their_file_and_accumulate_over_bases(tmp_path, plugin_file, make_config):
    base_plugin, base_name = plugin_file("shared/base_plug.py")
    own_plugin, own_name = plugin_file("exp/lib/own_plug.py")
    base = write_yaml(tmp_path / "shared" / "base.yaml", {**make_config(), "imports": ["base_plug.py", "json"]})
    exp = write_yaml(tmp_path / "exp" / "run.yaml", {"base": "../shared/base.yaml", "imports": "lib/own_plug.py",
                                                     "method": {"name": own_name, "weight": 0.5}})
    raw = read_yaml(exp)
    assert raw["imports"] == [str(base_plugin.resolve()), "json", str(own_plugin.resolve())]
    cfg = load_config(exp)
    assert cfg.method.name == own_name and cfg.method.weight == 0.5
    assert base_name in METHODS  # the base file's plugin was imported too
    assert cfg.imports == raw["imports"]
    assert base.is_file()


def test_run_config_records_the_resolved_imports_and_reads_back_without_them_in_scope(tmp_path, plugin_file,
                                                                                     make_config, monkeypatch):
    path, name = plugin_file()
    monkeypatch.chdir(tmp_path)
    cfg = load_config(data=make_config(method={"name": name}), overrides=["imports=[lib/plug.py]"])
    saved = cfg.model_dump(mode="json")
    assert saved["imports"] == [str(path.resolve())]  # an override is relative to the working directory
    # A reader of the saved config (eval, results, --resume) imports the plugin before validating.
    METHODS.unregister(name)
    plugins._imported.clear()
    sys.modules.pop(path.stem, None)
    again = validate_config(yaml.safe_load(yaml.safe_dump(saved)))
    assert again.method.name == name and name in METHODS


def test_imports_are_not_part_of_the_experiment(make_config):
    a = {**make_config(), "imports": ["/old/place/plug.py"]}
    b = {**make_config(), "imports": ["/new/place/plug.py"]}
    assert experiment_identity(a) == experiment_identity(b)


def test_imports_must_be_a_list_of_names(make_config):
    with pytest.raises(ConfigError, match="imports must be a list"):
        validate_config({**make_config(), "imports": {"a": 1}})
    with pytest.raises(ConfigError, match="module name or a path"):
        validate_config({**make_config(), "imports": [""]})


# --------------------------------------------------------------------------- errors
def test_unknown_names_say_how_to_register_one(make_config):
    for overrides, kind in ((["method.name=similarity_x"], "method"), (["model.name=mynet_x"], "model"),
                            (["data.name=mydata_x"], "dataset")):
        with pytest.raises(ConfigError) as err:
            load_config(data=make_config(), overrides=overrides)
        assert f"A {kind} defined outside kdlab" in str(err.value)
        assert "imports: [my_methods.py]" in str(err.value) and "--import" in str(err.value)


@pytest.mark.parametrize("source, line, reason", [
    ("import os\n\nraise RuntimeError('boom')\n", 3, "RuntimeError: boom"),
    ("x = 1\ndef f(:\n    pass\n", 2, "SyntaxError"),
    ("import json\nimport not_a_module_kdlab_test\n", 2, "ModuleNotFoundError"),
])
def test_a_failing_plugin_is_one_error_naming_its_file_and_line(tmp_path, source, line, reason, make_config):
    bad = tmp_path / f"bad_{uuid.uuid4().hex[:6]}.py"
    bad.write_text(source)
    with pytest.raises(PluginError) as err:
        validate_config({**make_config(), "imports": [str(bad)]})
    text = str(err.value)
    assert f"{bad}, line {line}" in text and reason in text
    assert err.value.__suppress_context__ and err.value.__cause__ is None  # no traceback through kdlab
    assert bad.stem not in sys.modules


def test_missing_plugin_file_and_module_are_clear_errors(tmp_path, make_config):
    with pytest.raises(PluginError, match="does not exist"):
        validate_config({**make_config(), "imports": [str(tmp_path / "nowhere.py")]})
    with pytest.raises(PluginError, match="not installed or not on the Python path"):
        validate_config({**make_config(), "imports": ["no_such_plugin_module_kdlab"]})


def test_a_plugin_that_is_gone_is_a_warning_when_not_required(tmp_path, make_config, caplog):
    with caplog.at_level(logging.WARNING, logger="kdlab.config.plugins"):
        cfg = validate_config({**make_config(), "imports": [str(tmp_path / "gone.py")]}, plugins_required=False)
    assert cfg.method.name == "vanilla"
    assert "gone.py" in caplog.text and "does not exist" in caplog.text


# --------------------------------------------------------------------------- --import
def test_every_command_takes_import():
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices  # noqa: SLF001 - argparse keeps them there
    assert len(commands) >= 8
    for name, sub in commands.items():
        options = {opt for action in sub._actions for opt in action.option_strings}  # noqa: SLF001
        assert "--import" in options, name


def test_command_line_imports_join_the_configs_validated_in_the_command(tmp_path, plugin_file, make_config,
                                                                       monkeypatch):
    path, name = plugin_file()
    monkeypatch.chdir(tmp_path)
    with command_line_imports(["lib/plug.py"]) as resolved:
        assert resolved == [str(path.resolve())] and name in METHODS
        cfg = load_config(data=make_config(method={"name": name}))
        assert cfg.imports == resolved
    assert load_config(data=make_config()).imports == []  # scoped to the command


def test_cli_trains_evaluates_and_resumes_a_plugin_method(tmp_path, plugin_file, make_config, monkeypatch, capsys,
                                                          caplog):
    from kdlab.cli import main

    path, name = plugin_file()
    monkeypatch.chdir(tmp_path)
    config = write_yaml(tmp_path / "run.yaml", make_config(method={"name": name}))
    assert main(["train", str(config), "--import", "lib/plug.py"]) == 0
    run_dir = tmp_path / "runs" / "tiny"
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["imports"] == [str(path.resolve())]
    assert resumed_run_imports(str(config), []) == [str(path.resolve())]
    capsys.readouterr()
    # Another process would not have the method registered: forget it, as a fresh `kdlab` would.
    METHODS.unregister(name)
    plugins._imported.clear()
    sys.modules.pop(path.stem, None)
    assert main(["train", str(config), "--resume"]) == 0  # no --import: config.yaml records it
    METHODS.unregister(name)
    plugins._imported.clear()
    sys.modules.pop(path.stem, None)
    assert main(["eval", str(run_dir), "--device", "cpu"]) == 0
    assert '"top1"' in capsys.readouterr().out
    # The plugin deleted: evaluating needs only the student and the data, so it still evaluates.
    METHODS.unregister(name)
    plugins._imported.clear()
    sys.modules.pop(path.stem, None)
    path.unlink()
    with caplog.at_level(logging.WARNING, logger="kdlab.config.plugins"):
        assert main(["eval", str(run_dir), "--device", "cpu"]) == 0
    assert '"top1"' in capsys.readouterr().out and "does not exist" in caplog.text


def test_a_chain_file_resolves_its_experiment_imports_relative_to_itself(tmp_path, make_config):
    from kdlab.generations.config import read_chain_yaml

    write_yaml(tmp_path / "base.yaml", {**make_config(), "imports": ["base_plug.py"]})
    chain = write_yaml(tmp_path / "chains" / "c.yaml", {
        "experiment": {"base": "../base.yaml", "imports": ["lib/x.py", "pkg.mod"]}, "chain": {"generations": 1}})
    raw = read_chain_yaml(chain)
    assert raw["experiment"]["imports"] == [str(tmp_path / "base_plug.py"), str(tmp_path / "chains/lib/x.py"),
                                            "pkg.mod"]


# --------------------------------------------------------------------------- entry points
def test_entry_point_plugins_load_once_before_validation(tmp_path, plugin_file, make_config, monkeypatch):
    """The `kdlab.plugins` group is faked: an EntryPoint of a module on a temporary sys.path entry."""
    path, name = plugin_file(f"site/ep_{uuid.uuid4().hex[:6]}.py")
    monkeypatch.syspath_prepend(str(path.parent))
    calls = []

    def entry_points(group):
        calls.append(group)
        return [importlib.metadata.EntryPoint(name="plug", value=path.stem, group=group)]

    monkeypatch.setattr(plugins.importlib.metadata, "entry_points", entry_points)
    plugins.reload_entry_points()
    try:
        cfg = load_config(data=make_config(method={"name": name}))
        load_config(data=make_config(method={"name": name}))
        assert cfg.method.name == name and cfg.imports == []
        assert calls == ["kdlab.plugins"]
    finally:
        plugins.reload_entry_points()
        sys.modules.pop(path.stem, None)


def test_a_failing_entry_point_names_its_package_file_and_line(tmp_path, make_config, monkeypatch):
    stem = f"ep_bad_{uuid.uuid4().hex[:6]}"
    (tmp_path / f"{stem}.py").write_text("\n\nraise ValueError('broken plugin')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(plugins.importlib.metadata, "entry_points", lambda group: [
        importlib.metadata.EntryPoint(name="bad", value=stem, group=group)])
    plugins.reload_entry_points()
    try:
        with pytest.raises(PluginError) as err:
            validate_config(make_config())
        assert f"{tmp_path / stem}.py, line 3" in str(err.value) and "broken plugin" in str(err.value)
        assert "kdlab.plugins" in str(err.value)
    finally:
        plugins.reload_entry_points()


# --------------------------------------------------------------------------- method.name=X
def test_method_name_override_starts_the_new_method_from_its_defaults(tmp_path, make_config, caplog):
    kd = write_yaml(tmp_path / "kd.yaml", make_config(
        method={"name": "kd", "temperature": 2.0, "kd_weight": 0.5},
        teacher={"name": "resnet8", "checkpoint": "t.pt"}))
    with caplog.at_level(logging.INFO, logger="kdlab.config.loader"):
        cfg = load_config(kd, ["method.beta=3", "method.name=dkd"])
    dkd_defaults = type(cfg.method)()
    assert cfg.method.name == "dkd" and cfg.method.beta == 3.0
    assert cfg.method.temperature == dkd_defaults.temperature  # kd's 2.0 is not carried over
    assert "temperature" in caplog.text and "kd_weight" in caplog.text and "dropped" in caplog.text
    # Naming the file's own method keeps its keys.
    assert load_config(kd, ["method.name=kd"]).method.temperature == 2.0


def test_resolve_specs_keeps_module_names_and_makes_files_absolute(tmp_path):
    assert resolve_specs(["pkg.mod", "a/b.py", "pkg.mod"], tmp_path) == ["pkg.mod", str((tmp_path / "a/b.py").resolve())]
    assert resolve_specs(None) == []


def test_a_plugin_file_never_shadows_a_library_of_its_name(tmp_path, make_config):
    fake = tmp_path / "colorsys.py"  # a standard-library module, importable, rarely imported
    fake.write_text("LOADED = True\n")
    validate_config({**make_config(), "imports": [str(fake)]})
    module = plugins._imported.pop(str(fake.resolve()))
    try:
        assert module.LOADED and module.__name__.startswith("colorsys_")
        assert sys.modules.get("colorsys") is not module
    finally:
        sys.modules.pop(module.__name__, None)


def test_module_plugins_import_by_name_and_fail_naming_their_file(tmp_path, plugin_file, make_config, monkeypatch):
    package = f"lab_{uuid.uuid4().hex[:6]}"
    path, name = plugin_file(f"{package}/methods.py")
    (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / package / "broken.py").write_text("import os\nos.nothing_here\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        cfg = validate_config({**make_config(method={"name": name}), "imports": [f"{package}.methods"]})
        assert cfg.imports == [f"{package}.methods"] and cfg.method.name == name
        with pytest.raises(PluginError) as err:
            validate_config({**make_config(), "imports": [f"{package}.broken"]})
        assert f"{tmp_path / package / 'broken.py'}, line 2" in str(err.value) and "AttributeError" in str(err.value)
    finally:  # the fixture unregisters the method
        for key in [k for k in sys.modules if k.startswith(package)]:
            sys.modules.pop(key)
        plugins._imported.pop(f"{package}.methods", None)
