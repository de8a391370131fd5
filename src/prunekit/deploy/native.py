"""prunekit's own CPU sparse kernel (``_native/spmm.c``), compiled on this machine on first use.

Why: at small batches a sparse layer is memory-bound, and torch's CSR kernel reads 8 bytes per non-zero
(float32 value + int32 column index). Layers up to 65536 inputs wide need only 16-bit column indices, so
this kernel reads 6 bytes per non-zero (at batch 1 in two forms, eight scalar sums per row or one
vectorised sum, timed against each other like every kernel).
:mod:`prunekit.deploy.sparse` offers it as one more kernel (``"native"``) and, as for every kernel, uses it only
where it measures faster on this machine.

The C source ships with the package and is compiled with the system C compiler (``$CC``, else ``cc``,
``gcc`` or ``clang``) for this CPU (``-march=native``) into the prunekit cache
(``$PRUNEKIT_CACHE_DIR/native``), atomically, keyed by the source, the flags, the compiler and the CPU.
Without a compiler (or with ``PRUNEKIT_NATIVE=0``) :func:`available` is False, :func:`unavailable_reason`
says why, and prunekit runs on torch's kernels only. The library is called through ``ctypes`` (which
releases the GIL) with raw pointers, so every CSR handed to :func:`spmm` must have been validated first
(:func:`prunekit.deploy.sparse._check_csr` does it): the kernel itself checks no bounds.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from importlib import resources
from pathlib import Path
from typing import Optional, Tuple

import torch

from prunekit._util import default_cache_dir
from prunekit.errors import PrunekitError

__all__ = ["available", "unavailable_reason", "parallel", "simd", "spmm", "MAX_COL16", "library_path", "library"]

MAX_COL16 = 1 << 16  # layers up to this many inputs store 16-bit column indices
FLAGS = ("-O3", "-march=native", "-fPIC", "-shared")
# OpenMP where the compiler has it: loaded after torch, the library shares torch's libgomp and its threads
OPENMP = ("-fopenmp",)
SIMD_ONLY = ("-fopenmp-simd",)  # no OpenMP runtime: one thread, but the row sums are still vectorised
_ENV_SWITCH = "PRUNEKIT_NATIVE"
_COMPILERS = ("cc", "gcc", "clang")


SOURCES = ("spmm.c", "packed.c")  # one library: CSR kernels (spmm.c) and the packed decode formats (packed.c)


def _read(name: str) -> bytes:
    return resources.files("prunekit.deploy").joinpath("_native", name).read_bytes()


def _source() -> bytes:
    """Every source, in order: what the cached library is keyed on."""
    return b"\0".join(_read(name) for name in SOURCES)


def _compiler() -> Optional[str]:
    env = os.environ.get("CC")
    names = (env,) if env else _COMPILERS
    for name in names:
        path = shutil.which(name)
        if path:
            return path
    return None


def _cpu_key() -> str:
    """-march=native code must not run on another CPU (a cache dir shared over NFS): key on the CPU."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags"))][:2]
    except OSError:
        lines = []
    return "".join(lines) or platform.processor() or platform.machine()


def _compiler_version(cc: str) -> str:
    try:
        out = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30)
        return out.stdout.splitlines()[0] if out.stdout else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def library_path(cc: str) -> Path:
    """Where the compiled library for this source, compiler and CPU lives in the cache."""

    key = hashlib.sha256(b"\0".join([_source(), " ".join(FLAGS + OPENMP).encode(), cc.encode(),
                                     _compiler_version(cc).encode(), _cpu_key().encode()])).hexdigest()[:20]
    return default_cache_dir() / "native" / f"spmm-{key}.so"


def _compile(cc: str, target: Path) -> None:
    """Compile to a temp file beside ``target`` and rename: concurrent processes never load half a file.
    With OpenMP if the compiler supports it, else without (the kernel then runs on one thread)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        srcs = []
        for name in SOURCES:
            srcs.append(str(Path(tmp) / name))
            Path(srcs[-1]).write_bytes(_read(name))
        out = Path(tmp) / target.name
        errors = []
        for extra in (OPENMP, SIMD_ONLY, ()):
            res = subprocess.run([cc, *FLAGS, *extra, *srcs, "-o", str(out), "-lm"], capture_output=True, text=True,
                                 timeout=120)
            if res.returncode == 0:
                os.replace(out, target)
                return
            errors.append((res.stderr or res.stdout).strip()[-300:])
        raise RuntimeError(f"{cc} failed: {errors[-1]}")


@functools.lru_cache(maxsize=1)
def _load() -> Tuple[Optional[ctypes.CDLL], str]:
    if os.environ.get(_ENV_SWITCH, "1").strip().lower() in ("0", "false", "no", "off"):
        return None, f"disabled by {_ENV_SWITCH}={os.environ[_ENV_SWITCH]}"
    cc = _compiler()
    if cc is None:
        return None, "no C compiler found ($CC, cc, gcc or clang)"
    try:
        path = library_path(cc)
        if not path.exists():
            _compile(cc, path)
        lib = ctypes.CDLL(str(path))
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        return None, f"could not build the native kernel: {exc}"
    lib.prunekit_spmm_parallel.restype = ctypes.c_int
    fn = lib.prunekit_spmm
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int,
                   ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
    _declare_packed(lib)
    return lib, ""


def _declare_packed(lib: ctypes.CDLL) -> None:
    i64, ptr, cint = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    lib.prunekit_packed_mv.restype = cint
    lib.prunekit_packed_mv.argtypes = [cint, cint, i64, i64, ptr, ptr, ptr, ptr, ptr, i64, ptr, ptr, cint]
    lib.prunekit_packed_unpack.restype = cint
    lib.prunekit_packed_unpack.argtypes = [cint, cint, i64, i64, ptr, ptr, ptr, ptr, ptr]
    lib.prunekit_packed_simd.restype = cint


def library() -> Optional[ctypes.CDLL]:
    """The loaded library (built on the first call), or None where it cannot be built (see :func:`unavailable_reason`)."""
    return _load()[0]


def simd() -> bool:
    """Whether the packed kernels were compiled with their AVX-512 loops (else a portable loop runs)."""
    lib = _load()[0]
    return bool(lib is not None and lib.prunekit_packed_simd())


def available() -> bool:
    """Whether the native kernel could be built and loaded here (built on the first call)."""
    return _load()[0] is not None


def parallel() -> bool:
    """Whether the kernel was built with OpenMP (so ``threads > 1`` run in parallel)."""
    lib = _load()[0]
    return bool(lib is not None and lib.prunekit_spmm_parallel())


def unavailable_reason() -> str:
    """Why :func:`available` is False ("" when it is True)."""
    return _load()[1]


def col_dtype(in_features: int) -> torch.dtype:
    """The column-index dtype the kernel reads for a layer this wide (int16 holds uint16 bits)."""
    return torch.int16 if in_features <= MAX_COL16 else torch.int32


def _check_args(crow, col, values, x2, bias, in_features: int) -> None:
    """The O(1) checks that keep the C kernel inside its buffers (column bounds are the caller's:
    :func:`prunekit.deploy.sparse._check_csr` validates them once per weight)."""
    if crow.dtype != torch.int32 or col.dtype not in (torch.int16, torch.int32) or values.dtype != torch.float32:
        raise PrunekitError(f"native kernel needs int32 row pointers, int16/int32 columns and float32 values, got "
                         f"{crow.dtype}, {col.dtype}, {values.dtype}")
    if x2.dtype != torch.float32 or x2.dim() != 2 or x2.shape[1] != in_features:
        raise PrunekitError(f"native kernel needs float32 input of shape (batch, {in_features}), got {x2.dtype} "
                         f"{tuple(x2.shape)}")
    if col.dtype == torch.int16 and in_features > MAX_COL16:
        raise PrunekitError(f"16-bit column indices cannot address {in_features} inputs")
    rows, nnz = crow.numel() - 1, values.numel()
    if rows < 0 or col.numel() != nnz or int(crow[-1]) != nnz or (bias is not None and bias.numel() != rows):
        raise PrunekitError("native kernel: CSR parts (or bias) do not fit together")
    if any(t.device.type != "cpu" for t in (crow, col, values, x2)):
        raise PrunekitError("native kernel runs on CPU tensors only")


def spmm(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, x2: torch.Tensor,
         bias: Optional[torch.Tensor], in_features: int, threads: Optional[int] = None,
         simd: bool = False) -> torch.Tensor:
    """``x2 @ W.T + bias`` for a *validated* CSR ``W`` of ``in_features`` columns (int32 ``crow``; ``col``
    int16 holding uint16 bits, or int32; float32 ``values``) and a float32 ``x2`` of shape (batch, in).
    ``simd``: at batch 1, one vectorised sum per row instead of eight scalar ones. Returns (batch, out)."""
    lib = _load()[0]
    if lib is None:
        raise RuntimeError(f"the native sparse kernel is not available: {unavailable_reason()}")
    _check_args(crow, col, values, x2, bias, in_features)
    crow, col, values = crow.contiguous(), col.contiguous(), values.contiguous()  # raw pointers: no strides
    rows, batch = crow.numel() - 1, x2.shape[0]
    # (in, batch) activations: the batch values one non-zero multiplies are contiguous; for batch 1 the
    # transpose is free, and the (out, batch) result's transpose is what the next layer wants again
    xt = x2.t().contiguous()
    y = torch.empty(rows, batch, dtype=torch.float32)
    b = None if bias is None else bias.detach().to(torch.float32).contiguous()
    code = lib.prunekit_spmm(rows, batch, crow.data_ptr(), col.data_ptr(), col.element_size(),
                             values.data_ptr(), xt.data_ptr(), None if b is None else b.data_ptr(),
                             y.data_ptr(), int(threads or torch.get_num_threads()), int(bool(simd)))
    if code != 0:
        raise RuntimeError(f"native sparse kernel rejected its arguments (code {code})")
    return y.t()
