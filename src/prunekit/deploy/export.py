"""Export dense, masked and compacted models to ONNX and check them with onnxruntime.

    res = export_onnx(model, torch.randn(1, 3, 32, 32), "slim.onnx")   # verified on onnxruntime CPU
    res.max_abs_diff, res.size_bytes, res.exporter, res.opset
    onnx_latency("slim.onnx", torch.randn(64, 3, 32, 32), threads=1)   # median ms

The export works on a deep copy of the model, in eval mode, with prunekit's masks folded
away (:func:`prunekit.apply.masking.make_permanent`): the ONNX graph carries the zeroed weights
but no ``*_mask`` buffers, and the user's model is never touched.

Exporters: torch's dynamo (``torch.export``-based) exporter is tried first: it is torch's
default and maintained path, keeps the batch dimension symbolic, and exported every
reference model (LeNet, MLP, VGG, ResNet-18, MobileNetV2, nn.TransformerEncoder,
nn.MultiheadAttention) within 2e-7 of torch. It needs ``onnxscript`` and writes opset >= 18
only (it silently keeps 18 when asked for less), and costs 1-5 s per export (it rebuilds its
op registry each time). The legacy TorchScript exporter (0.05-0.5 s per export here, deprecated
by torch, opsets 7-20) is the fallback: when onnxscript is missing, the opset asked for is
below 18, or the dynamo export fails or does not verify. Every fallback is logged with its
reason and listed in ``ExportResult.notes``.

onnx, onnxscript and onnxruntime are optional dependencies, imported only when used
(``pip install onnx onnxscript onnxruntime``).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from prunekit._util import atomic_write, median, time_calls, with_batch
from prunekit.apply import masking
from prunekit.errors import InvalidTypeError, PrunekitError

log = logging.getLogger(__name__)

EXPORTERS = ("auto", "dynamo", "torchscript")
DYNAMO_MIN_OPSET = 18  # the dynamo exporter emits opset >= 18; lower targets are not converted
PROTOBUF_LIMIT = 2 ** 31 - 2 ** 20  # one-file ONNX (protobuf) limit, with room for the graph
INSTALL_HINT = "pip install onnxruntime"
PathLike = Union[str, os.PathLike]


class ExportError(RuntimeError):
    """The model could not be exported (or the export did not verify); ``op`` names an unsupported operator."""

    def __init__(self, message: str, op: Optional[str] = None):
        super().__init__(message)
        self.op = op


@dataclasses.dataclass(frozen=True)
class ExportResult:
    path: Path
    size_bytes: int
    max_abs_diff: Optional[float]  # onnxruntime vs torch over the checked batches; None with check=False
    opset: Optional[int]
    exporter: str  # "dynamo" or "torchscript"
    dynamic_batch: bool
    checked_batches: Tuple[int, ...] = ()
    notes: Tuple[str, ...] = ()  # why an exporter was skipped or fell back

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d.update(path=str(self.path), checked_batches=list(self.checked_batches), notes=list(self.notes))
        return d


# ----------------------------------------------------------------------------- optional dependencies

def _require_ort():
    try:
        import onnxruntime
    except ImportError as e:
        raise ImportError(f"onnxruntime is not installed; install it with `{INSTALL_HINT}` "
                          "(or pass check=False to export without verifying)") from e
    return onnxruntime


def _has_onnxscript() -> bool:
    try:
        import onnxscript  # noqa: F401
    except ImportError:
        return False
    return True


def _opset_range() -> Tuple[int, int, int]:
    """(min, max, TorchScript max) opsets of this torch."""
    from torch.onnx import _constants as c
    return c.ONNX_MIN_OPSET, c.ONNX_MAX_OPSET, getattr(c, "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET", 20)


# ----------------------------------------------------------------------------- validation

def _check_path(path: PathLike) -> Path:
    p = Path(path)
    if p.suffix.lower() != ".onnx":
        raise PrunekitError(f"path {str(p)!r} must end with .onnx")
    if p.is_dir():
        raise PrunekitError(f"path {str(p)!r} is a directory; give a file name ending with .onnx")
    for parent in [p.parent, *p.parent.parents]:
        if parent.exists() and not parent.is_dir():
            raise PrunekitError(f"cannot write {str(p)!r}: {str(parent)!r} is a file, not a directory")
    return p


def _check_opset(opset: Optional[int]) -> None:
    if opset is None:
        return
    lo, hi, _ = _opset_range()
    if isinstance(opset, bool) or not isinstance(opset, int) or not lo <= opset <= hi:
        raise PrunekitError(f"opset={opset!r} must be an integer in [{lo}, {hi}] (or None for the exporter's default)")


def _as_args(example_inputs: Any) -> Tuple[torch.Tensor, ...]:
    args = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    bad = [type(a).__name__ for a in args if not isinstance(a, torch.Tensor)]
    if not args or bad:
        raise InvalidTypeError("example_inputs must be a tensor or a tuple/list of tensors (positional arguments of "
                        f"forward); got {', '.join(bad) or 'nothing'}")
    return tuple(a.detach().cpu() for a in args)


def _batch(args: Sequence[torch.Tensor]) -> int:
    sizes = {a.shape[0] if a.dim() else None for a in args}
    if len(sizes) != 1 or None in sizes:
        shapes = ", ".join(str(tuple(a.shape)) for a in args)
        raise PrunekitError(f"dynamic_batch=True needs every input to share its first (batch) dimension; got shapes "
                         f"{shapes}; pass dynamic_batch=False")
    return int(sizes.pop())


def _check_args(model, args, opset, exporter, rtol, atol) -> None:
    if not isinstance(model, nn.Module):
        raise InvalidTypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    _check_opset(opset)
    if exporter not in EXPORTERS:
        raise PrunekitError(f"unknown exporter {exporter!r}; allowed: {', '.join(EXPORTERS)}")
    if not (rtol >= 0 and atol >= 0):
        raise PrunekitError(f"rtol and atol must be >= 0, got rtol={rtol}, atol={atol}")
    nbytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    if nbytes > PROTOBUF_LIMIT:
        raise PrunekitError(f"the model holds {nbytes / 2**30:.1f} GiB of tensors; a one-file ONNX model is limited "
                         "to 2 GiB (protobuf)")


# ----------------------------------------------------------------------------- exporting

def export_copy(model: nn.Module) -> nn.Module:
    """A mask-free eval-mode CPU copy: what gets exported (the user's model is not touched)."""
    clone = copy.deepcopy(model).cpu()
    masking.make_permanent(clone)  # zeros stay in the weights; the uint8 mask buffers go
    return clone.eval()


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Exporters print progress (Python) and graphs (C++) on stdout, which belongs to the caller (JSON lines in
    benchmarks, tables in the CLI): send fd 1 to stderr meanwhile, and mute deprecation noise and loggers whose
    failures we report ourselves."""
    sys.stdout.flush()
    try:
        saved = os.dup(1)
        os.dup2(2, 1)
    except OSError:  # no real fd 1 (embedded interpreters): Python-level redirect only
        saved = None
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "onnxscript", "onnx_ir")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with contextlib.redirect_stdout(sys.stderr), warnings.catch_warnings():
            # TracerWarnings flag shapes traced as constants: the check on a second batch size catches those
            for cat in (DeprecationWarning, FutureWarning, torch.jit.TracerWarning):
                warnings.simplefilter("ignore", cat)
            # inputs sharing the batch dimension share one name: nothing to warn about
            warnings.filterwarnings("ignore", message=r".*axis name: \w+ will not be used")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
        sys.stdout.flush()
        if saved is not None:
            os.dup2(saved, 1)
            os.close(saved)


def _names(prefix: str, n: int) -> List[str]:
    return [prefix] if n == 1 else [f"{prefix}_{i}" for i in range(n)]


def _export_dynamo(model, args, path, opset, dynamic, n_out) -> None:
    if dynamic and _batch(args) == 1:  # a size-1 example may get specialised to a constant 1
        args = with_batch(args, 2)
    batch = torch.export.Dim("batch")
    shapes = tuple({0: batch} for _ in args) if dynamic else None
    torch.onnx.export(model, args, str(path), dynamo=True, opset_version=opset, dynamic_shapes=shapes,
                      external_data=False, input_names=_names("input", len(args)),
                      output_names=_names("output", n_out), verbose=False)


def _export_torchscript(model, args, path, opset, dynamic, outputs) -> None:
    in_names, out_names = _names("input", len(args)), _names("output", len(outputs))
    axes = None
    if dynamic:
        b = _batch(args)
        axes = {n: {0: "batch"} for n in in_names}
        axes.update({n: {0: "batch"} for n, o in zip(out_names, outputs) if o.dim() and o.shape[0] == b})
    torch.onnx.export(model, args, str(path), dynamo=False, opset_version=opset, input_names=in_names,
                      output_names=out_names, dynamic_axes=axes, do_constant_folding=True)


def _file_opset(path: Path) -> Optional[int]:
    try:
        import onnx
    except ImportError:
        return None
    proto = onnx.load(str(path), load_external_data=False)
    return next((int(o.version) for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)


def _exporter_order(exporter: str, opset: Optional[int]) -> Tuple[List[str], List[str]]:
    """(exporters to try in order, notes on those skipped)."""
    _, _, ts_max = _opset_range()
    order, notes = [], []
    if exporter in ("auto", "dynamo"):
        if not _has_onnxscript():
            notes.append("dynamo exporter skipped: onnxscript is not installed (pip install onnxscript)")
        elif opset is not None and opset < DYNAMO_MIN_OPSET:
            notes.append(f"dynamo exporter skipped: it writes opset >= {DYNAMO_MIN_OPSET}, {opset} was asked for")
        else:
            order.append("dynamo")
    if exporter in ("auto", "torchscript"):
        if opset is not None and opset > ts_max:
            notes.append(f"torchscript exporter skipped: it writes opset <= {ts_max}, {opset} was asked for")
        else:
            order.append("torchscript")
    return order, notes


def _flat(out: Any) -> List[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _flat(o)]
    raise InvalidTypeError(f"model outputs must be tensors (or tuples/lists/dicts of them), got {type(out).__name__}")


@torch.no_grad()
def _torch_outputs(model: nn.Module, args) -> List[torch.Tensor]:
    return _flat(model(*args))


# ----------------------------------------------------------------------------- verifying

def _rebatched(args, batch: int):
    # the samples in another order: a graph that mixes up the batch positions does not pass by luck
    return tuple(a.flip(0) for a in with_batch(args, batch))


def _compare(ort_outs, ref: List[torch.Tensor], rtol: float, atol: float, batch: int) -> float:
    import numpy as np
    if len(ort_outs) != len(ref):
        raise ExportError(f"onnxruntime returned {len(ort_outs)} outputs, torch {len(ref)}")
    worst = 0.0
    for i, (o, r) in enumerate(zip(ort_outs, ref)):
        r = r.detach().cpu().numpy().astype(np.float64)
        o = np.asarray(o).astype(np.float64)
        if o.shape != r.shape:
            raise ExportError(f"onnxruntime output {i} has shape {o.shape}, torch {r.shape} (batch {batch})")
        if o.size == 0:
            continue
        diff = np.where(np.isnan(o) & np.isnan(r), 0.0, np.abs(o - r))  # NaN stays where only one side is NaN
        d = float(diff.max())
        if not np.all(diff <= atol + rtol * np.abs(r)):  # NaN compares False: a one-sided NaN fails
            raise ExportError(f"onnxruntime output {i} differs from torch by up to {d:.3g} at batch {batch} "
                              f"(allowed: atol {atol} + rtol {rtol} x |torch|)")
        worst = max(worst, d)
    return worst


def _verify(path: Path, model: nn.Module, args, dynamic: bool, rtol: float, atol: float):
    """(max abs diff, batches checked): onnxruntime CPU vs torch, on ``args`` and, when dynamic, another batch."""
    sess = onnx_session(path, threads=1)
    b = _batch(args) if dynamic else None
    cases = [args] + ([_rebatched(args, b + 1)] if dynamic else [])
    worst, batches = 0.0, []
    for a in cases:
        n = int(a[0].shape[0]) if a[0].dim() else 1
        outs = sess.run(None, _feeds(sess, a))
        worst = max(worst, _compare(outs, _torch_outputs(model, a), rtol, atol, n))
        batches.append(n)
    return worst, tuple(batches)


# ----------------------------------------------------------------------------- errors

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_OP_PATTERNS = (
    re.compile(r"OpOverload\(op='(\w+)\.(\w+)'"),  # dynamo: no ONNX function registered
    re.compile(r"operator '(\w+)::(\w+)'"),  # TorchScript: UnsupportedOperatorError
    re.compile(r"target=torch\.ops\.(\w+)\.(\w+)"),  # dynamo: the ONNX function failed on this node
)


def _chain(e: BaseException) -> List[BaseException]:
    out = []
    while e is not None and e not in out:
        out.append(e)
        e = e.__cause__ or e.__context__
    return out


def _unsupported_op(e: BaseException) -> Optional[str]:
    if isinstance(e, ExportError):
        return e.op
    text = _ANSI.sub("", "\n".join(str(x) for x in _chain(e)))
    for pattern in _OP_PATTERNS:
        m = pattern.search(text)
        if m:
            return f"{m.group(1)}::{m.group(2)}"
    return None


def _reason(e: BaseException) -> str:
    """One line: the unsupported operator, or the innermost error's first line."""
    if isinstance(e, ExportError):
        return str(e)
    op = _unsupported_op(e)
    if op:
        return f"operator {op} is not supported"
    inner = _chain(e)[-1]
    lines = [ln.strip() for ln in _ANSI.sub("", str(inner)).splitlines() if ln.strip()]
    text = f"{type(inner).__name__}: {lines[0] if lines else ''}"
    return text if len(text) <= 300 else text[:297] + "..."


def _combined_error(model: nn.Module, failures: List[Tuple[str, BaseException]], notes: List[str]) -> ExportError:
    head = f"cannot export {type(model).__name__} to ONNX"
    ops = {name: _unsupported_op(e) for name, e in failures}
    op = next((o for o in ops.values() if o), None)
    if op is None:
        return ExportError(f"{head} ({'; '.join([f'{n}: {_reason(e)}' for n, e in failures] + notes)})")
    by = [n for n, o in ops.items() if o == op]
    rest = [f"{n}: {_reason(e)}" for n, e in failures if ops[n] != op] + notes
    return ExportError(f"{head}: operator {op} is not supported (by the {' and the '.join(by)} exporter"
                       f"{'s' if len(by) > 1 else ''})"
                       + (f" ({'; '.join(rest)})" if rest else ""), op=op)


# ----------------------------------------------------------------------------- public API

def export_onnx(model: nn.Module, example_inputs: Any, path: PathLike, *, opset: Optional[int] = None,
                dynamic_batch: bool = True, check: bool = True, rtol: float = 1e-4, atol: float = 1e-4,
                exporter: str = "auto") -> ExportResult:
    """Export ``model`` (dense, masked or compacted) to the ONNX file ``path``; see the module docstring.

    ``example_inputs``: a tensor or a tuple of tensors (forward's positional arguments).
    ``dynamic_batch``: dimension 0 of every input stays symbolic. ``check``: run the file
    in onnxruntime (CPU) on the example and, when dynamic, on another batch size, and
    require ``|ort - torch| <= atol + rtol * |torch|``. The file is written atomically:
    on any failure ``path`` is left as it was. ``exporter``: auto, dynamo or torchscript.
    """
    args = _as_args(example_inputs)
    _check_args(model, args, opset, exporter, rtol, atol)
    if dynamic_batch:
        _batch(args)
    target = _check_path(path)
    if check:
        _require_ort()
    order, skipped = _exporter_order(exporter, opset)
    if not order:
        raise PrunekitError(f"no exporter can write opset {opset}: {'; '.join(skipped)}")
    clone = export_copy(model)
    try:
        outputs = _torch_outputs(clone, args)  # before any file work: the model must run on these inputs
    except (RuntimeError, TypeError, ValueError, IndexError, AssertionError) as e:  # shape checks in forward
        raise PrunekitError(f"{type(model).__name__} does not run on example_inputs of shapes "
                         f"{[tuple(a.shape) for a in args]}: {e}") from e
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PrunekitError(f"cannot create the folder of {str(target)!r}: {e}") from e
    failures: List[Tuple[str, BaseException]] = []
    for name in order:
        notes = skipped + [f"{n} exporter failed: {_reason(e)}" for n, e in failures]
        try:
            return _try_exporter(name, clone, args, outputs, target, opset, dynamic_batch, check, rtol, atol,
                                 notes)
        except Exception as e:  # noqa: BLE001 -- exporters raise anything; the reason is kept and reported
            failures.append((name, e))
            log.warning("ONNX export of %s with the %s exporter failed (%s)%s", type(model).__name__, name,
                        _reason(e), "; trying the next exporter" if name != order[-1] else "")
    raise _combined_error(model, failures, skipped) from failures[-1][1]


def _try_exporter(name, clone, args, outputs, target: Path, opset, dynamic, check, rtol, atol,
                  notes: List[str]) -> ExportResult:
    """Export with one exporter to a temporary file, verify it, then move it over ``target`` (the atomic writer:
    readers see the old file or the new one, never half of one; a failed export or check leaves ``target`` as is)."""
    found: Dict[str, Any] = {}

    def write(tmp: Path) -> None:
        with _quiet_exporter():
            if name == "dynamo":
                _export_dynamo(clone, args, tmp, opset, dynamic, len(outputs))
            else:
                _export_torchscript(clone, args, tmp, opset, dynamic, outputs)
        found["opset"] = got = _file_opset(tmp)
        if opset is not None and got is not None and got != opset:
            raise ExportError(f"wrote opset {got} instead of the {opset} asked for")
        found["diff"], found["batches"] = _verify(tmp, clone, args, dynamic, rtol, atol) if check else (None, ())

    atomic_write(target, write, by_path=True)
    got, diff, batches = found["opset"], found["diff"], found["batches"]
    for note in notes:
        log.info("ONNX export: %s", note)
    return ExportResult(path=target, size_bytes=target.stat().st_size, max_abs_diff=diff,
                        opset=got if got is not None else opset, exporter=name, dynamic_batch=dynamic,
                        checked_batches=batches, notes=tuple(notes))


def onnx_session(path: PathLike, *, threads: Optional[int] = 1):
    """An onnxruntime CPU InferenceSession with ``threads`` intra-op threads (None: onnxruntime's default)."""
    ort = _require_ort()
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise PrunekitError(f"threads must be an integer >= 1 (or None), got {threads!r}")
    if not Path(path).is_file():
        raise FileNotFoundError(f"ONNX file {str(path)!r} not found")
    so = ort.SessionOptions()
    so.log_severity_level = 3  # errors only: its warnings about unused initialisers are noise here
    if threads is not None:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _feeds(sess, inputs: Any) -> Dict[str, Any]:
    """onnxruntime feeds from a tensor / array, a tuple of them (in input order), or a dict by input name."""
    import numpy as np
    names = [i.name for i in sess.get_inputs()]
    if isinstance(inputs, dict):
        items = list(inputs.items())
    else:
        values = list(inputs) if isinstance(inputs, (tuple, list)) else [inputs]
        items = list(zip(names, values)) if len(values) == len(names) else None
    if items is None or sorted(k for k, _ in items) != sorted(names):
        expected = ", ".join(f"{i.name} {i.shape}" for i in sess.get_inputs())
        got = sorted(inputs) if isinstance(inputs, dict) else f"{len(values)} input(s)"
        raise PrunekitError(f"the ONNX model takes inputs {expected}; got {got}")
    return {k: v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v) for k, v in items}


def onnx_latency(path: Any, inputs: Any, *, threads: Optional[int] = 1, repeat: int = 20, warmup: int = 3) -> float:
    """Median wall time (ms) of one onnxruntime CPU run on ``inputs``.

    ``path``: an ONNX file or a session from :func:`onnx_session` (reuse one when timing in rounds).
    """
    if repeat < 1 or warmup < 0:
        raise PrunekitError(f"need repeat >= 1 and warmup >= 0, got repeat={repeat}, warmup={warmup}")
    sess = path if hasattr(path, "run") and hasattr(path, "get_inputs") else onnx_session(path, threads=threads)
    feeds = _feeds(sess, inputs)
    times = time_calls({"onnx": lambda: sess.run(None, feeds)}, repeat=repeat, warmup=warmup, sample_ms=None)
    return median(times["onnx"])
