"""A task owns its settings section: the registry names the section and its class, validation
goes through it, a section of another task is refused, and the task receives its settings."""
from __future__ import annotations

import contextlib
import typing

import pytest
import yaml
from pydantic import BaseModel, ConfigDict, PositiveInt

from kdlab.config import validate_config
from kdlab.engine.tasks import ClassificationTask, TaskSettings, register_task, task_for
from kdlab.errors import ConfigError
from kdlab.schema.detection import DetectionConfig
from kdlab.schema.experiment import ExperimentConfig
from kdlab.schema.tasks import TASK_SETTINGS, TASKS, settings_sections, task_settings


class CropSettings(BaseModel):
    """The tiny plugin task's own section."""

    model_config = ConfigDict(extra="forbid")
    crop: PositiveInt = 12
    tag: str = "plain"


class CroppedDigits(ClassificationTask):
    """Classification that records the settings it was handed when it builds its data."""

    seen: list = []

    def build_data(self, cfg):
        type(self).seen.append(self.settings)
        return super().build_data(cfg)


@pytest.fixture
def crop_task():
    try:
        register_task("cropped", settings=TaskSettings("cropping", CropSettings))(CroppedDigits)
        yield CroppedDigits
    finally:
        for registry in (TASKS, TASK_SETTINGS):
            with contextlib.suppress(KeyError):
                registry.unregister("cropped")
        CroppedDigits.seen.clear()


def test_the_registry_names_each_task_section_and_its_class():
    assert task_settings("detection") == TaskSettings("detection", DetectionConfig)
    assert task_settings("classification") is None
    assert settings_sections() == {"detection": "detection"}
    # detection: is a declared field (cfg.detection); its type is the class the registry names.
    assert DetectionConfig in typing.get_args(ExperimentConfig.model_fields["detection"].annotation)


def test_a_plugin_task_gets_its_section_validated_and_handed_to_it(crop_task, make_config):
    assert settings_sections() == {"detection": "detection", "cropping": "cropped"}
    cfg = validate_config(make_config(task="cropped", cropping={"crop": 8}))
    assert cfg.task_settings == CropSettings(crop=8) and cfg.detection is None
    assert task_for(cfg).settings == CropSettings(crop=8)
    # Written back under its own name, so the run's config.yaml loads again.
    dumped = cfg.model_dump(mode="json")
    assert dumped["cropping"] == {"crop": 8, "tag": "plain"} and "task_sections" not in dumped
    again = validate_config(yaml.safe_load(yaml.safe_dump(dumped)))
    assert again.task_settings == CropSettings(crop=8) and again == cfg
    # Left out: the defaults, recorded in the config.
    plain = validate_config(make_config(task="cropped"))
    assert plain.task_settings == CropSettings() and plain.model_dump()["cropping"]["crop"] == 12
    # The trainer's task holds them too.
    from kdlab.engine.trainer import Trainer

    Trainer(validate_config(make_config(name="crop", task="cropped", cropping={"tag": "run"}))).fit()
    assert CroppedDigits.seen == [CropSettings(tag="run")]


@pytest.mark.parametrize("section, problem", [({"crop": 0}, "cropping.crop: Input should be greater than 0"),
                                              ({"size": 3}, "cropping.size: Extra inputs are not permitted"),
                                              ("big", "cropping: Input should be a valid dictionary")])
def test_a_bad_plugin_section_is_one_config_error_naming_the_key(crop_task, make_config, section, problem):
    with pytest.raises(ConfigError, match=problem):
        validate_config(make_config(task="cropped", cropping=section))


def test_a_section_of_another_task_is_refused(crop_task, make_config):
    with pytest.raises(ConfigError, match="a 'cropping:' section is only read with task: cropped.*this config "
                       "trains task: classification; add 'task: cropped' or remove the section"):
        validate_config(make_config(cropping={"crop": 8}))
    with pytest.raises(ConfigError, match="a 'detection:' section is only read with task: detection.*task: cropped"):
        validate_config(make_config(task="cropped", detection={}))
    with pytest.raises(ConfigError, match="task_sections is not a config key"):
        validate_config(make_config(task="cropped", task_sections={"cropping": {"crop": 8}}))
    cfg = validate_config(make_config(task="cropped"))
    with pytest.raises(ValueError, match="a 'cropping:' section is only read with task: cropped"):
        cfg.task = "classification"  # assignment is validated too


def test_detection_keeps_its_section_and_the_task_gets_defaults_without_one(make_config):
    cfg = validate_config(make_config(task="detection", data={"name": "shapes"}, detection={"max_size": 64}))
    assert isinstance(cfg.detection, DetectionConfig) and cfg.detection.max_size == 64
    assert cfg.task_settings is cfg.detection and task_for(cfg).settings is cfg.detection
    bare = validate_config(make_config(task="detection", data={"name": "shapes"}))
    assert bare.detection is None and task_for(bare).settings == DetectionConfig()
    assert task_for(validate_config(make_config())).settings is None


def test_registering_a_task_twice_with_other_settings_is_refused(crop_task):
    register_task("cropped", settings=TaskSettings("cropping", CropSettings))(CroppedDigits)  # re-import: fine
    with pytest.raises(ValueError, match="registered twice"):
        register_task("cropped", settings=("other", CropSettings))(CroppedDigits)
