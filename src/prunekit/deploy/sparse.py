"""Sparse CPU inference: run pruned Linear (and Conv2d) layers on torch.sparse CSR kernels, where it pays.

Unstructured masks leave a model at dense speed (:mod:`prunekit.apply.masking`); this
module turns sparse layers into :class:`SparseLinear` / :class:`SparseConv2d`,
which keep the weight as a CSR matrix with **int32** indices (torch's CPU CSR
kernels run about twice as fast with int32 as with the default int64).

Whether a layer pays is *measured* on this machine, at the batch size of your
example inputs, against the best dense form of the same layer (``F.linear``,
``addmm`` or ``matmul`` with a pre-transposed weight), never decided by a
sparsity constant: the break-even point moves with the layer shape, the batch
size, the thread count and the CPU. Which CSR kernel runs is also measured per
layer and batch size: torch's ``F.linear(x, W_csr)`` or ``addmm(b, W_csr, x.T).T``
(``mm_min_batch`` is their crossover), or prunekit's own C kernel in one of two forms
(:mod:`prunekit.deploy.native`: 16-bit column indices, so 6 instead of 8 bytes per
non-zero, which is what a memory-bound batch-1 layer pays for; used up to
``native_max_batch`` rows). The C kernel is compiled on first use where a C
compiler exists; without one, torch's kernels run alone.
COO is always slower than dense on CPU, so it is not offered. A layer timed on
its own stays in the CPU cache, which a forward pass through a model bigger
than the cache does not allow: for such models every timed call starts on a
cold cache (``cold_cache``), which brings per-layer timings closer to end-to-end ones.

Convolutions (``groups=1``) run as CSR times the unfolded input (a 1x1 conv
needs no unfold: it is a plain matrix product); they are converted only if that
measures faster than the dense convolution, which mostly means 1x1 convs or
very high sparsity at batch 1.

The converted model is for inference (``torch.no_grad()``): the CSR tensors are
buffers, not parameters. Its ``state_dict`` holds plain tensors (row pointers,
column indices, values, bias). :func:`to_dense` gives back ordinary layers.
"""
from __future__ import annotations

import copy
import difflib
import fnmatch
import functools
import glob
import math
import warnings
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from prunekit._util import call_model, eval_mode, median, progress_enabled, time_calls
from prunekit.apply.masking import MASK_SUFFIX
from prunekit.deploy import native, packed
from prunekit.deploy.packed import PackedLinear
from prunekit.errors import PrunekitError, UnknownNameError

__all__ = ["SparseLinear", "SparseConv2d", "DenseLinear", "KERNELS", "NATIVE_KERNELS", "DENSE_FORMS",
           "measure_break_even",
           "to_sparse", "to_dense", "to_dense_form", "csr_parts", "llc_bytes"]

TORCH_KERNELS = ("linear", "mm")
NATIVE_KERNELS = ("native", "native_simd")  # prunekit's own C kernel (prunekit.deploy.native): scalar / vectorised rows
KERNELS = TORCH_KERNELS + NATIVE_KERNELS
DENSE_FORMS = ("linear", "addmm_t", "matmul_t")
TYPES = ("Linear", "Conv2d")
#: sparsities measure_break_even sweeps by default
DEFAULT_SPARSITIES = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95)
#: kernel crossover used only when nothing is measured (measure=False); torch's typical crossover
UNMEASURED_MM_MIN_BATCH = 8
_DTYPES = (torch.float32, torch.float64)
# converted layers must match the dense layer this closely (relative to the output's scale); bfloat16
# outputs are rounded to 8 bits of mantissa, so a different summation order moves them by an ulp or two
_ATOL = {torch.bfloat16: 2e-2}
_ATOL_DEFAULT = 1e-5


# --------------------------------------------------------------------------------- CSR helpers
def csr_parts(weight: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(crow_indices, col_indices, values)`` of a 2-D tensor's non-zeros, int32 indices where they fit."""
    if weight.dim() != 2:
        raise PrunekitError(f"csr_parts needs a 2-D tensor, got shape {tuple(weight.shape)}")
    w = weight.detach()
    nonzero = w != 0
    crow = torch.zeros(w.shape[0] + 1, dtype=torch.int64, device=w.device)
    torch.cumsum(nonzero.sum(dim=1), dim=0, out=crow[1:])
    col = nonzero.nonzero()[:, 1]  # row-major order, matching w[nonzero]
    idx = torch.int32 if max(int(crow[-1]), w.shape[1]) < 2**31 else torch.int64
    return crow.to(idx), col.to(idx), w[nonzero].contiguous()


def _check_csr(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, shape: Tuple[int, int]) -> None:
    """Validate CSR parts (torch would read out of bounds on bad indices: a crash, not an error)."""
    rows, cols = shape
    nnz = values.numel()
    if col.dtype == torch.int16 and crow.dtype == torch.int32:  # the native kernel's uint16 column indices
        if cols > native.MAX_COL16:
            raise PrunekitError(f"16-bit column indices cannot address {cols} columns (at most {native.MAX_COL16})")
        col = _widen(col)
    elif crow.dtype not in (torch.int32, torch.int64) or col.dtype != crow.dtype:
        raise PrunekitError(f"CSR indices must both be int32 or int64 (or int32 and 16-bit columns), got "
                         f"{crow.dtype} and {col.dtype}")
    if crow.dim() != 1 or crow.numel() != rows + 1 or col.dim() != 1 or col.numel() != nnz or values.dim() != 1:
        raise PrunekitError(f"CSR parts do not fit a {rows}x{cols} matrix with {nnz} values "
                         f"(crow {tuple(crow.shape)}, col {tuple(col.shape)})")
    counts = crow.diff()
    if int(crow[0]) != 0 or int(crow[-1]) != nnz or bool((counts < 0).any()):
        raise PrunekitError(f"CSR row pointers must rise from 0 to nnz={nnz}")
    if nnz and (int(col.min()) < 0 or int(col.max()) >= cols):
        raise PrunekitError(f"CSR column index out of range [0, {cols})")
    row = torch.repeat_interleave(torch.arange(rows, device=crow.device), counts.long())
    if nnz > 1 and not bool(((col.diff() > 0) | (row.diff() != 0)).all()):
        raise PrunekitError("CSR column indices must be sorted and unique within each row")


def _widen(col: torch.Tensor) -> torch.Tensor:
    """int32 column indices from any stored form (int16 holds the native kernel's uint16 bits)."""
    return col.to(torch.int32) & 0xFFFF if col.dtype == torch.int16 else col


def _csr_tensor(crow, col, values, shape) -> torch.Tensor:
    with warnings.catch_warnings():  # "beta" / "invariant checks" notices: we validated the parts ourselves
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, col, values, shape, check_invariants=False)


class _SparseWeight(nn.Module):
    """CSR weight kept as three buffers (state_dict-safe), validated and cached as a sparse tensor."""

    def _init_weight(self, weight2d: torch.Tensor, bias: Optional[torch.Tensor], mask: Optional[torch.Tensor],
                     for_native: bool = False):
        crow, col, values = csr_parts(weight2d)
        if for_native:  # 16-bit where the layer allows (int16 wraps above 32767: the same bits, read as
            # uint16); torch's kernels get them widened (weight_csr)
            col = col.to(native.col_dtype(weight2d.shape[1]))
        self.register_buffer("crow_indices", crow)
        self.register_buffer("col_indices", col)
        self.register_buffer("values", values)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        if mask is not None:  # a prunekit mask (packed bits): kept so that to_dense restores it exactly
            self.register_buffer("weight" + MASK_SUFFIX, mask.detach().clone())
        self._shape2d = tuple(weight2d.shape)
        self._csr_cache: Optional[Tuple[tuple, Optional[torch.Tensor]]] = None

    def _parts(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The CSR buffers, validated whenever one changed (a kernel reading a bad index would crash)."""
        parts = (self.crow_indices, self.col_indices, self.values)
        key = tuple((t.data_ptr(), t._version, t.numel(), t.dtype) for t in parts)
        if self._csr_cache is None or self._csr_cache[0] != key:
            _check_csr(*parts, self._shape2d)
            self._csr_cache = (key, None)
        return parts

    def weight_csr(self) -> torch.Tensor:
        """The weight as a ``torch.sparse_csr_tensor`` (rebuilt only when a buffer changed)."""
        crow, col, values = self._parts()
        if self._csr_cache[1] is None:
            self._csr_cache = (self._csr_cache[0], _csr_tensor(crow, _widen(col), values, self._shape2d))
        return self._csr_cache[1]

    def dense_weight2d(self) -> torch.Tensor:
        return self.weight_csr().to_dense()

    @property
    def nnz(self) -> int:
        return self.values.numel()

    @property
    def sparsity(self) -> float:
        return 1.0 - self.nnz / max(1, math.prod(self._shape2d))

    def _restore(self, module: nn.Module) -> nn.Module:
        """Copy bias and mask onto the dense ``module`` (its weight already set)."""
        with torch.no_grad():
            if self.bias is not None:
                module.bias.copy_(self.bias)
        mask = self._buffers.get("weight" + MASK_SUFFIX)
        if mask is not None:
            module.register_buffer("weight" + MASK_SUFFIX, mask.clone())
        return module.train(self.training)

    def __getstate__(self):
        state = dict(super().__getstate__())
        state["_csr_cache"] = None  # deepcopy/pickle rebuild it from the buffers
        return state


# --------------------------------------------------------------------------------- modules
class SparseLinear(_SparseWeight):
    """``nn.Linear`` with a CSR weight. Which kernel runs depends on the rows ``x`` brings (see
    :meth:`kernel_for`): up to ``native_max_batch`` rows prunekit's own kernel (:mod:`prunekit.deploy.native`,
    16-bit column indices where the layer is at most 65536 wide), from ``mm_min_batch`` on
    ``addmm(b, W, x.T).T``, else ``F.linear(x, W_csr, b)``. None switches a kernel off."""

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *,
                 mm_min_batch: Optional[int] = UNMEASURED_MM_MIN_BATCH, native_max_batch: Optional[int] = None,
                 native_kernel: str = "native", mask: Optional[torch.Tensor] = None):
        super().__init__()
        if native_kernel not in NATIVE_KERNELS:
            raise PrunekitError(f"unknown native kernel {native_kernel!r}; allowed: {', '.join(NATIVE_KERNELS)}")
        if weight.dim() != 2 or weight.dtype not in _DTYPES:
            raise PrunekitError(f"SparseLinear needs a 2-D float32/float64 weight, got {weight.dtype} "
                             f"{tuple(weight.shape)}")
        if native_max_batch is not None:
            problem = native_problem(weight)
            if problem:
                raise PrunekitError(f"native_max_batch={native_max_batch} but the native kernel cannot run: {problem}")
        self.out_features, self.in_features = weight.shape
        self.mm_min_batch, self.native_max_batch, self.native_kernel = mm_min_batch, native_max_batch, native_kernel
        self._init_weight(weight, bias, mask, for_native=native_max_batch is not None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, mm_min_batch: Optional[int] = UNMEASURED_MM_MIN_BATCH,
                    native_max_batch: Optional[int] = None, native_kernel: str = "native"):
        """The zeros are taken from ``linear.weight`` itself; a prunekit mask is kept for :meth:`to_linear`."""
        return cls(linear.weight, linear.bias, mm_min_batch=mm_min_batch, native_max_batch=native_max_batch,
                   native_kernel=native_kernel, mask=linear._buffers.get("weight" + MASK_SUFFIX)
                   ).train(linear.training)

    def kernel_for(self, rows: int) -> str:
        if self.native_max_batch is not None and rows <= self.native_max_batch:
            return self.native_kernel
        return "mm" if self.mm_min_batch is not None and rows >= self.mm_min_batch else "linear"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        kernel = self.kernel_for(x2.shape[0])
        is_native = kernel in NATIVE_KERNELS
        if is_native and (x2.dtype != torch.float32 or x2.requires_grad or x2.device.type != "cpu"):
            kernel, is_native = "linear", False  # the C kernel has no autograd and reads float32 CPU memory only
        if is_native:
            y = native.spmm(*self._parts(), x2, self.bias, self.in_features, simd=kernel == "native_simd")
        else:
            y = _sparse_linear(kernel, x2, self.weight_csr(), self.bias)
        return y.reshape(*x.shape[:-1], self.out_features)

    def to_linear(self) -> nn.Linear:
        v = self.values
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=v.device, dtype=v.dtype)
        with torch.no_grad():
            out.weight.copy_(self.dense_weight2d())
        return self._restore(out)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"sparsity={self.sparsity:.3f}, mm_min_batch={self.mm_min_batch}, "
                f"native_max_batch={self.native_max_batch}, native_kernel={self.native_kernel}")


def native_problem(weight: torch.Tensor) -> Optional[str]:
    """Why prunekit's native kernel cannot run this weight (None: it can)."""
    if weight.dtype != torch.float32:
        return f"dtype {str(weight.dtype).replace('torch.', '')} (it runs float32)"
    if weight.device.type != "cpu":
        return f"on {weight.device} (it is a CPU kernel)"
    if weight.numel() >= 2**31:  # O(1), and enough: fewer entries means fewer non-zeros
        return "2^31 or more entries (row pointers are int32)"
    if not native.available():
        return native.unavailable_reason()
    return None


def _sparse_linear(kernel: str, x2: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    if kernel == "linear":
        return F.linear(x2, w, bias)
    # W @ x.T: the CSR matrix on the left is the layout torch's CPU kernel handles well for many rows;
    # the transposed result is a view, and a following SparseLinear's x.T is contiguous again
    if bias is None:
        return torch.sparse.mm(w, x2.t()).t()
    return torch.addmm(bias.unsqueeze(1), w, x2.t()).t()


class SparseConv2d(_SparseWeight):
    """``nn.Conv2d`` (groups=1, zero padding) as CSR weight times the unfolded input."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        problem = _conv_problem(conv)
        if problem:
            raise PrunekitError(f"SparseConv2d cannot run this convolution: {problem}")
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.stride = tuple(conv.kernel_size), tuple(conv.stride)
        self.padding, self.dilation = tuple(conv.padding), tuple(conv.dilation)
        self._init_weight(conv.weight.reshape(conv.out_channels, -1), conv.bias,
                          conv._buffers.get("weight" + MASK_SUFFIX))
        self.train(conv.training)

    def _is_pointwise(self) -> bool:
        return self.kernel_size == (1, 1) and self.stride == (1, 1) and self.padding == (0, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batched = x.dim() == 4
        x = x if batched else x.unsqueeze(0)
        n, _, h, w = x.shape
        ho, wo = (_out_size(s, k, st, p, d) for s, k, st, p, d in
                  zip((h, w), self.kernel_size, self.stride, self.padding, self.dilation))
        if self._is_pointwise():
            cols = x.reshape(n, self.in_channels, h * w)
        else:
            cols = F.unfold(x, self.kernel_size, self.dilation, self.padding, self.stride)
        wcsr, b = self.weight_csr(), self.bias
        if n == 1:  # no transposes at all: (out, C*k*k) @ (C*k*k, L)
            y = torch.sparse.mm(wcsr, cols[0]) if b is None else torch.addmm(b.unsqueeze(1), wcsr, cols[0])
            y = y.reshape(1, self.out_channels, ho, wo)
        else:
            cols = cols.transpose(0, 1).reshape(cols.shape[1], -1)
            y = torch.sparse.mm(wcsr, cols) if b is None else torch.addmm(b.unsqueeze(1), wcsr, cols)
            y = y.reshape(self.out_channels, n, ho, wo).transpose(0, 1).contiguous()
        return y if batched else y[0]

    def to_conv(self) -> nn.Conv2d:
        v = self.values
        out = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                        self.dilation, bias=self.bias is not None, device=v.device, dtype=v.dtype)
        with torch.no_grad():
            out.weight.copy_(self.dense_weight2d().reshape(out.weight.shape))
        return self._restore(out)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, sparsity={self.sparsity:.3f}")


def _out_size(size: int, k: int, stride: int, pad: int, dil: int) -> int:
    return (size + 2 * pad - dil * (k - 1) - 1) // stride + 1


def _conv_problem(conv: nn.Module) -> Optional[str]:
    if conv.groups != 1:
        return f"groups={conv.groups} (only groups=1)"
    if conv.padding_mode != "zeros":
        return f"padding_mode={conv.padding_mode!r} (only 'zeros')"
    if isinstance(conv.padding, str):
        return f"padding={conv.padding!r} (only explicit numbers)"
    return None


class DenseLinear(nn.Module):
    """A dense Linear run in one of :data:`DENSE_FORMS` (``*_t``: weight stored pre-transposed, contiguous)."""

    def __init__(self, linear: nn.Linear, form: str = "addmm_t"):
        super().__init__()
        if form not in DENSE_FORMS:
            raise PrunekitError(f"unknown dense form {form!r}; allowed: {', '.join(DENSE_FORMS)}")
        self.form, self.in_features, self.out_features = form, linear.in_features, linear.out_features
        w = linear.weight.detach()
        self.register_buffer("weight", w.clone() if form == "linear" else w.t().contiguous())
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        return _dense_linear(self.form, x2, self.weight, self.bias).reshape(*x.shape[:-1], self.out_features)


def _dense_linear(form: str, x2: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``w`` is (out, in) for "linear", the pre-transposed (in, out) for the ``*_t`` forms."""
    if form == "linear":
        return F.linear(x2, w, bias)
    if form == "addmm_t":
        return torch.mm(x2, w) if bias is None else torch.addmm(bias, x2, w)
    y = x2 @ w
    return y if bias is None else y + bias


# --------------------------------------------------------------------------------- timing
def _median_ms(fns: Dict[str, Callable[[], Any]], repeat: int, warmup: int = 2,
               evict: Optional[Callable[[], None]] = None) -> Dict[str, float]:
    """Median ms per call of each fn, by :func:`prunekit._util.time_calls` (order rotating every round, samples of
    tiny layers repeated to last ~SAMPLE_MS); with ``evict`` (untimed, before every call, warm-up included) each
    sample is one call on a cold cache instead. The one seam tests replace to fake the timings."""
    with torch.no_grad():
        times = time_calls(fns, repeat=repeat, warmup=warmup, before=evict)
    return {k: median(v) for k, v in times.items()}


@functools.lru_cache(maxsize=1)
def llc_bytes() -> int:
    """Size of the CPU's last-level cache (Linux sysfs of cpu0); 32 MiB where it cannot be read."""
    best_level, best = 0, 0
    for d in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*"):
        try:
            with open(f"{d}/level") as f:
                level = int(f.read())
            with open(f"{d}/size") as f:
                size = f.read().strip()
            num = int(size[:-1]) * {"K": 2**10, "M": 2**20, "G": 2**30}[size[-1].upper()] if size[-1].isalpha() \
                else int(size)
        except (OSError, ValueError, KeyError, IndexError):
            continue
        if level > best_level:
            best_level, best = level, num
    return best or 32 * 2**20


class _Evict:
    """Writes through twice the last-level cache: the next call reads its weights from memory, as it does
    in a forward pass of a model too big to stay in the cache (timing a lone layer would hide that)."""

    def __init__(self):
        self.buf = torch.zeros(2 * llc_bytes() // 4)

    def __call__(self) -> None:
        self.buf.add_(1.0)


def _evictor(cold_cache: Optional[bool], nbytes: int) -> Optional[_Evict]:
    """An evictor when measuring on a cold cache: ``cold_cache``, or (None) when ``nbytes`` exceed the cache."""
    cold = nbytes >= llc_bytes() if cold_cache is None else bool(cold_cache)
    return _Evict() if cold else None


def _linear_candidates(w: torch.Tensor, b: Optional[torch.Tensor], x2: torch.Tensor, csr: bool = True):
    """(dense fns, sparse fns) computing the same layer on ``x2`` (``csr=False``: no CSR kernels, e.g. for
    bfloat16, which torch's CSR kernels do not run)."""
    wt = w.t().contiguous()
    dense = {f: (lambda f=f: _dense_linear(f, x2, w if f == "linear" else wt, b)) for f in DENSE_FORMS}
    if not csr:
        return dense, {}
    crow, col, values = csr_parts(w)
    wcsr = _csr_tensor(crow, col, values, tuple(w.shape))
    sparse = {k: (lambda k=k: _sparse_linear(k, x2, wcsr, b)) for k in TORCH_KERNELS}
    if native_problem(w) is None:  # csr_parts is valid by construction: no need to re-check it
        col_n = col.to(native.col_dtype(w.shape[1]))
        for k in NATIVE_KERNELS:
            sparse[k] = functools.partial(native.spmm, crow, col_n, values, x2, b, w.shape[1],
                                          simd=k == "native_simd")
    return dense, sparse


PACKED_PREFIX = "packed_"  # kernel names of the packed formats: packed_bitmask, packed_nm24, packed_csr8


def _packed_candidates(module: nn.Linear, x2: torch.Tensor, formats: Sequence[str]) -> Dict[str, PackedLinear]:
    """``packed_<fmt>``: a :class:`PackedLinear` of the layer for each packed format its weight fits
    (:mod:`prunekit.deploy.packed`); none without the native library (the fallback unpacks on every call) or
    above ``packed.MAX_ROWS`` rows. Timed through ``forward``, as they will run."""
    if not formats or native.library() is None or x2.shape[0] > packed.MAX_ROWS:
        return {}
    return {PACKED_PREFIX + fmt: PackedLinear.from_linear(module, fmt=fmt).eval()
            for fmt in formats if packed.format_problem(module.weight.detach(), fmt) is None}


def _calls(modules: Dict[str, nn.Module], x: torch.Tensor) -> Dict[str, Callable[[], Any]]:
    return {k: functools.partial(m.forward, x) for k, m in modules.items()}


def _best(times: Dict[str, float], names: Sequence[str]) -> Tuple[str, float]:
    name = min(names, key=lambda k: times[k])
    return name, times[name]


class _Threads:
    """Run a block with ``n`` torch threads (None: as is), restoring the old count after."""

    def __init__(self, n: Optional[int]):
        self.n, self.old = n, torch.get_num_threads()

    def __enter__(self) -> int:
        if self.n is not None:
            if int(self.n) < 1:
                raise PrunekitError(f"threads must be >= 1, got {self.n}")
            torch.set_num_threads(int(self.n))
        return torch.get_num_threads()

    def __exit__(self, *exc) -> None:
        torch.set_num_threads(self.old)


# --------------------------------------------------------------------------------- break-even
def _random_sparse(out_f: int, in_f: int, sparsity: float, gen: torch.Generator, dtype) -> torch.Tensor:
    """Exactly ``round(sparsity * numel)`` zeros at random positions."""
    w = torch.randn(out_f, in_f, generator=gen, dtype=dtype)
    zeros = int(round(sparsity * w.numel()))
    w.view(-1)[torch.randperm(w.numel(), generator=gen)[:zeros]] = 0
    return w


def _break_even(rows: List[Dict[str, Any]]) -> Tuple[float, str]:
    """Lowest sparsity from which the sparse layer stays faster (speedup >= 1), linearly interpolated.

    Returns ``(sparsity, bound)``: bound "exact" (interpolated inside the sweep), "below" (already faster at
    the lowest measured sparsity: the break-even is at most that), "above" (never faster: it is above the
    highest measured sparsity).
    """
    pts = sorted((r["sparsity"], r["speedup"]) for r in rows)
    if pts[-1][1] < 1.0:
        return pts[-1][0], "above"
    i = len(pts) - 1
    while i > 0 and pts[i - 1][1] >= 1.0:
        i -= 1
    if i == 0:
        return pts[0][0], "below"
    (s0, v0), (s1, v1) = pts[i - 1], pts[i]
    return s0 + (1.0 - v0) * (s1 - s0) / (v1 - v0), "exact"


def _layer_candidates(out_features: int, in_features: int, s: float, x: torch.Tensor, gen: torch.Generator,
                      formats: Sequence[str]) -> Tuple[Dict[str, Callable[[], Any]], Dict[str, Callable[[], Any]]]:
    """(dense fns, sparse fns) of one random layer at sparsity ``s``: CSR kernels and packed formats."""
    dtype = x.dtype
    w = _random_sparse(out_features, in_features, s, gen, dtype)
    b = torch.randn(out_features, generator=gen, dtype=dtype)
    dense, sparse = _linear_candidates(w, b, x, csr=dtype in _DTYPES)
    layer = nn.Linear(in_features, out_features, dtype=dtype)
    with torch.no_grad():
        layer.weight.copy_(w)
        layer.bias.copy_(b)
    sparse.update(_calls(_packed_candidates(layer, x, formats), x))
    return dense, sparse


def _chained(fn_sets: List[Dict[str, Callable[[], Any]]]) -> Dict[str, Callable[[], Any]]:
    """One fn per name that calls that fn of every set in turn (the same layer shape, different weights)."""
    return {k: (lambda fs=[fns[k] for fns in fn_sets]: [f() for f in fs]) for k in fn_sets[0]}


def measure_break_even(out_features: int, in_features: int, batch: int, *,
                       sparsities: Sequence[float] = DEFAULT_SPARSITIES, threads: Optional[int] = None,
                       repeat: int = 10, seed: int = 0, dtype: torch.dtype = torch.float32,
                       cold_cache: Optional[bool] = None, formats: Sequence[str] = packed.FORMATS,
                       stream: bool = False) -> Dict[str, Any]:
    """Time a random ``out x in`` layer at ``batch`` rows: best dense form vs best sparse kernel (CSR kernels
    and the packed ``formats``), per sparsity.

    ``cold_cache``: evict the CPU cache before every timed call (None: when the dense layer takes more
    than half the last-level cache, so that a model of such layers could not keep them cached).
    ``stream``: instead, time a chain of distinct layers of this shape, together twice the last-level cache,
    called back to back (times per layer): how a decoder streams its weights at batch 1, without the
    cold-start costs a lone call after an eviction pays.
    Returns ``{"shape", "batch", "threads", "repeat", "cold_cache", "stream", "rows": [{"sparsity",
    "dense_ms", "dense_form", "sparse_ms", "kernel", "speedup", "kernels_ms"}], "break_even", "bound"}``
    (``bound``: "exact", "below" or "above", see :func:`_break_even`).
    """
    if min(out_features, in_features, batch) < 1 or repeat < 1:
        raise PrunekitError("out_features, in_features, batch and repeat must be >= 1")
    formats = _check_formats(formats)
    bad = [s for s in sparsities if not 0.0 <= s < 1.0]
    if not sparsities or bad:
        raise PrunekitError(f"sparsities must be a non-empty list of fractions in [0, 1), got {list(sparsities)}")
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, in_features, generator=gen, dtype=dtype)
    nbytes = out_features * in_features * x.element_size()
    copies = max(1, -(-2 * llc_bytes() // nbytes)) if stream else 1
    evict = None if stream else _evictor(cold_cache, 2 * nbytes)
    rows = []
    with _Threads(threads) as used:
        for s in tqdm(sorted(sparsities), desc=f"break-even {out_features}x{in_features} b{batch}",
                      disable=not progress_enabled(None), leave=False):
            sets = [_layer_candidates(out_features, in_features, s, x, gen, formats) for _ in range(copies)]
            dense, sparse = _chained([d for d, _ in sets]), _chained([sp for _, sp in sets])
            t = _median_ms({**{"d_" + k: f for k, f in dense.items()}, **{"s_" + k: f for k, f in sparse.items()}},
                           repeat, evict=evict)
            t = {k: v / copies for k, v in t.items()}
            form, dense_ms = _best(t, ["d_" + k for k in DENSE_FORMS])
            kernel, sparse_ms = _best(t, ["s_" + k for k in sparse])
            rows.append({"sparsity": s, "dense_ms": dense_ms, "dense_form": form[2:], "sparse_ms": sparse_ms,
                         "kernel": kernel[2:], "speedup": dense_ms / sparse_ms,
                         "kernels_ms": {k[2:]: v for k, v in t.items() if k.startswith("s_")}})
            del sets, dense, sparse
    point, bound = _break_even(rows)
    return {"shape": [out_features, in_features], "batch": batch, "threads": used, "repeat": repeat,
            "cold_cache": evict is not None, "stream": copies if stream else None, "rows": rows,
            "break_even": point, "bound": bound}


# --------------------------------------------------------------------------------- conversion
_CLASSES = {"Linear": nn.Linear, "Conv2d": nn.Conv2d}


def _owned_by_attention(model: nn.Module) -> set:
    """Linears whose parent reads their weight directly (nn.MultiheadAttention): not replaceable."""
    return {f"{n}.{c}" if n else c for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)
            for c, _ in m.named_children()}


def _select(model: nn.Module, layers: Optional[Sequence[str]], types: Sequence[str]) -> List[Tuple[str, nn.Module]]:
    bad = [t for t in types if t not in _CLASSES]
    if bad or not types:
        raise PrunekitError(f"unknown layer types {bad or list(types)}; allowed: {', '.join(TYPES)}")
    skip = _owned_by_attention(model)
    found = [(n, m) for n, m in model.named_modules()
             if n not in skip and any(type(m) is _CLASSES[t] for t in types)]  # exact types: subclasses may differ
    if layers is None:
        return found
    if isinstance(layers, str):
        layers = [layers]
    names = [n for n, _ in found]
    for pat in layers:
        if not any(fnmatch.fnmatchcase(n, pat) for n in names):
            close = difflib.get_close_matches(pat, names, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise UnknownNameError(f"layers: {pat!r} matches no {'/'.join(types)} module of {type(model).__name__}{hint} "
                           f"(known: {', '.join(names[:12])}{', ...' if len(names) > 12 else ''})")
    return [(n, m) for n, m in found if any(fnmatch.fnmatchcase(n, p) for p in layers)]


def _capture_inputs(model: nn.Module, example_inputs: Any, names: Sequence[str]) -> Dict[str, torch.Tensor]:
    """The input each named module receives when ``model`` runs ``example_inputs`` (eval mode, no grad)."""
    captured: Dict[str, torch.Tensor] = {}
    modules = dict(model.named_modules())

    def hook_for(name):
        def hook(_module, args):
            if name not in captured and args and isinstance(args[0], torch.Tensor):
                captured[name] = args[0].detach().clone()
        return hook

    handles = [modules[n].register_forward_pre_hook(hook_for(n)) for n in names]
    try:
        with eval_mode(model), torch.no_grad():
            call_model(model, example_inputs)
    finally:
        for h in handles:
            h.remove()
    return captured


LADDER = (1, 4, 16, 64)  # batch sizes at which to_sparse also measures the kernels, to set a layer's rules


def _kernel_rules(w: torch.Tensor, b: Optional[torch.Tensor], x2: torch.Tensor, at_rows: Dict[str, float],
                  opts: Dict[str, Any]) -> Tuple[Optional[int], Optional[int], Optional[str]]:
    """``(mm_min_batch, native_max_batch, native_kernel)`` measured on a ladder of batch sizes (:data:`LADDER` and the
    example's), so that other batch sizes at run time also get the kernel that is fastest for them.

    ``native_max_batch``: the largest batch up to which the native kernel beats both torch kernels at every
    measured batch (None: not even at the smallest). ``mm_min_batch``: the smallest batch from which ``mm``
    beats ``linear`` at every larger measured batch (None: never).
    """
    rows = x2.shape[0]
    times = {rows: at_rows}
    for batch in LADDER:
        if batch != rows:
            xb = x2[torch.arange(batch) % rows]
            times[batch] = _median_ms(_linear_candidates(w, b, xb)[1], max(3, opts["repeat"] // 2),
                                      evict=opts["evict"])
    native_max = None
    for batch in sorted(times):
        t = times[batch]
        if "native" not in t or min(t[k] for k in NATIVE_KERNELS) >= min(t[k] for k in TORCH_KERNELS):
            break
        native_max = batch
    mm_min = None
    for batch in sorted(times, reverse=True):
        if not times[batch]["mm"] < times[batch]["linear"]:
            break
        mm_min = batch
    # the two native loops differ at batch 1 only (larger batches share one loop): pick by batch 1's times
    variant = None if native_max is None else min(NATIVE_KERNELS, key=lambda k: times[1][k])
    return mm_min, native_max, variant


def _measure_linear(module: nn.Linear, x: torch.Tensor, entry: Dict[str, Any], opts: Dict[str, Any]) -> nn.Module:
    """Time the layer's dense forms, CSR kernels and packed formats at the example's batch; the fastest
    sparse one becomes the replacement (a :class:`PackedLinear`, or a :class:`SparseLinear` whose kernel
    rules are measured on a ladder of batch sizes)."""
    w, b = module.weight.detach(), None if module.bias is None else module.bias.detach()
    x2 = x.reshape(-1, module.in_features)
    dense, sparse = _linear_candidates(w, b, x2, csr=w.dtype in _DTYPES)
    packs = _packed_candidates(module, x2, opts["formats"])
    sparse.update(_calls(packs, x2))
    t = _median_ms({**{"d_" + k: f for k, f in dense.items()}, **{"s_" + k: f for k, f in sparse.items()}},
                   opts["repeat"], evict=opts["evict"])
    form, dense_ms = _best(t, ["d_" + k for k in DENSE_FORMS])
    kernels = {k: t["s_" + k] for k in sparse}
    csr = {k: v for k, v in kernels.items() if not k.startswith(PACKED_PREFIX)}
    best_packed = min(packs, key=kernels.get, default=None)
    mm_min = native_max = None
    if best_packed is not None and (not csr or kernels[best_packed] < min(csr.values())):
        sparse_mod: nn.Module = packs[best_packed]
        kernel = best_packed
    else:
        mm_min, native_max, variant = _kernel_rules(w, b, x2, csr, opts)
        sparse_mod = SparseLinear.from_linear(module, mm_min_batch=mm_min, native_max_batch=native_max,
                                              native_kernel=variant or "native")
        kernel = sparse_mod.kernel_for(x2.shape[0])  # the kernel it will really run at this batch
    entry.update(batch=x2.shape[0], dense_ms=dense_ms, dense_form=form[2:], sparse_ms=kernels[kernel],
                 kernel=kernel, mm_min_batch=mm_min, native_max_batch=native_max, speedup=dense_ms / kernels[kernel],
                 kernels_ms=kernels)
    return sparse_mod


def _measure_conv(module: nn.Conv2d, x: torch.Tensor, entry: Dict[str, Any], opts: Dict[str, Any]) -> SparseConv2d:
    sparse_mod = SparseConv2d(module)
    t = _median_ms({"dense": lambda: module(x), "sparse": lambda: sparse_mod(x)}, opts["repeat"],
                   evict=opts["evict"])
    entry.update(batch=x.shape[0] if x.dim() == 4 else 1, dense_ms=t["dense"], dense_form="conv2d",
                 sparse_ms=t["sparse"], kernel="unfold_mm", speedup=t["dense"] / t["sparse"])
    return sparse_mod


def _new_entry(name: str, module: nn.Module) -> Dict[str, Any]:
    w = module.weight
    return {"name": name, "type": type(module).__name__, "shape": list(w.shape),
            "sparsity": float((w == 0).sum()) / max(1, w.numel()), "batch": None, "dense_ms": None,
            "dense_form": None, "sparse_ms": None, "kernel": None, "speedup": None, "mm_min_batch": None,
            "native_max_batch": None, "kernels_ms": None,
            "converted": False, "reason": ""}


def _packed_ok(module: nn.Module, formats: Sequence[str]) -> bool:
    """Whether a packed format could take this layer (a bfloat16 Linear has no CSR kernel but may pack)."""
    return (isinstance(module, nn.Linear) and module.weight.dtype in packed.VALUE_DTYPES and bool(formats)
            and native.library() is not None)


def _unsupported(module: nn.Module, formats: Sequence[str] = ()) -> Optional[str]:
    w = module.weight
    if w.dtype not in _DTYPES and not _packed_ok(module, formats):
        return (f"dtype {str(w.dtype).replace('torch.', '')} (CSR kernels run float32/float64; packed formats "
                f"float32/bfloat16 Linear layers, with the native library)")
    if w.device.type != "cpu":
        return f"on {w.device} (the CSR kernels measured here are CPU ones)"
    return _conv_problem(module) if isinstance(module, nn.Conv2d) else None


def _matches(dense: nn.Module, sparse: nn.Module, x: torch.Tensor) -> Tuple[bool, float]:
    with torch.no_grad():
        want, got = dense(x), sparse(x)
    err = float((want - got).abs().max()) if want.numel() else 0.0
    tol = _ATOL.get(want.dtype, _ATOL_DEFAULT)
    return err <= tol * max(1.0, float(want.abs().max()) if want.numel() else 0.0), err


def _unmeasured(module: nn.Module, formats: Sequence[str]) -> nn.Module:
    """The replacement ``measure=False`` gives: CSR where torch's kernels run the dtype, else the first
    packed format that fits (bfloat16)."""
    if isinstance(module, nn.Conv2d):
        return SparseConv2d(module)
    if module.weight.dtype in _DTYPES:
        return SparseLinear.from_linear(module)
    fmt = next(f for f in formats if packed.format_problem(module.weight, f) is None)
    return PackedLinear.from_linear(module, fmt=fmt)


def _convert_one(name: str, module: nn.Module, x: Optional[torch.Tensor], opts: Dict[str, Any]):
    """(report entry, replacement module or None) for one candidate layer."""
    entry = _new_entry(name, module)
    problem = _unsupported(module, opts["formats"])
    if problem or x is None:
        entry["reason"] = (f"unsupported: {problem}" if problem else "not called by forward on example_inputs")
        return entry, None
    if entry["sparsity"] == 0.0 or entry["sparsity"] < opts["min_sparsity"]:  # CSR of a full matrix never wins
        entry["reason"] = f"sparsity {entry['sparsity']:.3f} (no zeros or < min_sparsity={opts['min_sparsity']})"
        return entry, None
    if not opts["measure"]:
        new = _unmeasured(module, opts["formats"])
        entry.update(mm_min_batch=getattr(new, "mm_min_batch", None), reason="not measured (measure=False)")
    else:
        measure = _measure_linear if isinstance(module, nn.Linear) else _measure_conv
        new = measure(module, x, entry, opts)
        if entry["speedup"] < opts["min_speedup"]:
            entry["reason"] = f"measured {entry['speedup']:.2f}x < min_speedup={opts['min_speedup']}"
            return entry, None
        entry["reason"] = f"measured {entry['speedup']:.2f}x >= min_speedup={opts['min_speedup']}"
    ok, err = _matches(module, new, x)
    if not ok:  # never trade correctness for speed
        entry["reason"] = f"sparse output differs from dense by {err:.2e}"
        return entry, None
    entry["converted"] = True
    return entry, new


def _sparse_footprint(model: nn.Module, candidates: Sequence[Tuple[str, nn.Module]]) -> int:
    """Bytes the model would stream per forward if every candidate ran sparse (value + 16- or 32-bit index
    per non-zero, row pointers): what decides whether the *converted* model stays in the cache. A 95%-sparse
    model can fit where the dense one (and a 90%-sparse one) cannot, and its kernels then rank differently."""
    sparse_weights = {id(m.weight) for _, m in candidates}
    total = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers())
                if id(t) not in sparse_weights)
    for _, m in candidates:
        w = m.weight.reshape(m.weight.shape[0], -1)
        index = native.col_dtype(w.shape[1]).itemsize
        total += int((w != 0).sum()) * (w.element_size() + index) + 4 * (w.shape[0] + 1)
    return total


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, attr, module)


def _check_formats(formats: Sequence[str]) -> Tuple[str, ...]:
    formats = (formats,) if isinstance(formats, str) else tuple(formats)
    bad = [f for f in formats if f not in packed.FORMATS]
    if bad:
        raise PrunekitError(f"unknown packed formats {bad}; allowed: {', '.join(packed.FORMATS)} (or () for none)")
    return formats


def _check_options(min_speedup: float, min_sparsity: float, repeat: int) -> None:
    if not (isinstance(min_speedup, (int, float)) and math.isfinite(min_speedup) and min_speedup > 0):
        raise PrunekitError(f"min_speedup must be a positive number, got {min_speedup!r}")
    if not (isinstance(min_sparsity, (int, float)) and 0.0 <= min_sparsity <= 1.0):
        raise PrunekitError(f"min_sparsity must be a fraction in [0, 1], got {min_sparsity!r}")
    if not isinstance(repeat, int) or repeat < 1:
        raise PrunekitError(f"repeat must be an int >= 1, got {repeat!r}")


def to_sparse(model: nn.Module, example_inputs: Any, *, min_speedup: float = 1.1,
              layers: Optional[Sequence[str]] = None, measure: bool = True, min_sparsity: float = 0.0,
              types: Sequence[str] = TYPES, threads: Optional[int] = None, repeat: int = 7,
              cold_cache: Optional[bool] = None, formats: Sequence[str] = packed.FORMATS,
              model_timing: bool = True) -> Tuple[nn.Module, List[Dict[str, Any]]]:
    """A copy of ``model`` whose Linear/Conv2d layers run on sparse kernels where that measurably pays.

    The kernels: torch's CSR kernels, prunekit's native CSR kernel, and (Linear layers, up to
    ``packed.MAX_ROWS`` rows, float32 or bfloat16) the packed ``formats`` of :mod:`prunekit.deploy.packed`
    (bitmask, 2:4, 8-bit-delta CSR: about one index bit per weight, for memory-bound batch-1 decoding).
    ``model_timing``: then also time the whole model with every layer that fits it in one packed format, and
    keep that where it beats the layer-by-layer choices (see :func:`_settle_packed`).

    Each candidate layer (``layers``: module names or globs; default all of ``types``) is timed on this
    machine, on the input it receives from ``example_inputs`` (so at that batch size), against the best
    dense form of the same layer; it is converted only if ``dense_ms / sparse_ms >= min_speedup`` and its
    outputs match the dense layer's (within 1e-5 of their scale). ``measure=False`` converts every
    supported candidate with sparsity >= ``min_sparsity`` without timing anything. ``threads`` fixes the
    torch threads while measuring (use the count you deploy with). ``cold_cache``: evict the CPU cache
    before each timed call, as a forward pass of a model bigger than the cache sees its layers (None: when
    the converted model, its candidates counted as sparse, would exceed the last-level cache). ``model`` is
    never modified; masked prunekit models work as they are (the zeros come from the weights).

    Returns ``(sparse_model, report)``: one dict per candidate with ``name, type, shape, sparsity, batch,
    dense_ms, dense_form, sparse_ms, kernel, speedup, mm_min_batch, native_max_batch, kernels_ms, converted,
    reason, threads, cold_cache`` (and ``model_ms``, the whole-model times of the packed options, where
    ``model_timing`` timed them; a layer converted by that choice reports the whole model's speedup).
    """
    _check_options(min_speedup, min_sparsity, repeat)
    formats = _check_formats(formats)
    new = copy.deepcopy(model)
    candidates = _select(new, layers, types)
    inputs = _capture_inputs(new, example_inputs, [n for n, _ in candidates])
    nbytes = _sparse_footprint(new, candidates)
    opts = {"min_speedup": float(min_speedup), "min_sparsity": float(min_sparsity), "measure": measure,
            "repeat": repeat, "formats": formats, "evict": _evictor(cold_cache, nbytes) if measure and candidates else None}
    report = []
    with _Threads(threads) as used:
        for name, module in tqdm(candidates, desc="to_sparse", disable=not progress_enabled(None), leave=False):
            entry, replacement = _convert_one(name, module, inputs.get(name), opts)
            entry.update(threads=used, cold_cache=opts["evict"] is not None)
            report.append(entry)
            if replacement is not None:
                replacement.train(module.training)
                if name:
                    _set_module(new, name, replacement)
                else:  # the model is itself a single layer
                    new = replacement
        if measure and model_timing:
            new = _settle_packed(new, dict(candidates), inputs, example_inputs, report, opts)
        if measure:
            _settle_native_loop(new, example_inputs, report, repeat)
    return new, report


def _packed_layers(originals: Dict[str, nn.Module], report: List[Dict[str, Any]], formats: Sequence[str]) -> List[str]:
    """The sparse Linear layers a packed format could take at the example's batch, in model order."""
    if not formats or native.library() is None:
        return []
    return [e["name"] for e in report
            if e["name"] and isinstance(originals[e["name"]], nn.Linear) and e["batch"] is not None
            and e["batch"] <= packed.MAX_ROWS and e["sparsity"] > 0.0 and _unsupported(originals[e["name"]], formats) is None]


def _packed_options(model: nn.Module, originals: Dict[str, nn.Module], names: List[str],
                    formats: Sequence[str]) -> Dict[str, Dict[str, nn.Module]]:
    """What each layer runs as under each option: as measured alone, dense, or every layer that fits a packed
    format in that format (the others as measured). A layer "fits" if its packed form reads fewer bytes than
    its dense weight: at batch 1 reading more bytes cannot pay (a nearly dense lm_head, say)."""
    measured = {n: model.get_submodule(n) for n in names}
    options = {"as measured": measured, "dense": {n: originals[n] for n in names}}
    for fmt in formats:
        packs = {}
        for n in names:
            w = originals[n].weight.detach()
            if packed.format_problem(w, fmt) is not None:
                continue
            mine = measured[n]  # the layer-by-layer choice may already be this very format: no second packing
            mod = mine if isinstance(mine, PackedLinear) and mine.fmt == fmt else \
                PackedLinear.from_linear(originals[n], fmt=fmt).eval()
            if mod.nbytes() < packed.dense_bytes(tuple(w.shape), w.dtype):
                packs[n] = mod
        if packs:
            options[PACKED_PREFIX + fmt] = {**measured, **packs}
    return options


def _settle_packed(model: nn.Module, originals: Dict[str, nn.Module], inputs: Dict[str, torch.Tensor],
                   example_inputs: Any, report: List[Dict[str, Any]], opts: Dict[str, Any]) -> nn.Module:
    """Time the whole model as measured layer by layer, all dense, and with every layer that fits it in one
    packed format, and keep the fastest packed option if it beats both (by ``min_speedup`` over dense).

    Why: a layer timed alone after a cache eviction also pays cold-start costs (code, Python objects, page
    walks) that a forward pass spreads over all its layers, and cannot show how one layer's weights stream
    from memory while the next computes: at batch 1 a big model is bound by the bytes it reads, which only
    the whole model measures. Whole-model options change many layers at once, so their differences stand
    well above timing noise, where one layer's share of a forward pass would not. Outputs are checked like
    every conversion."""
    names = _packed_layers(originals, report, opts["formats"])
    if not names:
        return model
    options = _packed_options(model, originals, names, opts["formats"])

    def run_with(assign):
        for n, m in assign.items():
            _set_module(model, n, m)
        call_model(model, example_inputs)

    with eval_mode(model), torch.no_grad():
        t = _median_ms({k: functools.partial(run_with, v) for k, v in options.items()}, max(3, opts["repeat"]))
    best = _packed_choice(t, opts["min_speedup"])
    changed = {n: m for n, m in options[best].items() if m is not options["as measured"][n]}
    if not all(_matches(originals[n], m, inputs[n])[0] for n, m in changed.items()):
        best, changed = "as measured", {}  # never trade correctness for speed
    entries = {e["name"]: e for e in report}
    for n in names:
        _set_module(model, n, options[best][n])
        _record_packed_choice(entries[n], best if n in changed else "as measured", t, len(changed))
    return model


def _packed_choice(times: Dict[str, float], min_speedup: float) -> str:
    """A packed option replaces the layer-by-layer choices only if the whole model runs faster with it, and at
    least ``min_speedup`` times faster than all dense ("dense" is the yardstick, never chosen here: it would
    revert layers measured faster alone, on the strength of one whole-model comparison)."""
    packed_opts = [k for k in times if k.startswith(PACKED_PREFIX) and times["dense"] / times[k] >= min_speedup]
    best = min(packed_opts, key=times.get, default=None)
    return best if best is not None and times[best] < times["as measured"] else "as measured"


def _record_packed_choice(entry: Dict[str, Any], best: str, times: Dict[str, float], size: int) -> None:
    entry["model_ms"] = dict(times)
    if best == "as measured":
        return
    entry.update(converted=True, kernel=best, speedup=times["dense"] / times[best],
                 sparse_ms=(entry.get("kernels_ms") or {}).get(best, entry["sparse_ms"]))
    entry["reason"] = (f"{best}, with {size} layer(s), after timing the whole model: {times[best]:.2f} ms vs "
                       f"{times['dense']:.2f} ms dense, {times['as measured']:.2f} ms as measured layer by layer "
                       f"(speedup is the whole model's); alone: {entry['reason']}")


def _settle_native_loop(model: nn.Module, example_inputs: Any, report: List[Dict[str, Any]], repeat: int) -> None:
    """Time the whole converted model with each native loop, as chosen per layer or the same for all layers,
    and keep the fastest: which loop wins depends on what the *other* layers leave in the cache, which
    timing one layer alone cannot see (a 95%-sparse MLP fits in the cache as a whole, a 90% one does not)."""
    # the two loops differ at batch 1 only: settle the layers that run one of them there
    at_one = {r["name"] for r in report if r["converted"] and r["batch"] == 1 and r["kernel"] in NATIVE_KERNELS}
    layers = {n: m for n, m in model.named_modules() if n in at_one}
    if not layers:
        return
    chosen = {n: m.native_kernel for n, m in layers.items()}
    options = {"as measured": chosen}
    for k in NATIVE_KERNELS:
        if set(chosen.values()) != {k}:  # the same assignment is not timed twice
            options[k] = {n: k for n in layers}

    def run_with(assign):
        for n, m in layers.items():
            m.native_kernel = assign[n]
        call_model(model, example_inputs)

    with eval_mode(model), torch.no_grad():
        t = _median_ms({k: functools.partial(run_with, v) for k, v in options.items()}, max(3, repeat))
    best = options[min(t, key=t.get)]
    for n, m in layers.items():
        m.native_kernel = best[n]
    for entry in report:
        name = entry["name"]
        if name in best and best[name] != chosen[name]:
            entry["kernel"] = best[name]
            entry["sparse_ms"] = entry["kernels_ms"][best[name]]
            entry["speedup"] = entry["dense_ms"] / entry["sparse_ms"]
            entry["reason"] += f"; native loop {best[name]} kept after timing the whole model"


def to_dense(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every SparseLinear / SparseConv2d back as nn.Linear / nn.Conv2d (masks too)."""
    new = copy.deepcopy(model)
    if isinstance(new, (SparseLinear, PackedLinear)):
        return new.to_linear()
    if isinstance(new, SparseConv2d):
        return new.to_conv()
    for name, m in list(new.named_modules()):
        if isinstance(m, (SparseLinear, PackedLinear)):
            _set_module(new, name, m.to_linear())
        elif isinstance(m, SparseConv2d):
            _set_module(new, name, m.to_conv())
    return new


def to_dense_form(model: nn.Module, form: str = "addmm_t") -> nn.Module:
    """A copy of ``model`` with every nn.Linear run as :class:`DenseLinear` in ``form`` (for fair baselines)."""
    if form not in DENSE_FORMS:
        raise PrunekitError(f"unknown dense form {form!r}; allowed: {', '.join(DENSE_FORMS)}")
    new = copy.deepcopy(model)
    if type(new) is nn.Linear:
        return DenseLinear(new, form)
    skip = _owned_by_attention(new)
    for name, m in list(new.named_modules()):
        if type(m) is nn.Linear and name not in skip:
            _set_module(new, name, DenseLinear(m, form).train(m.training))
    return new
