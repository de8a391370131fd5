"""Helpers every stage shares, each written once: the progress switch, the eval-mode guard, calling a
model with any kind of inputs, the atomic writer, the timer, the choice validator, the cache folder.

Nothing here imports another prunekit module: this is the bottom layer.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import math
import numbers
import os
import secrets
import shutil
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from prunekit.errors import InvalidTypeError, PrunekitError

# ----------------------------------------------------------------------------- progress


def progress_enabled(progress: Optional[bool]) -> bool:
    """An explicit ``progress`` wins; otherwise ``PRUNEKIT_PROGRESS=0`` turns every bar off (CI, logs)."""
    if progress is not None:
        return progress
    return os.environ.get("PRUNEKIT_PROGRESS", "1") != "0"


# ----------------------------------------------------------------------------- models and inputs


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Temporarily switch to eval mode, restoring each submodule's own flag after
    (a plain ``model.train(flag)`` would clobber e.g. deliberately frozen BatchNorms)."""
    flags = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def call_model(model: nn.Module, inputs: Any) -> Any:
    """Forward with a tensor, a tuple/list of positional args or a dict of kwargs."""
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def tensors_in(inputs: Any) -> List[torch.Tensor]:
    values = inputs.values() if isinstance(inputs, dict) else inputs if isinstance(inputs, (tuple, list)) else [inputs]
    return [v for v in values if isinstance(v, torch.Tensor)]


def batch_of(inputs: Any) -> int:
    tensors = [t for t in tensors_in(inputs) if t.dim() > 0]
    return int(tensors[0].shape[0]) if tensors else 1


def with_batch(inputs: Any, batch: Optional[int]) -> Any:
    """Repeat (or cut) the samples of every tensor input to ``batch`` rows."""
    if batch is None:
        return inputs

    def fix(t: Any) -> Any:
        if not isinstance(t, torch.Tensor) or t.dim() == 0:
            return t
        return t[torch.arange(batch, device=t.device) % t.shape[0]]

    if isinstance(inputs, dict):
        return {k: fix(v) for k, v in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(fix(v) for v in inputs)
    return fix(inputs)


def seed_everything(seed: int) -> None:
    """Seed torch's global generator (a command's ``--seed``); prunekit's own randomness is seeded per use."""
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------- files


def _open_temp(path: Path, fixed: bool) -> Tuple[Path, int]:
    """Create the temp file beside ``path`` with mode 0666 less the umask, like a plain ``open`` (``mkstemp``
    would make every plan, checkpoint and weights file owner-only)."""
    flags = os.O_WRONLY | os.O_CREAT | getattr(os, "O_BINARY", 0)
    if fixed:
        tmp = path.with_name(path.name + ".tmp")
        return tmp, os.open(tmp, flags | os.O_TRUNC, 0o666)
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            return tmp, os.open(tmp, flags | os.O_EXCL, 0o666)
        except FileExistsError:  # pragma: no cover - a 32-bit name collision
            continue


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDWR | getattr(os, "O_BINARY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Union[str, os.PathLike], write: Callable[[Any], None], *, binary: bool = True,
                 before_rename: Optional[Callable[[Path], None]] = None, by_path: bool = False,
                 fixed_temp: bool = False) -> None:
    """Write ``path`` through ``write(fileobj)`` so that readers see the old file or the new one, whole.

    The bytes go to a temporary file in the same folder, are fsynced, then renamed over ``path``; the
    folder is fsynced too, so the rename itself survives a crash. If ``write`` (or the rename) fails, the
    temp file is removed and ``path`` is untouched.

    ``binary=False``: ``write`` gets a UTF-8 text file. ``by_path=True``: ``write`` gets the temp file's
    path instead of an open file, for writers that only take a file name (safetensors, the ONNX exporters);
    it may replace that file but must leave it at that path. ``fixed_temp=True``: the temp file is
    ``<name>.tmp`` rather than a unique name, for a single writer (one checkpoint file) whose crash leftover
    the next write then overwrites instead of piling up.
    ``before_rename(tmp)`` runs with the whole, fsynced temp file just before the rename, the point a crash
    would leave both files: an exception from it propagates and leaves the temp file as that crash would
    (tests kill a run there).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp, fd = _open_temp(path, fixed_temp)
    try:
        if by_path:
            os.close(fd)
            write(tmp)
            _fsync_path(tmp)
        else:
            with (os.fdopen(fd, "wb") if binary else os.fdopen(fd, "w", encoding="utf-8")) as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if before_rename is not None:
        before_rename(tmp)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    if hasattr(os, "O_DIRECTORY"):  # make renames in it durable (POSIX)
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_tree(folder: Path) -> None:
    """Flush every file of a freshly written folder, then its folders, to disk."""
    for path in sorted(folder.rglob("*"), reverse=True):  # files before the folders holding them
        if path.is_dir():
            _fsync_dir(path)
        else:
            _fsync_path(path)
    _fsync_dir(folder)


def atomic_folder(target: Union[str, os.PathLike], fill: Callable[[Path], None]) -> Path:
    """The folder counterpart of :func:`atomic_write`: ``fill(tmp)`` writes a temporary folder beside
    ``target``, which is fsynced and renamed to ``target`` whole (an existing ``target`` folder is moved aside,
    then removed; put back if the rename fails). On any error the temporary folder is removed."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if (target.exists() or target.is_symlink()) and not target.is_dir():
        raise PrunekitError(f"{target} exists and is not a folder: choose another path")
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
    tmp.mkdir()
    try:
        fill(tmp)
        _fsync_tree(tmp)
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.{secrets.token_hex(4)}.old")
            os.replace(target, old)
        try:
            os.replace(tmp, target)
        except BaseException:
            if old is not None:
                os.replace(old, target)
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return target


def atomic_write_text(path: Union[str, os.PathLike], text: str) -> None:
    """:func:`atomic_write` of ``text`` as UTF-8."""
    atomic_write(path, lambda f: f.write(text), binary=False)


def default_cache_dir() -> Path:
    """``$PRUNEKIT_CACHE_DIR`` or ``~/.cache/prunekit``."""
    env = os.environ.get("PRUNEKIT_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "prunekit"


def to_jsonable(obj: Any) -> Any:
    """A copy of ``obj`` that ``json.dumps(..., allow_nan=False)`` accepts.

    numpy/torch scalars and arrays become Python numbers/lists, NaN and inf become
    None (JSON has no NaN), paths and dates become strings, unknown objects ``str``.
    """
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [to_jsonable(v) for v in obj]
    if hasattr(obj, "detach") and hasattr(obj, "tolist"):  # torch tensor
        return to_jsonable(obj.detach().cpu().tolist())
    if hasattr(obj, "tolist") and hasattr(obj, "dtype"):  # numpy array or scalar
        return to_jsonable(obj.tolist())
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, numbers.Integral):
        return int(obj)
    if isinstance(obj, numbers.Real):
        return float(obj) if math.isfinite(float(obj)) else None
    if isinstance(obj, (_dt.date, _dt.datetime)):
        return obj.isoformat()
    return str(obj)


def json_safe(value: Any, where: str) -> Any:
    """Return ``value`` as it would come back from JSON (tuples -> lists); raise if it cannot (a model's
    recorded arguments must survive a save and a load unchanged)."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidTypeError(f"{where} = {value!r}: non-finite floats cannot be saved as JSON")
        return value
    if isinstance(value, (list, tuple)):
        return [json_safe(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        bad = [k for k in value if not isinstance(k, str)]
        if bad:
            raise InvalidTypeError(f"{where} has non-string keys {bad!r}: not JSON-safe")
        return {k: json_safe(v, f"{where}[{k!r}]") for k, v in value.items()}
    raise InvalidTypeError(f"{where} = {value!r} ({type(value).__name__}) is not JSON-safe; "
                           "only plain numbers, strings, lists and dicts are recorded")


# ----------------------------------------------------------------------------- validation


def check_choice(value: Any, allowed: Sequence[str], what: str) -> None:
    """The one validator for "value must be one of allowed" (registries have their own, same wording)."""
    if value not in allowed:
        raise PrunekitError(f"unknown {what} {value!r}; allowed: {', '.join(map(str, allowed))}")


# ----------------------------------------------------------------------------- timing

SAMPLE_MS = 2.0   # one timing sample repeats a fast call until it lasts about this long
MAX_INNER = 2000  # ... but never more calls than this in one sample


def _no_sync() -> None:
    pass


def time_calls(fns: Mapping[str, Callable[[], Any]], *, repeat: int, warmup: int = 1,
               sample_ms: Optional[float] = SAMPLE_MS, before: Optional[Callable[[], None]] = None,
               sync: Callable[[], None] = _no_sync) -> Dict[str, List[float]]:
    """The one timer: ``repeat`` samples (ms per call) of each fn, after ``warmup`` untimed rounds.

    The fns run in turn, the order rotating every round (A B C, B C A, ...), so machine noise hits all
    alike and cancels in their ratios. With ``sample_ms`` a sample repeats a call enough times to last
    about that long (calibrated once per fn in the warm-up: tiny layers run in microseconds);
    ``sample_ms=None`` times single calls. ``before`` runs untimed before every call (e.g. to evict the
    cache), which implies single calls. ``sync`` waits for asynchronous devices around each sample.
    """
    if repeat < 1 or warmup < 0:
        raise PrunekitError(f"need repeat >= 1 and warmup >= 0, got repeat={repeat}, warmup={warmup}")
    names = list(fns)
    inner = {k: 1 for k in names}
    calibrate = sample_ms is not None and before is None
    rounds = max(1, warmup) if calibrate else warmup
    times: Dict[str, List[float]] = {k: [] for k in names}
    for r in range(rounds + repeat):
        for k in names[r % len(names):] + names[:r % len(names)]:
            if before is not None:
                before()
            sync()
            t0 = time.perf_counter()
            for _ in range(inner[k]):
                fns[k]()
            sync()
            times[k].append((time.perf_counter() - t0) * 1000.0 / inner[k])
        if r == rounds - 1:
            if calibrate:
                inner = {k: max(1, min(MAX_INNER, int(sample_ms / max(min(v), 1e-4)))) for k, v in times.items()}
            times = {k: [] for k in names}
    return times


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def spread(values: Sequence[float]) -> float:
    """Interquartile range over the median: how far one run's number can be trusted (0 = perfectly stable)."""
    if len(values) < 2:
        return 0.0
    q = statistics.quantiles(values, n=4, method="inclusive")
    mid = statistics.median(values)
    return (q[2] - q[0]) / mid if mid > 0 else 0.0
