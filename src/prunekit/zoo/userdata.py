"""Your own classification data: an image folder, a ``.npz`` or ``.pt`` file of arrays, or a CSV file.

``--data`` (and :func:`prunekit.zoo.data.get_loaders`) takes a path; what it holds decides the reader:

* a folder of images, one sub-folder per class (``DIR/<class>/<image>``), or already split into
  ``DIR/train/<class>/...`` and ``DIR/test/<class>/...`` (``val`` is taken for ``test``). Read with Pillow:
  RGB, or 1 channel when every image is grayscale; resized to ``input_size`` (default: the images' own size,
  which must then be the same for all). Pixels are scaled to [0, 1].
* ``.npz`` (numpy, no pickles) or ``.pt`` (``torch.load(weights_only=True)``: a dict of tensors) holding
  ``x`` and ``y``, or ``x_train``, ``y_train``, ``x_test``, ``y_test``. ``x`` is (N, features), (N, H, W)
  or (N, C, H, W), numeric (uint8 is scaled to [0, 1]); ``y`` holds N integer class labels >= 0.
* ``.csv`` with a header row: numeric feature columns and a label column (``label_column``, default
  ``label`` when there is one, else the last column); labels that are not all integers >= 0 are class
  names, numbered in sorted order.

Without a test split, a seeded, per-class ``test_fraction`` of the examples is held out. Inputs are then
normalised per channel (per feature for tables): ``mean``/``std`` given, ``"imagenet"`` (the statistics
pretrained timm and torchvision models expect), or ``"auto"`` (computed on the training split). The default is
``imagenet`` for RGB image folders (the usual case of fine-tuning a pretrained checkpoint) and ``auto`` for
everything else. Text is not read here: ``prunekit prune`` trains classifiers of tensors; language models
have ``prunekit llm``.

Everything is checked when the data is read, before any training, with errors that name the file and what
was expected.
"""
from __future__ import annotations

import csv
import hashlib
import math
import numbers
import pickle
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from prunekit.errors import PrunekitError

__all__ = ["DataOptions", "FILE_SUFFIXES", "IMAGE_SUFFIXES", "IMAGENET_MEAN", "IMAGENET_STD", "UserData",
           "is_user_data", "load_user_data", "normalise", "user_data_problem"]

FILE_SUFFIXES = (".npz", ".pt", ".csv")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
ARRAY_KEYS = (("x", "y"), ("x_train", "y_train", "x_test", "y_test"))
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PRESETS = ("auto", "imagenet")
FORMS = ("an image folder (DIR/<class>/<image>)", "a .npz file", "a .pt file", "a .csv file")
Stat = Union[None, str, Tuple[float, ...]]


def _floats(value: Any, what: str) -> Stat:
    """``"auto"``, ``"imagenet"``, one number or a comma-separated/list of numbers, as a tuple."""
    if value is None or value in PRESETS:
        return value
    items = value.split(",") if isinstance(value, str) else value if isinstance(value, (list, tuple)) else [value]
    try:
        out = tuple(float(v) for v in items)
    except (TypeError, ValueError):
        out = ()
    if not out or not all(math.isfinite(v) for v in out):
        raise PrunekitError(f"{what}={value!r} must be {' or '.join(PRESETS)}, or numbers such as 0.5 or 0.5,0.4,0.3")
    return out


def _size(value: Any) -> Optional[Tuple[int, int]]:
    """``32`` or ``"32,48"`` (H,W) as (H, W)."""
    if value is None:
        return None
    items = value.split(",") if isinstance(value, str) else value if isinstance(value, (list, tuple)) else [value]
    try:
        hw = [int(v) for v in items]
    except (TypeError, ValueError):
        hw = []
    if len(hw) not in (1, 2) or min(hw) < 1:
        raise PrunekitError(f"input_size={value!r} must be H or H,W in pixels (positive integers), e.g. 32 or 32,48")
    return (hw[0], hw[-1])


@dataclass(frozen=True)
class DataOptions:
    """How your own data is read (see the module's docstring); checked when built."""

    input_size: Optional[Tuple[int, int]] = None
    mean: Stat = None
    std: Stat = None
    label_column: Optional[str] = None
    test_fraction: float = 0.2

    def __post_init__(self) -> None:
        object.__setattr__(self, "input_size", _size(self.input_size))
        object.__setattr__(self, "mean", _floats(self.mean, "mean"))
        object.__setattr__(self, "std", _floats(self.std, "std"))
        if isinstance(self.std, tuple) and min(self.std) <= 0:
            raise PrunekitError(f"std={self.std} must be positive")
        if (self.mean is None) != (self.std is None) or (self.mean in PRESETS) != (self.std in PRESETS) \
                or (self.mean in PRESETS and self.mean != self.std):
            raise PrunekitError(f"give mean and std together, both numbers or the same preset "
                                f"({', '.join(PRESETS)}); got mean={self.mean!r}, std={self.std!r}")
        f = self.test_fraction
        if isinstance(f, bool) or not isinstance(f, numbers.Real) or not 0 < f < 1:
            raise PrunekitError(f"test_fraction={f!r} must be a fraction in (0, 1)")

    def record(self) -> Dict[str, Any]:
        """As JSON (a saved model's data record)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


@dataclass
class UserData:
    """Tensors read from your data (not yet normalised) and what they are."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    classes: Optional[List[str]]
    default_stats: str          # "imagenet" or "auto": what mean/std mean when not given

    def fingerprint(self) -> str:
        """A short hash of the tensors: a changed file or folder never reuses a cached dense model."""
        h = hashlib.sha1()
        for t in (self.x_train, self.y_train, self.x_test, self.y_test):
            h.update(str(tuple(t.shape)).encode())
            h.update(t.contiguous().numpy().tobytes())
        return h.hexdigest()[:16]


def is_user_data(spec: Any) -> bool:
    """True when ``spec`` names your own data (a folder or a file path) rather than a bundled dataset."""
    if not isinstance(spec, str) or spec in ("mnist", "digits") or spec.startswith("idx:"):
        return False
    return Path(spec).expanduser().is_dir() or Path(spec).suffix.lower() in FILE_SUFFIXES


def user_data_problem(spec: str) -> Optional[str]:
    """What is wrong with the path ``spec`` at a glance (missing, unknown kind), or None; the content is checked
    when it is read."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return None
    if path.suffix.lower() not in FILE_SUFFIXES:
        return f"{spec!r} is neither a folder nor a file of type {', '.join(FILE_SUFFIXES)}"
    if not path.is_file():
        return f"{path} does not exist"
    return None


# ----------------------------------------------------------------------------- splitting and labels
def _split(x: torch.Tensor, y: torch.Tensor, fraction: float, seed: int, where: str) -> Tuple[torch.Tensor, ...]:
    """A seeded per-class hold-out: every class with 2+ examples is in both splits."""
    g = torch.Generator().manual_seed(seed)
    test: List[torch.Tensor] = []
    for c in torch.unique(y):
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        k = min(len(idx) - 1, max(1, round(fraction * len(idx)))) if len(idx) > 1 else 0
        test.append(idx[:k])
    held = torch.cat(test) if test else torch.zeros(0, dtype=torch.long)
    if len(held) == 0:
        raise PrunekitError(f"{where}: too few examples to hold out a test split (give one, or more examples)")
    keep = torch.ones(len(y), dtype=torch.bool)
    keep[held] = False
    held = held.sort().values
    return x[keep], y[keep], x[held], y[held]


def _tensor(a: Any, where: str) -> torch.Tensor:
    """An array as a tensor; strings, objects and other non-numbers are refused by name."""
    if isinstance(a, torch.Tensor):
        return a
    arr = np.asarray(a)
    if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
        raise PrunekitError(f"{where}: must hold numbers, got {arr.dtype}")
    return torch.as_tensor(arr)


def _labels(y: Any, where: str) -> torch.Tensor:
    """Integer class labels >= 0 (floats holding integers are accepted) as int64."""
    t = _tensor(y, where)
    if t.dim() != 1 or t.is_complex() or t.dtype == torch.bool:
        raise PrunekitError(f"{where}: labels must be a 1-d array of class numbers, got {tuple(t.shape)} {t.dtype}")
    if t.is_floating_point():
        if not torch.isfinite(t).all() or not torch.equal(t, t.round()):
            raise PrunekitError(f"{where}: labels must be whole numbers (class indices 0, 1, ...)")
    t = t.long()
    if len(t) and int(t.min()) < 0:
        raise PrunekitError(f"{where}: labels must be >= 0 (class indices), found {int(t.min())}")
    return t


def _inputs(x: Any, where: str) -> torch.Tensor:
    """Numeric inputs (N, F), (N, H, W) -> (N, 1, H, W), or (N, C, H, W) as float32; uint8 scaled to [0, 1]."""
    t = _tensor(x, where)
    if t.dtype == torch.bool or t.is_complex() or not (t.is_floating_point() or t.dtype in (
            torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)):
        raise PrunekitError(f"{where}: inputs must be numbers, got {t.dtype}")
    if t.dim() not in (2, 3, 4) or t.shape[0] == 0:
        raise PrunekitError(f"{where}: inputs must be (N, features), (N, H, W) or (N, C, H, W) with N >= 1, "
                            f"got {tuple(t.shape)}")
    out = t.float() / 255.0 if t.dtype == torch.uint8 else t.float()
    if not torch.isfinite(out).all():
        raise PrunekitError(f"{where}: inputs hold NaN or infinite values")
    return out.unsqueeze(1) if out.dim() == 3 else out


def _arrays(arrays: Dict[str, Any], where: str, options: DataOptions, seed: int) -> Tuple[torch.Tensor, ...]:
    """(x_train, y_train, x_test, y_test) from the keys of ARRAY_KEYS, checked."""
    keys = set(arrays)
    if keys == set(ARRAY_KEYS[0]):
        x, y = _inputs(arrays["x"], f"{where} x"), _labels(arrays["y"], f"{where} y")
        if len(x) != len(y):
            raise PrunekitError(f"{where}: x has {len(x)} rows but y has {len(y)} labels")
        return _split(x, y, options.test_fraction, seed, where)
    if keys != set(ARRAY_KEYS[1]):
        raise PrunekitError(f"{where} holds {sorted(keys)}; expected the arrays {' and '.join(ARRAY_KEYS[0])}, or "
                            f"{', '.join(ARRAY_KEYS[1])}")
    out = []
    for split in ("train", "test"):
        x, y = _inputs(arrays[f"x_{split}"], f"{where} x_{split}"), _labels(arrays[f"y_{split}"], f"{where} y_{split}")
        if len(x) != len(y):
            raise PrunekitError(f"{where}: x_{split} has {len(x)} rows but y_{split} has {len(y)} labels")
        out += [x, y]
    if out[0].shape[1:] != out[2].shape[1:]:
        raise PrunekitError(f"{where}: x_train examples are {tuple(out[0].shape[1:])} but x_test examples are "
                            f"{tuple(out[2].shape[1:])}")
    return tuple(out)


# ----------------------------------------------------------------------------- files
def _read_npz(path: Path) -> Dict[str, Any]:
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise PrunekitError(f"{path} is not a readable .npz of numeric arrays (object arrays are refused): "
                            f"{str(e)[:200]}") from e


def _read_pt(path: Path) -> Dict[str, Any]:
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise PrunekitError(f"{path} was refused: it is not a weights-only file of tensors (it would build "
                            f"arbitrary objects when unpickled; nothing was executed): {str(e)[:200]}") from e
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise PrunekitError(f"{path} is not a readable torch file: {e}") from e
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise PrunekitError(f"{path} must hold a dict of tensors ({' and '.join(ARRAY_KEYS[0])}, or "
                            f"{', '.join(ARRAY_KEYS[1])}), got {type(obj).__name__}")
    return obj


def _csv_rows(path: Path) -> Tuple[List[str], List[List[str]]]:
    with open(path, newline="", encoding="utf-8") as f:
        rows = [r for r in csv.reader(f) if any(c.strip() for c in r)]
    if len(rows) < 2:
        raise PrunekitError(f"{path}: a CSV needs a header row and at least one data row")
    header = [h.strip() for h in rows[0]]
    bad = [i + 2 for i, r in enumerate(rows[1:]) if len(r) != len(header)]
    if bad:
        raise PrunekitError(f"{path}: line {bad[0]} has a different number of columns than the header ({len(header)})")
    return header, rows[1:]


def _read_csv(path: Path, options: DataOptions) -> Tuple[torch.Tensor, torch.Tensor, Optional[List[str]]]:
    header, rows = _csv_rows(path)
    label = options.label_column or ("label" if "label" in header else header[-1])
    if label not in header:
        raise PrunekitError(f"{path}: no column {label!r}; columns: {', '.join(header)}")
    li = header.index(label)
    feats = [i for i in range(len(header)) if i != li]
    if not feats:
        raise PrunekitError(f"{path}: no feature columns besides the label column {label!r}")
    x = np.empty((len(rows), len(feats)), dtype=np.float32)
    for r, row in enumerate(rows):
        for j, i in enumerate(feats):
            try:
                x[r, j] = float(row[i])
            except ValueError:
                raise PrunekitError(f"{path}: line {r + 2}, column {header[i]!r}: {row[i]!r} is not a number "
                                    f"(feature columns must be numeric; the label column is {label!r}, set it "
                                    "with --label-column)") from None
    raw = [row[li].strip() for row in rows]
    if all(v.isdigit() for v in raw):
        return torch.from_numpy(x), torch.tensor([int(v) for v in raw]), None
    classes = sorted(set(raw))
    index = {c: i for i, c in enumerate(classes)}
    return torch.from_numpy(x), torch.tensor([index[v] for v in raw]), classes


# ----------------------------------------------------------------------------- image folders
def _class_folders(folder: Path) -> Dict[str, List[Path]]:
    """{class name: its image files}, sorted; an empty or missing class is an error."""
    classes = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(classes) < 2:
        raise PrunekitError(f"{folder}: an image folder needs one sub-folder per class (at least 2), "
                            f"e.g. {folder}/cat/1.png and {folder}/dog/1.png; found {len(classes)}")
    out = {}
    for c in classes:
        files = sorted(p for p in c.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise PrunekitError(f"class folder {c} has no images ({', '.join(IMAGE_SUFFIXES)})")
        out[c.name] = files
    return out


def _read_image(path: Path, size: Optional[Tuple[int, int]]) -> Tuple[np.ndarray, bool]:
    """(H, W, 3) uint8 RGB and whether the file was grayscale."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            gray = im.mode in ("1", "L", "LA", "I", "I;16", "F")
            im = im.convert("RGB")
            if size is not None and im.size != (size[1], size[0]):
                im = im.resize((size[1], size[0]), Image.BILINEAR)
            return np.asarray(im, dtype=np.uint8), gray
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise PrunekitError(f"{path} is not a readable image: {e}") from e


def _read_images(files: Dict[str, List[Path]], classes: List[str], size: Optional[Tuple[int, int]]):
    """Images (N, H, W, 3) uint8, labels, and whether every image was grayscale."""
    images, labels, paths, gray = [], [], [], True
    for label, name in enumerate(classes):
        for path in files.get(name, []):
            arr, g = _read_image(path, size)
            if images and arr.shape != images[0].shape:
                raise PrunekitError(f"{path} is {arr.shape[1]}x{arr.shape[0]} pixels but {paths[0]} is "
                                    f"{images[0].shape[1]}x{images[0].shape[0]}: give --input-size H,W to resize all")
            paths.append(path)
            images.append(arr)
            labels.append(label)
            gray = gray and g
    return np.stack(images), torch.tensor(labels), gray


def _image_tensor(images: np.ndarray, gray: bool) -> torch.Tensor:
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0)
    return x[:, :1].contiguous() if gray else x.contiguous()


def _read_image_folder(folder: Path, options: DataOptions, seed: int) -> UserData:
    splits = {s: folder / s for s in ("train", "test", "val") if (folder / s).is_dir()}
    if "train" in splits and len(splits) > 1:
        train = _class_folders(splits["train"])
        test = _class_folders(splits.get("test") or splits["val"])
        unknown = sorted(set(test) - set(train))
        if unknown:
            raise PrunekitError(f"{folder}: test classes {unknown} have no training folder")
        classes = list(train)
        xtr, ytr, g1 = _read_images(train, classes, options.input_size)
        xte, yte, g2 = _read_images(test, classes, options.input_size or xtr.shape[1:3])
        gray = g1 and g2
        xtr, xte = _image_tensor(xtr, gray), _image_tensor(xte, gray)
    else:
        files = _class_folders(folder)
        classes = list(files)
        images, labels, gray = _read_images(files, classes, options.input_size)
        xtr, ytr, xte, yte = _split(_image_tensor(images, gray), labels, options.test_fraction, seed, str(folder))
    return UserData(xtr, ytr, xte, yte, classes, "auto" if gray else "imagenet")


def load_user_data(spec: str, options: Optional[DataOptions] = None, seed: int = 0) -> UserData:
    """Read and check your data at ``spec`` (see the module's docstring)."""
    options = options or DataOptions()
    problem = user_data_problem(spec)
    if problem:
        raise PrunekitError(f"unknown dataset: {problem}; allowed: mnist, digits, idx:<dir>, {', '.join(FORMS)}")
    path = Path(spec).expanduser()
    if path.is_dir():
        return _read_image_folder(path, options, seed)
    suffix = path.suffix.lower()
    if suffix == ".csv":
        x, y, classes = _read_csv(path, options)
        return UserData(*_split(x, y, options.test_fraction, seed, str(path)), classes, "auto")
    arrays = _read_npz(path) if suffix == ".npz" else _read_pt(path)
    return UserData(*_arrays(arrays, str(path), options, seed), None, "auto")


# ----------------------------------------------------------------------------- normalisation
def _stat(value: Stat, preset: Sequence[float], computed: torch.Tensor, channels: int, what: str) -> List[float]:
    if value == "auto":
        return computed.tolist()
    values = list(preset) if value == "imagenet" else list(value)
    if len(values) == 1:
        values = values * channels
    if len(values) != channels:
        raise PrunekitError(f"{what} has {len(values)} values but the data has {channels} channels")
    return [float(v) for v in values]


def normalise(data: UserData, options: DataOptions) -> Tuple[List[float], List[float]]:
    """Normalise ``data``'s inputs in place, per channel (dim 1); returns the (mean, std) used."""
    preset = options.mean if options.mean is not None else data.default_stats
    channels = data.x_train.shape[1]
    if preset == "imagenet" and channels != 3:
        raise PrunekitError(f"mean/std 'imagenet' are for 3-channel images; the data has {channels} channels")
    dims = [d for d in range(data.x_train.dim()) if d != 1]
    computed_mean = data.x_train.mean(dim=dims)
    computed_std = data.x_train.std(dim=dims).clamp_min(1e-6)  # a constant feature must not divide by zero
    mean = _stat(preset if options.mean is None else options.mean, IMAGENET_MEAN, computed_mean, channels, "mean")
    std = _stat(preset if options.std is None else options.std, IMAGENET_STD, computed_std, channels, "std")
    shape = [1, channels] + [1] * (data.x_train.dim() - 2)
    m, s = torch.tensor(mean).view(shape), torch.tensor(std).view(shape)
    for x in (data.x_train, data.x_test):
        x.sub_(m).div_(s)
    return mean, std
