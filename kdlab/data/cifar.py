"""`cifar10` and `cifar100` from the official "python version" archives.

`data.root` may be any of:

- the folder that contains the extracted `cifar-10-batches-py/` (`cifar-100-python/`);
- that extracted folder itself;
- the folder that contains the official `cifar-10-python.tar.gz` (`cifar-100-python.tar.gz`),
  or the archive file itself: it is extracted once, next to the archive (an existing
  extracted folder there is used as is).

Nothing is ever downloaded. The pickles are read with an unpickler that only accepts the
few globals the official files use (numpy arrays), so a stray pickle cannot run code.
CIFAR-100's 20 superclasses come from the same pickles (`coarse_labels`,
`coarse_label_names`): `DataBundle.coarse_of[fine] -> coarse`, and each dataset object has
`.coarse_targets`.
"""
from __future__ import annotations

import os
import pickle
import shutil
import tarfile
import tempfile
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from kdlab.schema.experiment import DataConfig
from kdlab.data.datasets import DataBundle, register_dataset, require_root
from kdlab.data.transforms import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    CIFAR100_STD,
    PRESET_SIZES,
    Transform,
    check_preset,
    eval_transform,
    preset_size,
    train_transform,
)
from kdlab.errors import DataError

CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"
PRESETS = ("cifar", "imagenet")


@dataclass(frozen=True)
class CifarSpec:
    title: str
    folder: str
    archive: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str
    label_key: str
    names_key: str
    num_classes: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    coarse: bool = False

    @property
    def files(self) -> tuple[str, ...]:
        return self.train_files + self.test_files + (self.meta_file,)


CIFAR10 = CifarSpec(
    title="CIFAR-10",
    folder="cifar-10-batches-py",
    archive="cifar-10-python.tar.gz",
    train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
    test_files=("test_batch",),
    meta_file="batches.meta",
    label_key="labels",
    names_key="label_names",
    num_classes=10,
    mean=CIFAR10_MEAN,
    std=CIFAR10_STD,
)
CIFAR100 = CifarSpec(
    title="CIFAR-100",
    folder="cifar-100-python",
    archive="cifar-100-python.tar.gz",
    train_files=("train",),
    test_files=("test",),
    meta_file="meta",
    label_key="fine_labels",
    names_key="fine_label_names",
    num_classes=100,
    mean=CIFAR100_MEAN,
    std=CIFAR100_STD,
    coarse=True,
)


class CIFARArrays(Dataset):
    """CIFAR images in memory: `data` (N, 32, 32, 3) uint8, `targets` list of ints.

    Items are ``(transform(PIL image), target)``, as in torchvision's CIFAR10.
    """

    def __init__(
        self,
        data: np.ndarray,
        targets: list[int],
        classes: list[str],
        transform: Transform | None = None,
        coarse_targets: list[int] | None = None,
    ):
        self.data = data
        self.targets = [int(t) for t in targets]
        self.classes = list(classes)
        self.transform = transform
        self.coarse_targets = coarse_targets

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        image = Image.fromarray(self.data[i])
        if self.transform is not None:
            image = self.transform(image)
        return image, self.targets[i]


# ----------------------------------------------------------------------------- locating


def _expected_layout(spec: CifarSpec, root: Path | str) -> str:
    return (
        f"put the extracted folder at '{Path(root) / spec.folder}/' (holding "
        f"{', '.join(spec.files)}) or the official archive at '{Path(root) / spec.archive}' "
        f"(the python version from {CIFAR_URL}); kdlab never downloads data (this machine may "
        "have no network), so copy the files there or set data.root to the folder that has them"
    )


def _looks_extracted(folder: Path, spec: CifarSpec) -> bool:
    return folder.name == spec.folder or any((folder / f).is_file() for f in spec.files)


def locate(spec: CifarSpec, root: Path) -> Path:
    """The extracted CIFAR folder for `root` (extracting the archive once if needed)."""
    if root.is_file():
        if root.name.endswith((".tar.gz", ".tgz")):
            return extract_archive(root, spec)
        raise DataError(
            f"data.root {str(root)!r} is a file but not a .tar.gz archive; "
            + _expected_layout(spec, root.parent)
        )
    if (root / spec.folder).is_dir():
        folder = root / spec.folder
    elif _looks_extracted(root, spec):
        folder = root
    elif (root / spec.archive).is_file():
        folder = extract_archive(root / spec.archive, spec)
    else:
        raise DataError(f"{spec.title} not found under {str(root)!r}: " + _expected_layout(spec, root))
    missing = [f for f in spec.files if not (folder / f).is_file()]
    if missing:
        raise DataError(
            f"{spec.title} folder {str(folder)!r} is incomplete: missing {', '.join(missing)}; "
            f"copy these files from the official archive {spec.archive} ({CIFAR_URL}) into "
            f"'{folder}/' (or delete the folder and put the archive at '{folder.parent / spec.archive}')"
        )
    return folder


def extract_archive(archive: Path, spec: CifarSpec) -> Path:
    """Extract the official archive next to itself once; return the extracted folder.

    Extraction goes to a temporary folder first and is renamed into place, so an
    interrupted or concurrent extraction never leaves a half-written folder behind.
    """
    parent = archive.parent
    target = parent / spec.folder
    if target.is_dir():
        return target
    manual = (
        f"extract it yourself (tar xzf {archive} -C <writable folder>) and set data.root to "
        "that folder"
    )
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{spec.folder}-", dir=parent))
    except OSError as err:
        raise DataError(
            f"cannot extract {str(archive)!r}: its folder is not writable ({err.strerror}); {manual}"
        ) from None
    try:
        try:
            with tarfile.open(archive, "r:gz") as tar:
                _safe_extractall(tar, tmp)
        except (tarfile.TarError, OSError, EOFError, zlib.error) as err:
            raise DataError(
                f"cannot extract {str(archive)!r} ({err}); replace it with the official "
                f"{spec.archive} from {CIFAR_URL}, or {manual}"
            ) from None
        extracted = tmp / spec.folder
        if not extracted.is_dir():
            raise DataError(
                f"archive {str(archive)!r} has no top-level folder '{spec.folder}/'; it is not "
                f"the official {spec.title} python archive: replace it with {spec.archive} "
                f"from {CIFAR_URL}"
            )
        try:
            os.rename(extracted, target)
        except OSError:
            if not target.is_dir():  # not merely lost a race with another process
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _safe_extractall(tar: tarfile.TarFile, dest: Path) -> None:
    """Extract only plain files and folders inside `dest` (tarfile's 'data' filter)."""
    if hasattr(tarfile, "data_filter"):  # Python 3.10.12+, 3.11.4+
        tar.extractall(dest, filter="data")
        return
    base = dest.resolve()
    members = tar.getmembers()
    for m in members:
        target = (dest / m.name).resolve()
        if not (m.isfile() or m.isdir()) or os.path.isabs(m.name) or not target.is_relative_to(base):
            raise tarfile.TarError(f"refusing to extract unsafe member {m.name!r}")
    tar.extractall(dest, members=members)


# ----------------------------------------------------------------------------- reading

_NUMPY_GLOBALS = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"),
}


class _CifarUnpickler(pickle.Unpickler):
    """Unpickler that only resolves the numpy globals that CIFAR pickles need."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _NUMPY_GLOBALS:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR file")
        if module.startswith("numpy.core.") and np.lib.NumpyVersion(np.__version__) >= "2.0.0":
            module = "numpy._core." + module[len("numpy.core.") :]
        return super().find_class(module, name)


def _text(value: Any) -> str:
    return value.decode("latin1") if isinstance(value, bytes) else str(value)


def read_pickle(path: Path, spec: CifarSpec) -> dict[str, Any]:
    """One official CIFAR pickle as a dict with str keys, or a `DataError`."""
    try:
        with open(path, "rb") as fh:
            obj = _CifarUnpickler(fh, encoding="latin1").load()
    except Exception as err:  # corrupt or foreign file: any unpickling failure
        raise DataError(
            f"{str(path)!r} is not a readable {spec.title} python pickle ({type(err).__name__}: "
            f"{err}); replace it with the file from the official {spec.archive} ({CIFAR_URL})"
        ) from None
    if not isinstance(obj, dict):
        raise DataError(
            f"{str(path)!r} does not hold a dict as {spec.title} files do; replace it with the "
            f"file from the official {spec.archive} ({CIFAR_URL})"
        )
    return {_text(k): v for k, v in obj.items()}


def _labels(batch: dict, key: str, n: int, limit: int, path: Path, spec: CifarSpec) -> list[int]:
    if key not in batch:
        raise DataError(
            f"{str(path)!r} has no {key!r} entry; it is not a {spec.title} batch: replace it "
            f"with the file from the official {spec.archive} ({CIFAR_URL})"
        )
    labels = [int(v) for v in np.asarray(batch[key]).reshape(-1)]
    if len(labels) != n or any(not 0 <= v < limit for v in labels):
        raise DataError(
            f"{str(path)!r}: {key!r} must hold {n} labels in [0, {limit}); the file is corrupt: "
            f"replace it with the file from the official {spec.archive} ({CIFAR_URL})"
        )
    return labels


def read_split(
    folder: Path, files: tuple[str, ...], spec: CifarSpec
) -> tuple[np.ndarray, list[int], list[int] | None]:
    """(images (N, 32, 32, 3) uint8, labels, coarse labels or None) of some batch files."""
    images, labels, coarse = [], [], []
    for name in files:
        path = folder / name
        batch = read_pickle(path, spec)
        data = np.asarray(batch.get("data", np.empty(0)))
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise DataError(
                f"{str(path)!r}: 'data' must be an N x 3072 uint8 array, got shape "
                f"{data.shape}; replace it with the file from the official {spec.archive} "
                f"({CIFAR_URL})"
            )
        n = data.shape[0]
        images.append(data.astype(np.uint8, copy=False).reshape(n, 3, 32, 32).transpose(0, 2, 3, 1))
        labels += _labels(batch, spec.label_key, n, spec.num_classes, path, spec)
        if spec.coarse:
            coarse += _labels(batch, "coarse_labels", n, 20, path, spec)
    data = np.ascontiguousarray(np.concatenate(images)) if images else np.empty((0, 32, 32, 3), np.uint8)
    return data, labels, (coarse if spec.coarse else None)


def _names(meta: dict, key: str, count: int, folder: Path, spec: CifarSpec) -> list[str]:
    names = [_text(n) for n in meta.get(key, [])]
    if len(names) != count:
        raise DataError(
            f"{str(folder / spec.meta_file)!r}: {key!r} must list {count} names, found "
            f"{len(names)}; replace it with the file from the official {spec.archive} ({CIFAR_URL})"
        )
    return names


def coarse_mapping(fine: list[int], coarse: list[int], num_fine: int, where: Path) -> list[int]:
    """fine -> coarse from paired labels; -1 (with a warning) for fine classes never seen."""
    mapping = [-1] * num_fine
    for f, c in zip(fine, coarse):
        if mapping[f] == -1:
            mapping[f] = c
        elif mapping[f] != c:
            raise DataError(
                f"CIFAR-100 files in {str(where)!r} give fine class {f} two superclasses "
                f"({mapping[f]} and {c}); the files are corrupt: replace them with the official "
                f"cifar-100-python.tar.gz ({CIFAR_URL})"
            )
    unseen = [f for f, c in enumerate(mapping) if c == -1]
    if unseen:
        warnings.warn(
            f"CIFAR-100 files in {where} never show fine classes {unseen}; their coarse_of "
            "entry is -1",
            stacklevel=3,
        )
    return mapping


# ----------------------------------------------------------------------------- builders


def build_cifar(cfg: DataConfig, spec: CifarSpec) -> DataBundle:
    preset = check_preset(cfg.transform or "cifar", PRESETS, cfg.name)
    size = preset_size(preset, cfg.image_size)
    if preset == "cifar" and size != PRESET_SIZES["cifar"]:
        raise DataError(
            f"data.image_size={size} with the cifar transform, but {spec.title} images are 32x32 and that "
            "transform pads and crops them at their own size; leave data.image_size unset (or 32), or set "
            "data.transform=imagenet for random-resized crops of another size"
        )
    train_tf = train_transform(preset, cfg.augment, spec.mean, spec.std, size)
    eval_tf = eval_transform(preset, spec.mean, spec.std, size)
    root = require_root(cfg, f"the folder that contains {spec.folder}/ or {spec.archive}")
    folder = locate(spec, root)
    train_x, train_y, train_c = read_split(folder, spec.train_files, spec)
    val_x, val_y, val_c = read_split(folder, spec.test_files, spec)
    if len(train_y) == 0 or len(val_y) == 0:
        raise DataError(
            f"{spec.title} folder {str(folder)!r} has no {'training' if not train_y else 'test'} "
            f"images; replace its files with those of the official {spec.archive} ({CIFAR_URL})"
        )
    meta = read_pickle(folder / spec.meta_file, spec)
    class_names = _names(meta, spec.names_key, spec.num_classes, folder, spec)
    coarse_of = coarse_names = None
    if spec.coarse:
        coarse_names = _names(meta, "coarse_label_names", 20, folder, spec)
        coarse_of = coarse_mapping(train_y + val_y, train_c + val_c, spec.num_classes, folder)
    train = CIFARArrays(train_x, train_y, class_names, train_tf, train_c)
    val = CIFARArrays(val_x, val_y, class_names, eval_tf, val_c)
    return DataBundle(
        train=train,
        val=val,
        num_classes=spec.num_classes,
        class_names=class_names,
        input_size=(3, size, size),
        mean=spec.mean,
        std=spec.std,
        coarse_of=coarse_of,
        coarse_names=coarse_names,
        train_targets=list(train.targets),
    )


@register_dataset("cifar10")
def build_cifar10(cfg: DataConfig) -> DataBundle:
    return build_cifar(cfg, CIFAR10)


@register_dataset("cifar100")
def build_cifar100(cfg: DataConfig) -> DataBundle:
    return build_cifar(cfg, CIFAR100)
