"""The typed schema of an experiment config.

One YAML file describes one experiment; `kdlab.config.load_config` validates it against
`ExperimentConfig`. Every section forbids unknown keys, so a misspelt key is an error
(with a suggestion) instead of a silently ignored setting.

The `method` section is open-ended: each distillation method registers its own config
class (a `MethodConfig` subclass) next to its implementation in `kdlab/methods/`, and the
`name` key selects it. Adding a method therefore never edits this file.

This module sits below the method, model and dataset packages (they import it), so it never
imports them. What depends on their registries (which config class `method.name` selects,
whether a model or dataset name exists, whether a method needs a teacher) is asked of a
`NameResolver` passed as the pydantic validation context; `kdlab.config.resolve` provides the
one that reads the registries, and `kdlab.config.validate_config` / `load_config` pass it.
Without it, model and dataset names are not checked and the `method` section must already
be a `MethodConfig` instance.

A task owns its settings section (`kdlab.schema.tasks.TASK_SETTINGS`): which section belongs to
which task, and the class that validates a plugin task's section, are asked of the resolver too.
`detection:` is a declared field (its class is the one the registry names for it, so `cfg.detection`
and did-you-mean suggestions keep working); a plugin task's section is kept in `task_sections`
and written back under its own name. `ExperimentConfig.task_settings` is the configured task's.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal, Protocol, runtime_checkable

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    SerializeAsAny,
    SerializerFunctionWrapHandler,
    SerializationInfo,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)

from kdlab.schema.detection import DetectionConfig
from kdlab.schema.tasks import TaskSettings, check_task, settings_sections, task_settings


@runtime_checkable
class NameResolver(Protocol):
    """The registry look-ups validation needs; each unknown name raises `KeyError` whose text
    lists the valid names (`kdlab.registry.UnknownNameError`)."""

    def method_config(self, name: str) -> type["MethodConfig"]:
        """The config class of method `name`."""

    def method_requires_teacher(self, name: str) -> bool:
        """Whether method `name` trains against a teacher."""

    def check_model(self, name: str) -> None:
        """Raise unless a model called `name` can be built."""

    def check_dataset(self, name: str) -> None:
        """Raise unless a dataset called `name` is registered."""

    def dataset_task(self, name: str) -> str:
        """The task (`task:`) that the registered dataset `name` serves."""

    def check_task(self, name: str) -> None:
        """Raise unless a task called `name` is registered (`kdlab.schema.tasks.TASKS`)."""

    def task_settings(self, name: str) -> TaskSettings | None:
        """The settings section of task `name` and its class; None when it has none."""

    def settings_sections(self) -> dict[str, str]:
        """Every registered task settings section -> the task that owns it."""


def _resolver(info: ValidationInfo) -> NameResolver | None:
    return info.context if isinstance(info.context, NameResolver) else None


class _SchemaTasks:
    """The task look-ups without a resolver: the schema's own task registry."""

    task_settings = staticmethod(task_settings)
    settings_sections = staticmethod(settings_sections)


def _task_lookups(info: ValidationInfo) -> NameResolver | _SchemaTasks:
    return _resolver(info) or _SchemaTasks()


def _stray_section(section: str, owner: str, task: object) -> str:
    return (f"a '{section}:' section is only read with task: {owner} (it holds that task's settings), and this "
            f"config trains task: {task}; add 'task: {owner}' or remove the section")


def _validated_section(spec: TaskSettings, raw: Any, context: Any) -> BaseModel:
    # Errors inside a model validator lose their place; name each one's key under the section.
    if isinstance(raw, spec.config):
        return raw
    try:
        return spec.config.model_validate({} if raw is None else raw, context=context)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, (spec.section, *e['loc'])))}: {e['msg']}" for e in exc.errors())
        raise ValueError(f"invalid '{spec.section}:' section: {problems}") from None


def _checked_name(check, value: str) -> str:
    # Registry errors are KeyErrors, which pydantic would not collect; make them ValueErrors.
    try:
        check(value)
    except KeyError as exc:
        raise ValueError(str(exc)) from None
    return value


class StrictModel(BaseModel):
    """Base of every config section: unknown keys and silent coercions are errors."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class MethodConfig(StrictModel):
    """Base of the per-method config classes. `name` selects the method."""

    name: str = "vanilla"


#: The lowest temperature a method accepts. Softmax and contrastive temperatures divide logits
#: or similarities; much below this the softened distributions are one-hot in float32 and the
#: T^2 factor of the KD terms erases them (1e-9 made them exactly zero). Papers use 1-8 on
#: logits and 0.07 on contrastive similarities (CRD).
MIN_TEMPERATURE = 0.05


def _check_temperature(value: float) -> float:
    if not MIN_TEMPERATURE <= value < float("inf"):  # also refuses NaN
        raise ValueError(f"a temperature must be finite and at least {MIN_TEMPERATURE}: below it the softened "
                         "distributions are one-hot and the distillation term vanishes (papers use 1-8 on "
                         "logits, 0.07 on contrastive similarities)")
    return value


#: The type of every temperature setting of a method config (`temperature: Temperature = 4.0`).
Temperature = Annotated[float, AfterValidator(_check_temperature)]


class ModelConfig(StrictModel):
    """A network: a zoo name (`resnet8x4`) or a prefixed external one (`tv:resnet18`)."""

    name: str
    checkpoint: str | None = Field(
        default=None,
        description="kdlab checkpoint to load weights from (required for a teacher).",
    )
    weights: str | None = Field(
        default=None, description="Local weight file for torchvision/timm models."
    )
    kwargs: dict[str, Any] = Field(default_factory=dict, description="Extra constructor arguments.")

    @field_validator("name")
    @classmethod
    def _known_model(cls, v: str, info: ValidationInfo) -> str:
        names = _resolver(info)
        return _checked_name(names.check_model, v) if names is not None else v


class TeacherConfig(ModelConfig):
    """The frozen teacher: a `ModelConfig` plus an optional teacher-output cache."""

    cache: str | None = Field(
        default=None,
        description="Teacher-output cache folder written by 'kdlab cache-teacher' (logit-only "
        "methods with crop/flip augmentation; see docs/speed.md); null: run the teacher",
    )


class DataConfig(StrictModel):
    """Which dataset, where it lives, and how it is batched and augmented."""

    name: str = Field(default="digits", description="digits | cifar10 | cifar100 | imagefolder")
    root: str | None = Field(default=None, description="Dataset folder (not needed for digits).")
    train_split: str = "train"
    val_split: str | None = Field(
        default=None, description="ImageFolder validation folder name; default: 'val' or 'test'."
    )
    transform: str | None = Field(
        default=None, description="cifar | imagenet | digits; default: the dataset's own."
    )
    image_size: PositiveInt | None = Field(
        default=None,
        description="Side of the square image the model sees; default: the transform's (cifar 32, imagenet "
        "224, digits 16). cifar: images of exactly this size, random crop with padding size/8 + flip; "
        "imagenet: RandomResizedCrop(size) + flip, evaluation Resize(size * 8/7) + CenterCrop(size); "
        "digits: upsampled to it",
    )
    augment: str = Field(default="standard", description="standard | none | autoaugment")
    batch_size: PositiveInt = 64
    eval_batch_size: PositiveInt | None = None
    num_workers: NonNegativeInt | Literal["auto"] = Field(
        default="auto",
        description="DataLoader worker processes; auto: 0 when training on the CPU (the step's threads "
        "use every core), else one per spare core, at most 8 (kdlab.data.loading)",
    )
    pin_memory: bool = True
    persistent_workers: bool = True
    pipeline: Literal["standard", "gpu"] = Field(
        default="standard",
        description="standard: DataLoader + per-image transforms; gpu: the uint8 training set on "
        "the training device, crop/flip/normalise on whole batches (CIFAR-size crop+flip only; "
        "see docs/speed.md)",
    )
    train_subset: PositiveInt | None = Field(
        default=None, description="Use only the first N (seeded shuffle) training samples."
    )
    subset_seed: int = Field(
        default=0, description="Seed of the train_subset choice (independent of train.seed)."
    )
    label_noise: float = Field(default=0.0, ge=0.0, le=1.0, description="Symmetric noise ratio.")
    noise_seed: int = 0

    @field_validator("name")
    @classmethod
    def _known_dataset(cls, v: str, info: ValidationInfo) -> str:
        names = _resolver(info)
        return _checked_name(names.check_dataset, v) if names is not None else v


class OptimConfig(StrictModel):
    name: Literal["sgd", "adamw"] = "sgd"
    lr: PositiveFloat = 0.05
    momentum: float = Field(default=0.9, ge=0.0, lt=1.0)
    nesterov: bool = False
    weight_decay: NonNegativeFloat = 5e-4
    norm_weight_decay: NonNegativeFloat | None = Field(
        default=None,
        description="weight decay of the normalisation layers' parameters (batch/group/layer/instance norm): "
        "none: weight_decay, like every other parameter; 0: none, as Detectron2's WEIGHT_DECAY_NORM "
        "(the detection recipes); torchvision's reference scripts call it norm_weight_decay",
    )


class ScheduleConfig(StrictModel):
    name: Literal["multistep", "cosine", "constant"] = "multistep"
    milestones: list[PositiveInt] = Field(default_factory=lambda: [150, 180, 210])
    gamma: float = Field(default=0.1, gt=0.0, le=1.0)
    unit: Literal["epoch", "iteration"] = Field(
        default="epoch",
        description="epoch: the rate changes once per epoch and milestones/warmup_epochs count epochs "
        "(the CIFAR/ImageNet recipes); iteration: it changes every step, milestones count iterations and "
        "the warm-up is warmup_iterations (the Detectron2-style detection recipes)",
    )
    warmup_epochs: NonNegativeInt = Field(default=0, description="Linear learning-rate warm-up.")
    warmup_iterations: NonNegativeInt = Field(
        default=0, description="With unit=iteration: linear warm-up over this many steps."
    )
    warmup_start_factor: float = Field(
        default=0.001, gt=0.0, le=1.0,
        description="With unit=iteration: the warm-up's first multiplier (Detectron2's WARMUP_FACTOR).",
    )
    min_lr: NonNegativeFloat = 0.0

    @field_validator("milestones")
    @classmethod
    def _increasing(cls, v: list[int]) -> list[int]:
        if any(b <= a for a, b in zip(v, v[1:])):
            raise ValueError(f"milestones must be strictly increasing, got {v}")
        return v


class TrainConfig(StrictModel):
    epochs: PositiveInt = 240
    seed: int = 0
    deterministic: bool = False
    device: str = Field(default="auto", description="auto | cpu | cuda | cuda:N")
    amp: Literal["none", "bf16", "fp16"] = "none"
    channels_last: bool = False
    compile: bool = False
    sync_bn: bool = Field(
        default=False,
        description="DDP on CUDA: batch norm over the global batch (SyncBatchNorm) for the student "
        "and the method's modules; false: each process normalises with its own batch",
    )
    eval_every: PositiveInt = 1
    save_every: NonNegativeInt = Field(
        default=0, description="Also keep a checkpoint every N epochs (0: only last and best)."
    )
    save: Literal["last", "best", "none"] = Field(
        default="last",
        description="Checkpoints kept. last: last.pt with the optimizer state (exact --resume) and best.pt "
        "with the weights only; best: best.pt alone, weights only (no --resume); none: no checkpoint, "
        "only metrics.jsonl and result.json (epoch_N.pt of save_every: as last.pt with last, else weights only)",
    )
    nonfinite: Literal["stop", "skip"] = Field(
        default="stop", description="On a NaN/inf loss: stop the run, or skip the batch."
    )
    max_skipped: NonNegativeInt = Field(
        default=100, description="With nonfinite=skip, stop after this many skipped batches."
    )
    iterations: PositiveInt | None = Field(
        default=None,
        description="Train for this many optimizer steps instead of train.epochs (iteration-based "
        "recipes); the last epoch stops part-way",
    )
    check_every: PositiveInt = Field(
        default=50,
        description="Steps between host reads of the on-device non-finite flag and progress-bar "
        "updates (the training step itself never waits for the host)",
    )
    grad_clip: PositiveFloat | None = Field(
        default=None,
        description="Clip the gradients' global L2 norm to this value before each update (none: no clipping)",
    )
    accumulate: PositiveInt = Field(
        default=1,
        description="Micro-batches per optimizer step: each batch is forwarded and backpropagated in "
        "this many parts, then one update (data.batch_size stays the batch of one update)",
    )
    progress: bool = Field(
        default=True,
        description="Progress bars while training; they are drawn only when stderr is a terminal and "
        "not with 'kdlab -q' (the one log line per epoch stays either way)",
    )
    tensorboard: bool = True

    @model_validator(mode="after")
    def _save_every_needs_checkpoints(self) -> "TrainConfig":
        if self.save == "none" and self.save_every:
            raise ValueError(f"train.save_every={self.save_every} keeps epoch_N.pt checkpoints but train.save=none "
                             "keeps no checkpoint; set train.save=best (weights only) or last, or train.save_every=0")
        return self


#: The longest file name (one path part, in bytes) of the file systems kdlab runs on (NAME_MAX).
NAME_MAX = 255


def check_run_name(name: str) -> str:
    """`name` when it names a folder inside `output_dir`: one path part, or parts joined by '/'
    ('cifar100/kd' is the folder kd inside cifar100/); else a ValueError naming the fix. A name
    that could leave output_dir ('..', an absolute path) or name output_dir itself ('', '.')
    would let `--overwrite` delete files of another folder."""
    fix = "use name=<a folder name>, such as name=kd_resnet8 or name=cifar100/kd"
    parts = name.split("/")
    if "\0" in name:
        raise ValueError(f"name {name[:60]!r} holds a NUL character; {fix}")
    if name.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"name {name[:60]!r} does not name a folder inside output_dir (an empty part, '.', '..' "
                         f"or a leading '/'; the folder is <output_dir>/<name>); {fix}")
    longest = max(parts, key=lambda p: len(p.encode()))
    if len(longest.encode()) > NAME_MAX:
        raise ValueError(f"name part {longest[:40]!r}... is {len(longest.encode())} bytes long, more than the "
                         f"{NAME_MAX} a file name may have; use a shorter name=<a folder name>")
    return name


class ExperimentConfig(StrictModel):
    """A whole experiment: what to train, from which teacher, with which method and recipe."""

    name: str = Field(default="run", description="the run folder, <output_dir>/<name>: a folder name, or "
                      "'group/run' for a folder inside a sub-folder (no '..', no absolute path)")
    output_dir: str = "runs"
    imports: list[str] = Field(
        default_factory=list,
        description="plugins imported before the config is validated (they register methods, models, datasets, "
        "tasks): module names, or paths to .py files relative to the config file (kdlab.config.plugins); a run's "
        "config.yaml records them resolved, so every command reading the run imports them again",
    )

    @field_validator("name")
    @classmethod
    def _name_inside_output_dir(cls, value: str) -> str:
        return check_run_name(value)
    task: str = Field(
        default="classification", description="a registered task (kdlab.schema.tasks): classification | detection "
        "(docs/detection.md) | a plugin's (kdlab.engine.tasks.register_task)"
    )
    model: ModelConfig
    teacher: TeacherConfig | None = None
    method: SerializeAsAny[MethodConfig] = Field(
        default_factory=lambda: {"name": "vanilla"}, validate_default=True
    )
    data: DataConfig = Field(default_factory=DataConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    detection: DetectionConfig | None = Field(
        default=None, description="task: detection only: data files, image sizes, labels (docs/detection.md)"
    )
    task_sections: dict[str, SerializeAsAny[BaseModel]] = Field(
        default_factory=dict, exclude=True,
        description="a plugin task's settings by section name, filled from that section (not a config key; "
        "written back under the section's own name)",
    )

    @model_validator(mode="before")
    @classmethod
    def _task_owns_its_section(cls, data: Any, info: ValidationInfo) -> Any:
        # Which sections are task settings, and whose, is the registry's (kdlab.schema.tasks).
        if not isinstance(data, dict):
            return data
        tasks = _task_lookups(info)
        task = data.get("task", "classification")
        for section, owner in tasks.settings_sections().items():
            if data.get(section) is not None and owner != task:
                raise ValueError(_stray_section(section, owner, task))
        sections = data.get("task_sections") or {}
        if not all(isinstance(v, BaseModel) for v in sections.values()):
            raise ValueError("task_sections is not a config key: write a task's settings under its own section")
        spec = tasks.task_settings(task) if isinstance(task, str) else None
        if spec is None or spec.section in cls.model_fields or spec.section in sections:
            return data  # a declared section (detection:) is validated by its field, whose class it is
        data = dict(data)
        data["task_sections"] = {spec.section: _validated_section(spec, data.pop(spec.section, None), info.context)}
        return data

    @model_serializer(mode="wrap")
    def _sections_under_their_names(self, handler: SerializerFunctionWrapHandler,
                                    info: SerializationInfo) -> dict[str, Any]:
        data = handler(self)
        for section, settings in self.task_sections.items():
            data[section] = settings.model_dump(mode=info.mode, exclude_none=info.exclude_none,
                                                exclude_defaults=info.exclude_defaults)
        return data

    @property
    def task_settings(self) -> BaseModel | None:
        """The configured task's settings section (None: the task has none, or `detection:` is left
        out, which means its defaults; `kdlab.engine.tasks.task_for` hands the task them filled in)."""
        return self.detection if self.detection is not None else next(iter(self.task_sections.values()), None)

    @field_validator("task")
    @classmethod
    def _known_task(cls, value: str, info: ValidationInfo) -> str:
        names = _resolver(info)  # the resolver's message says how to register an outside task
        return _checked_name(names.check_task if names is not None else check_task, value)

    @field_validator("method", mode="before")
    @classmethod
    def _resolve_method(cls, value: Any, info: ValidationInfo) -> Any:
        # The method section is validated by the class its `name` selects.
        if isinstance(value, MethodConfig):
            return value
        if isinstance(value, str):
            value = {"name": value}
        if not isinstance(value, dict):
            raise ValueError("method must be a mapping with a 'name' key, e.g. {name: kd}")
        names = _resolver(info)
        if names is None:
            raise ValueError(
                "the method section can only be validated with its method's config class: validate "
                "experiment configs with kdlab.config.validate_config (or load_config), not "
                "ExperimentConfig.model_validate"
            )
        name = value.get("name", "vanilla")
        if not isinstance(name, str):  # str() of a huge value would end up in the message
            raise ValueError(f"method.name must be a method's name (e.g. kd), not a {type(name).__name__}")
        return names.method_config(name).model_validate(value, context=names)

    @model_validator(mode="after")
    def _dataset_serves_the_task(self, info: ValidationInfo) -> "ExperimentConfig":
        # A task's own datasets (detection: coco, shapes) serve that task only; classification
        # datasets are the general kind, which a task built on classification reads too.
        names = _resolver(info)
        served = names.dataset_task(self.data.name) if names is not None else self.task
        if served not in (self.task, "classification"):
            raise ValueError(f"data.name={self.data.name!r} is a {served} dataset, and this config trains task: "
                             f"{self.task}; set task: {served}, or pick a {self.task} dataset")
        return self

    @model_validator(mode="after")
    def _sections_need_their_task(self, info: ValidationInfo) -> "ExperimentConfig":
        # Also after assignment (validate_assignment): `cfg.task = ...` may orphan a section.
        owners = _task_lookups(info).settings_sections()
        present = {*self.task_sections, *(["detection"] if self.detection is not None else [])}
        for section in present:
            if owners.get(section, self.task) != self.task:
                raise ValueError(_stray_section(section, owners[section], self.task))
        return self

    @model_validator(mode="after")
    def _teacher_matches_method(self, info: ValidationInfo) -> "ExperimentConfig":
        names = _resolver(info)
        needs = names is not None and names.method_requires_teacher(self.method.name)
        if needs and self.teacher is None:
            raise ValueError(
                f"method {self.method.name!r} needs a teacher: add a 'teacher:' section "
                "with 'name' and 'checkpoint'"
            )
        if needs and self.teacher is not None and not self.teacher.checkpoint and not self.teacher.weights:
            raise ValueError(
                "teacher.checkpoint is required: point it at a checkpoint written by "
                "'kdlab train' (e.g. runs/<teacher>/best.pt)"
            )
        return self
