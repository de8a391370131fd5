"""Packed sparse weights for batch-1 decoding: about one bit of index per weight instead of CSR's 16-32.

At batch 1 (token-by-token LLM decoding) a Linear layer reads every weight once per token, so it runs
at the speed memory delivers bytes. A format that moves fewer bytes per weight is faster in proportion,
even at the 50-70% sparsity one-shot LLM pruning reaches; CSR's 2-4 index bytes per kept value need
~80% sparsity before they read fewer bytes than the dense matrix. Formats (:data:`FORMATS`):

``bitmask``  one bit per weight (uint64 words per row) + the kept values packed in row order + an int32
             offset per row. Bytes per weight: 1/8 + density x value bytes.
``nm24``     2:4 sparsity: a 4-bit pattern per group of 4 weights (the same bits as two 2-bit indices)
             + exactly 2 value slots per group, so every value sits at a fixed offset. 1/8 + value/2.
``csr8``     CSR with 8-bit column deltas (a gap of more than 255 columns stores an explicit zero):
             1 + value bytes per kept weight. Fewer bytes than ``bitmask`` only above ~85% sparsity.

Values are float32 or bfloat16 (the weight's own dtype: packing never rounds). The kernels live in
:mod:`prunekit.deploy.native` (``_native/packed.c``: AVX-512 expand + FMA where the CPU has it, OpenMP
threads, results independent of the thread count). Without a C compiler the same products run through
torch on the unpacked weight (correct, slow: :func:`prunekit.deploy.sparse.to_sparse` measures before it
converts, so it will not choose them then).

:class:`PackedLinear` runs up to ``max_rows`` rows per call on the kernel (which reads the packed weight
once per 8 rows) and unpacks the weight for larger inputs (a prompt), where one dense GEMM is faster.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from prunekit.deploy import native
from prunekit.errors import PrunekitError

__all__ = ["FORMATS", "PackedWeight", "PackedLinear", "Kernel", "pack", "unpack", "matvec", "packed_bytes",
           "dense_bytes", "format_problem", "check"]

FORMATS = ("bitmask", "nm24", "csr8")
_FMT_CODE = {"bitmask": 0, "nm24": 1, "csr8": 2}
VALUE_DTYPES = (torch.float32, torch.bfloat16)
PAD = 16          # trailing value slots: the vector loop loads 16 values and expands the ones it needs
MAX_ROWS = 8      # default: inputs with more rows (a prompt) unpack the weight and run one dense GEMM


@dataclass
class PackedWeight:
    """One packed (out, in) matrix. ``mask``: int64 words holding uint64 bits, (out, ceil(in/64));
    ``rowptr``: int32 (out+1) value offsets (bitmask, csr8); ``delta``: uint8 column steps (csr8);
    ``values``: float32 or bfloat16, PAD trailing zeros."""

    fmt: str
    shape: Tuple[int, int]
    values: torch.Tensor
    mask: Optional[torch.Tensor] = None
    rowptr: Optional[torch.Tensor] = None
    delta: Optional[torch.Tensor] = None

    def tensors(self) -> Dict[str, torch.Tensor]:
        return {k: v for k, v in (("values", self.values), ("mask", self.mask), ("rowptr", self.rowptr),
                                  ("delta", self.delta)) if v is not None}


# --------------------------------------------------------------------------------- packing
def format_problem(weight: torch.Tensor, fmt: str) -> Optional[str]:
    """Why ``weight`` cannot be packed as ``fmt`` (None: it can)."""
    if fmt not in FORMATS:
        return f"unknown packed format {fmt!r}; allowed: {', '.join(FORMATS)}"
    if weight.dim() != 2 or min(weight.shape) < 1:
        return f"needs a non-empty 2-D weight, got shape {tuple(weight.shape)}"
    if weight.dtype not in VALUE_DTYPES:
        return f"values must be float32 or bfloat16, got {str(weight.dtype).replace('torch.', '')}"
    if weight.device.type != "cpu":
        return f"runs on CPU tensors only, got {weight.device}"
    if not bool(torch.isfinite(weight).all()):
        return "the weight has NaN or infinite entries"
    if weight.numel() >= 2**31:
        return "more than 2**31 weights (int32 offsets)"
    if fmt == "nm24":
        if weight.shape[1] % 4:
            return f"2:4 needs the input width to be a multiple of 4, got {weight.shape[1]}"
        per_group = (weight != 0).reshape(weight.shape[0], -1, 4).sum(-1)
        if bool((per_group > 2).any()):
            return f"not 2:4 sparse ({int((per_group > 2).sum())} groups of 4 keep more than 2 weights)"
    return None


def _bits_to_words(bits: torch.Tensor) -> torch.Tensor:
    """(out, in) bool -> (out, ceil(in/64)) int64 words; bit j of word w is input 64*w + j. Least significant bit
    first, as AVX-512 mask registers read them (prunekit.bits packs most significant first, like numpy)."""
    out_f, in_f = bits.shape
    words = (in_f + 63) // 64
    padded = torch.zeros(out_f, words * 64, dtype=torch.int64)
    padded[:, :in_f] = bits.to(torch.int64)
    shifts = torch.arange(64, dtype=torch.int64)
    # int64 arithmetic wraps like uint64: bit 63 sets the sign, which is the same 64 bits
    return (padded.view(out_f, words, 64) << shifts).sum(-1)


def _nm24_bits(weight: torch.Tensor) -> torch.Tensor:
    """Exactly 2 kept positions per group of 4: the non-zeros, topped up with the first zero positions
    (their value slots hold 0.0), so every group has 2 slots at a fixed offset."""
    nz = (weight != 0).reshape(weight.shape[0], -1, 4)
    need = 2 - nz.sum(-1, keepdim=True)
    fill = (~nz) & (torch.cumsum((~nz).to(torch.int64), -1) <= need)
    return (nz | fill).reshape(weight.shape)


def _pad(values: torch.Tensor) -> torch.Tensor:
    return torch.cat([values, values.new_zeros(PAD)]).contiguous()


def _csr8(weight: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rowptr, delta, values) with 8-bit column steps (the first from column 0); a gap of more than 255
    columns is bridged by explicit zeros, each a step of 255."""
    rows, cols = torch.nonzero(weight, as_tuple=True)  # row-major: rows ascending, columns ascending within
    first = torch.ones_like(rows, dtype=torch.bool)
    first[1:] = rows[1:] != rows[:-1]
    prev = torch.where(first, torch.zeros_like(cols), torch.roll(cols, 1))
    gaps = cols - prev
    extra = torch.clamp((gaps - 1) // 255, min=0)  # explicit zeros before each kept weight
    counts = extra + 1
    ends = torch.cumsum(counts, 0) - 1            # where each kept weight lands
    total = int(counts.sum()) if counts.numel() else 0
    delta = torch.full((total,), 255, dtype=torch.int64)
    values = weight.new_zeros(total)
    delta[ends] = gaps - 255 * extra
    values[ends] = weight[rows, cols]
    per_row = torch.zeros(weight.shape[0], dtype=torch.int64).index_add_(0, rows, counts)
    rowptr = torch.cat([per_row.new_zeros(1), torch.cumsum(per_row, 0)]).to(torch.int32)
    return rowptr, delta.to(torch.uint8), values


def pack(weight: torch.Tensor, fmt: str = "bitmask") -> PackedWeight:
    """Pack a (out, in) float32/bfloat16 CPU weight; its zeros are the pruned entries."""
    problem = format_problem(weight, fmt)
    if problem:
        raise PrunekitError(f"cannot pack as {fmt!r}: {problem}")
    w = weight.detach().contiguous()
    shape = (int(w.shape[0]), int(w.shape[1]))
    if fmt == "csr8":
        rowptr, delta, values = _csr8(w)
        return PackedWeight(fmt, shape, _pad(values), rowptr=rowptr, delta=delta)
    bits = _nm24_bits(w) if fmt == "nm24" else w != 0
    values = w[bits]  # row-major order: row by row, inputs ascending
    if fmt == "nm24":  # row i's slots start at i * words * 32 (32 slots per 64-bit word)
        words = (shape[1] + 63) // 64
        slots = w.new_zeros(shape[0], words * 32)
        slots[:, : values.numel() // shape[0]] = values.view(shape[0], -1)
        return PackedWeight(fmt, shape, _pad(slots.view(-1)), mask=_bits_to_words(bits))
    counts = bits.sum(1, dtype=torch.int64)
    rowptr = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)]).to(torch.int32)
    return PackedWeight(fmt, shape, _pad(values), mask=_bits_to_words(bits), rowptr=rowptr)


def packed_bytes(pw: PackedWeight) -> int:
    """Bytes one matrix-vector product reads: the format's buffers (the trailing pad is never used)."""
    total = sum(t.numel() * t.element_size() for t in pw.tensors().values())
    return total - PAD * pw.values.element_size()


def dense_bytes(shape: Tuple[int, int], dtype: torch.dtype) -> int:
    return int(shape[0]) * int(shape[1]) * torch.empty(0, dtype=dtype).element_size()


# --------------------------------------------------------------------------------- validation
def check(pw: PackedWeight) -> None:
    """Every buffer the C kernel will read lies inside its tensor: run once per weight (the kernel
    checks nothing). Raises PrunekitError naming the first inconsistency."""
    out_f, in_f = pw.shape
    words = (in_f + 63) // 64
    if pw.fmt not in FORMATS or out_f < 1 or in_f < 1:
        raise PrunekitError(f"packed weight: bad format {pw.fmt!r} or shape {pw.shape}")
    if pw.values.dtype not in VALUE_DTYPES or pw.values.dim() != 1:
        raise PrunekitError(f"packed weight: values must be 1-D float32/bfloat16, got {pw.values.dtype}")
    for name, t in pw.tensors().items():
        if t.device.type != "cpu" or not t.is_contiguous():
            raise PrunekitError(f"packed weight: {name} must be a contiguous CPU tensor")
    if pw.fmt == "csr8":
        _check_csr8(pw, out_f, in_f)
        return
    if pw.mask is None or pw.mask.dtype != torch.int64 or tuple(pw.mask.shape) != (out_f, words):
        raise PrunekitError(f"packed weight: mask must be int64 of shape ({out_f}, {words})")
    tail = in_f % 64
    if tail and bool((pw.mask[:, -1] >> tail).ne(0).any()):  # bits past the last input would read past x
        raise PrunekitError("packed weight: mask has bits beyond the input width")
    if pw.fmt == "nm24":
        if pw.values.numel() != out_f * words * 32 + PAD:
            raise PrunekitError("packed weight: nm24 needs 32 value slots per mask word (+ pad)")
        return
    counts = _words_to_bits(pw.mask, in_f).sum(1)
    _check_rowptr(pw, out_f, counts)


def _words_to_bits(words: torch.Tensor, in_f: int) -> torch.Tensor:
    """Inverse of :func:`_bits_to_words`: (out, in) bool."""
    bits = (words.unsqueeze(-1) >> torch.arange(64, dtype=torch.int64)) & 1
    return bits.bool().view(words.shape[0], -1)[:, :in_f]


def _check_rowptr(pw: PackedWeight, out_f: int, counts: Optional[torch.Tensor]) -> None:
    rp = pw.rowptr
    if rp is None or rp.dtype != torch.int32 or rp.numel() != out_f + 1 or int(rp[0]) != 0:
        raise PrunekitError(f"packed weight: rowptr must be int32 of {out_f + 1} entries starting at 0")
    steps = rp[1:].to(torch.int64) - rp[:-1].to(torch.int64)
    if bool((steps < 0).any()) or int(rp[-1]) + PAD > pw.values.numel():
        raise PrunekitError("packed weight: rowptr decreases or points past the values")
    if counts is not None and not torch.equal(steps, counts):
        raise PrunekitError("packed weight: rowptr disagrees with the mask's bit counts")


def _check_csr8(pw: PackedWeight, out_f: int, in_f: int) -> None:
    if pw.delta is None or pw.delta.dtype != torch.uint8:
        raise PrunekitError("packed weight: csr8 needs uint8 deltas")
    _check_rowptr(pw, out_f, None)
    if pw.delta.numel() != int(pw.rowptr[-1]):
        raise PrunekitError("packed weight: csr8 deltas and values differ in length")
    if pw.delta.numel():  # the last column of every row must stay inside the input
        ends = torch.cumsum(pw.delta.to(torch.int64), 0)
        rp = pw.rowptr.to(torch.int64)
        last = torch.where(rp[1:] > rp[:-1], ends[(rp[1:] - 1).clamp(min=0)], torch.zeros_like(rp[1:]))
        first = torch.where(rp[:-1] > 0, ends[(rp[:-1] - 1).clamp(min=0)], torch.zeros_like(rp[:-1]))
        if bool(((last - first) >= in_f).any()):
            raise PrunekitError("packed weight: csr8 columns run past the input width")


# --------------------------------------------------------------------------------- products
def unpack(pw: PackedWeight) -> torch.Tensor:
    """The dense (out, in) weight in the values' dtype (exact: packing never rounds)."""
    out_f, in_f = pw.shape
    lib = native.library()
    if lib is not None:
        dense = torch.empty(out_f, in_f, dtype=torch.float32)
        code = lib.prunekit_packed_unpack(_FMT_CODE[pw.fmt], int(pw.values.dtype == torch.bfloat16), out_f, in_f,
                                          _addr(pw.mask), _addr(pw.delta), _addr(pw.rowptr), _addr(pw.values),
                                          _addr(dense))
        if code != 0:
            raise RuntimeError(f"native unpack rejected its arguments (code {code})")
        return dense.to(pw.values.dtype)
    return _unpack_torch(pw)


def _unpack_torch(pw: PackedWeight) -> torch.Tensor:
    out_f, in_f = pw.shape
    if pw.fmt == "csr8":
        rp = pw.rowptr.to(torch.int64)
        row = torch.repeat_interleave(torch.arange(out_f), rp[1:] - rp[:-1])
        starts = torch.cat([rp.new_zeros(1), torch.cumsum(pw.delta.to(torch.int64), 0)])[rp[:-1]]
        col = torch.cumsum(pw.delta.to(torch.int64), 0) - starts[row]
        dense = torch.zeros(out_f, in_f, dtype=pw.values.dtype)
        dense.index_put_((row, col), pw.values[: rp[-1]], accumulate=True)
        return dense
    words = pw.mask.shape[1]
    bits = _words_to_bits(pw.mask, in_f)
    dense = torch.zeros(out_f, in_f, dtype=pw.values.dtype)
    if pw.fmt == "nm24":
        slots = pw.values[:-PAD].view(out_f, words * 32)[:, : in_f // 2]
        dense[bits] = slots.reshape(-1)
    else:
        dense[bits] = pw.values[: int(pw.rowptr[-1])]
    return dense


class Kernel:
    """``x2 @ W.T + bias`` for one :func:`check`-ed weight, with the C call's weight arguments made once.

    Why a class: at batch 1 a SmolLM2 layer takes tens of microseconds, and building the dozen ctypes
    arguments on every call cost as much (a decode step calls 210 layers). ``__call__`` takes a float32
    contiguous (rows, in) input and returns float32 (rows, out)."""

    def __init__(self, pw: PackedWeight, bias: Optional[torch.Tensor] = None):
        self.lib = native.library()
        if self.lib is None:
            raise RuntimeError(f"the native packed kernels are not available: {native.unavailable_reason()}")
        self.pw, self.out_features = pw, pw.shape[0]
        self.bias = None if bias is None else bias.detach().to(torch.float32).contiguous()
        self.fn = self.lib.prunekit_packed_mv
        self.args = (_FMT_CODE[pw.fmt], int(pw.values.dtype == torch.bfloat16), pw.shape[0], pw.shape[1],
                     _addr(pw.mask), _addr(pw.delta), _addr(pw.rowptr), pw.values.data_ptr(), _addr(self.bias))

    def __call__(self, x2: torch.Tensor, threads: Optional[int] = None) -> torch.Tensor:
        y = torch.empty(x2.shape[0], self.out_features, dtype=torch.float32)
        code = self.fn(*self.args, x2.shape[0], x2.data_ptr(), y.data_ptr(), threads or torch.get_num_threads())
        if code != 0:
            raise RuntimeError(f"native packed kernel rejected its arguments (code {code})")
        return y


def _addr(t: Optional[torch.Tensor]) -> Optional[int]:
    return None if t is None else t.data_ptr()


def matvec(pw: PackedWeight, x2: torch.Tensor, bias: Optional[torch.Tensor] = None,
           threads: Optional[int] = None) -> torch.Tensor:
    """``x2 @ W.T + bias`` in float32 for a :func:`check`-ed ``pw`` and a (rows, in) input. Without the
    native library, through torch on the unpacked weight."""
    if x2.dim() != 2 or x2.shape[1] != pw.shape[1]:
        raise PrunekitError(f"packed matvec needs input of shape (rows, {pw.shape[1]}), got {tuple(x2.shape)}")
    xf = x2.detach().to(torch.float32).contiguous()
    if native.library() is None:
        b = None if bias is None else bias.detach().to(torch.float32)
        return F.linear(xf, _unpack_torch(pw).to(torch.float32), b)
    return Kernel(pw, bias)(xf, threads)


# --------------------------------------------------------------------------------- module
class PackedLinear(nn.Module):
    """An inference-only Linear on a packed weight (:func:`pack`). Inputs of up to ``max_rows`` rows run
    on the packed kernel; larger ones (a prompt) on the unpacked weight. Outputs are in the input's dtype.
    Buffers are re-validated whenever one changed (e.g. after ``load_state_dict``)."""

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, fmt: str = "bitmask",
                 max_rows: int = MAX_ROWS):
        super().__init__()
        if not isinstance(max_rows, int) or max_rows < 0:
            raise PrunekitError(f"max_rows must be an int >= 0, got {max_rows!r}")
        pw = pack(weight, fmt)
        self.fmt, self.max_rows = fmt, max_rows
        self.out_features, self.in_features = pw.shape
        for name, t in pw.tensors().items():
            self.register_buffer(name, t)
        for name in ("mask", "rowptr", "delta"):
            if name not in pw.tensors():
                self.register_buffer(name, None)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self._checked: Optional[tuple] = None
        self._kernel: Optional[Kernel] = None

    def __getstate__(self):
        """Copies (deepcopy) rebuild the native call for their own buffers: it holds raw pointers."""
        state = dict(self.__dict__)
        state["_kernel"], state["_checked"] = None, None
        return state

    @classmethod
    def from_linear(cls, linear: nn.Linear, fmt: str = "bitmask", max_rows: int = MAX_ROWS) -> "PackedLinear":
        return cls(linear.weight, linear.bias, fmt=fmt, max_rows=max_rows)

    def packed(self) -> PackedWeight:
        """The module's buffers as a validated :class:`PackedWeight` (validated again after any change)."""
        pw = PackedWeight(self.fmt, (self.out_features, self.in_features), self.values, mask=self.mask,
                          rowptr=self.rowptr, delta=self.delta)
        if self._key() != self._checked:
            check(pw)
            self._checked, self._kernel = self._key(), None
        return pw

    def _key(self) -> tuple:
        """Which tensors the buffers are, and how often they were written: load_state_dict copies in place
        (the version moves), assigning a buffer swaps the tensor (the identity moves)."""
        v, m, r, d, b = self.values, self.mask, self.rowptr, self.delta, self.bias
        return (id(v), v._version, id(m), m is not None and m._version, id(r), r is not None and r._version,
                id(d), d is not None and d._version, id(b), b is not None and b._version)

    def kernel(self) -> Optional[Kernel]:
        """The ready-made native call for the current buffers (None without the native library)."""
        if self._kernel is not None and self._key() == self._checked:
            return self._kernel
        pw = self.packed()
        self._kernel = Kernel(pw, self.bias) if native.library() is not None else None
        return self._kernel

    @property
    def weight(self) -> torch.Tensor:
        """The dense weight (unpacked on each access: for inspection and tied-weight checks, not speed)."""
        return unpack(self.packed())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        kernel = self.kernel()
        if kernel is None or x2.shape[0] > self.max_rows or (x2.requires_grad and torch.is_grad_enabled()):
            w = unpack(self.packed()).to(x2.dtype)
            y = F.linear(x2, w, None if self.bias is None else self.bias.to(x2.dtype))
        else:
            xf = x2 if x2.dtype == torch.float32 and x2.is_contiguous() else x2.float().contiguous()
            y = kernel(xf)
            y = y if x2.dtype == torch.float32 else y.to(x2.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def to_linear(self) -> nn.Linear:
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, dtype=self.values.dtype)
        with torch.no_grad():
            lin.weight.copy_(self.weight)
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin

    @property
    def sparsity(self) -> float:
        """Fraction of zero weights (slots that hold explicit zeros count as zeros)."""
        kept = int((self.values[:-PAD] != 0).sum())
        return 1.0 - kept / max(1, self.in_features * self.out_features)

    def nbytes(self) -> int:
        return packed_bytes(self.packed())

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, fmt={self.fmt}, "
                f"dtype={str(self.values.dtype).replace('torch.', '')}, max_rows={self.max_rows}")
