"""``prunekit export``: a saved model folder to a verified ONNX file, with onnxruntime latency."""
from __future__ import annotations

import inspect
import json
from typing import Any, Dict, Optional, Sequence, Tuple

from prunekit.cli._common import add_threads, add_trust, check_data, dataset_names, listed, trusted
from prunekit.cli._names import names
from prunekit.errors import PrunekitError

HELP = "export a saved prunekit model folder to ONNX, verified with onnxruntime (max diff, size, latency)"

# built-in model name -> input shape (without batch) from its constructor arguments; the CNNs for CIFAR
# take any spatial size (adaptive pooling): 32x32 is the size they are made for
_SHAPES = {
    "mlp": lambda a: (a["in_features"],),
    "lenet300": lambda a: (a["in_features"],),
    "lenet5": lambda a: (a["in_channels"], a["input_size"], a["input_size"]),
    "vgg_small": lambda a: (a["in_channels"], a["input_size"], a["input_size"]),
    "resnet18_cifar": lambda a: (a["in_channels"], 32, 32),
    "mobilenetv2_cifar": lambda a: (a["in_channels"], 32, 32),
}


def add_arguments(p) -> None:
    p.add_argument("model", help="a model folder written by prunekit.save (e.g. runs/prune/model)")
    p.add_argument("--out", required=True, help="the ONNX file to write (ends with .onnx)")
    p.add_argument("--batch", type=int, default=1, help="batch size of the example input and the latency (default 1)")
    p.add_argument("--opset", type=int, help="ONNX opset (default: the exporter's, 20 with torch 2.13)")
    p.add_argument("--input-shape", help="input shape without the batch, e.g. 1,28,28 (default: from the "
                   "model's spec, or from --data, or the shape of the data it was trained on, recorded when saved)")
    p.add_argument("--data", help=f"take the input shape and the example batch from this dataset "
                   f"({listed(dataset_names())})")
    p.add_argument("--exporter", default="auto", choices=names("exporter"),
                   help=f"{listed(names('exporter'), 'auto')} (auto: dynamo, falling back to torchscript)")
    p.add_argument("--static-batch", action="store_true", help="fix the batch size in the graph (default: dynamic)")
    add_threads(p)   # torch's and onnxruntime's, for the latency measurements too
    p.add_argument("--repeat", type=int, default=20, help="timed runs per latency (median; default 20)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random example input")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    add_trust(p)


def parse_shape(text: str) -> Tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in text.split(","))
    except ValueError:
        shape = ()
    if not shape or any(d < 1 for d in shape):
        raise PrunekitError(f"--input-shape {text!r} must be positive integers separated by commas, e.g. 1,28,28")
    return shape


def spec_input_shape(spec: Optional[Dict[str, Any]]) -> Tuple[int, ...]:
    """Input shape (without batch) of a built-in model from its recorded spec and constructor defaults."""
    from prunekit.zoo.models import MODELS

    name = (spec or {}).get("name")
    if name not in _SHAPES:
        raise PrunekitError(f"cannot tell the input shape of model {name!r} (shapes are known for "
                            f"{', '.join(_SHAPES)}); pass --input-shape, e.g. --input-shape 3,32,32, or --data")
    params = inspect.signature(MODELS.get(name)).parameters
    kwargs = {k: p.default for k, p in params.items() if p.default is not inspect.Parameter.empty}
    kwargs.update(spec.get("kwargs", {}))
    return tuple(int(d) for d in _SHAPES[name](kwargs))


def _default_shape(spec: Optional[Dict[str, Any]], trained_on: Dict[str, Any]) -> Tuple[int, ...]:
    """A built-in model's input shape from its spec, else the shape of the data it was trained on (recorded by
    ``prunekit prune``: a timm, Hugging Face or factory model has no other record of it)."""
    try:
        return spec_input_shape(spec)
    except PrunekitError:
        if not trained_on.get("input_shape"):
            raise
        return tuple(int(d) for d in trained_on["input_shape"])


def _example(args, spec, trained_on) -> Any:
    import torch

    if args.batch < 1:
        raise PrunekitError(f"--batch must be >= 1, got {args.batch}")
    if args.input_shape:
        shape = parse_shape(args.input_shape)
    elif args.data:
        from prunekit.zoo.data import get_loaders, recorded_options
        from prunekit.zoo.userdata import is_user_data
        check_data(args.data)
        options = recorded_options(trained_on) if is_user_data(args.data) else None   # read as in training
        _, test, _ = get_loaders(args.data, seed=args.seed, limit_train=1, limit_test=args.batch, options=options)
        x = next(iter(test))[0]  # real examples: activations in their usual range
        return x[torch.arange(args.batch) % len(x)]
    else:
        shape = _default_shape(spec, trained_on)
    gen = torch.Generator().manual_seed(args.seed)
    # random rather than zeros: a zero input would hide most wrong weights from the check
    return torch.randn(args.batch, *shape, generator=gen)


def _summary(res, ort_ms: float, torch_ms: float, args) -> Dict[str, Any]:
    return {"path": str(res.path), "exporter": res.exporter, "opset": res.opset, "size_bytes": res.size_bytes,
            "max_abs_diff": res.max_abs_diff, "checked_batches": list(res.checked_batches),
            "dynamic_batch": res.dynamic_batch, "batch": args.batch, "threads": args.threads,
            "latency_ms_onnxruntime": ort_ms, "latency_ms_torch": torch_ms, "notes": list(res.notes)}


def _print(row: Dict[str, Any], shape: Sequence[int]) -> None:
    print(f"wrote {row['path']} ({row['size_bytes']} bytes, opset {row['opset']}, {row['exporter']} exporter, "
          f"{'dynamic' if row['dynamic_batch'] else 'static'} batch, input {list(shape)})")
    print(f"max abs diff vs torch: {row['max_abs_diff']:.3g} (onnxruntime CPU, batches "
          f"{', '.join(map(str, row['checked_batches']))})")
    speed = row["latency_ms_torch"] / row["latency_ms_onnxruntime"]
    print(f"latency (batch {row['batch']}, {row['threads']} thread(s), median): onnxruntime "
          f"{row['latency_ms_onnxruntime']:.4g} ms, torch {row['latency_ms_torch']:.4g} ms ({speed:.2f}x)")
    for note in row["notes"]:
        print(f"note: {note}")


def run(args) -> int:
    import sys

    from prunekit.analysis.metrics import measure_latency
    from prunekit.deploy import io
    from prunekit.deploy.export import ExportError, export_onnx, onnx_latency

    if args.repeat < 1:
        raise PrunekitError(f"--repeat must be >= 1, got {args.repeat}")
    if args.threads is None:   # run() called without the CLI's main: the threads as they are
        import torch

        args.threads = torch.get_num_threads()
    try:
        with trusted(args):
            model = io.load(args.model)
        doc = io.read_spec(args.model)
        x = _example(args, doc.get("model"), (doc.get("metadata") or {}).get("data") or {})
        res = export_onnx(model, x, args.out, opset=args.opset, dynamic_batch=not args.static_batch,
                          exporter=args.exporter)
    except (ImportError, ExportError) as e:  # missing onnxruntime, unsupported op: one clear line
        print(f"prunekit export: error: {e}", file=sys.stderr)
        return 2
    ort_ms = onnx_latency(res.path, x, threads=args.threads, repeat=args.repeat)
    torch_ms = measure_latency(model, x, threads=args.threads, repeats=args.repeat)["median_ms"]
    row = _summary(res, ort_ms, torch_ms, args)
    if args.json:
        print(json.dumps(row, indent=1))
    else:
        _print(row, tuple(x.shape[1:]))
    return 0
