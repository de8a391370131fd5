"""prunekit: prune trained PyTorch models so that they get really smaller and faster.

score → select → plan → apply::

    import prunekit
    plan = prunekit.prune(model, 0.9, criterion="l1", scope="global")   # masks, dense speed
    prunekit.finetune(model, train_loader, epochs=2)                    # masks held fixed
    prunekit.save(model, "out/pruned", compressed=True)                # safetensors + JSON
"""
__version__ = "0.1.0"

from .registry import Registry  # noqa: E402
from .criteria import CRITERIA, ScoreContext, register_criterion  # noqa: E402
from .plan import Plan, TensorPlan, select  # noqa: E402
from .api import compute_scores, global_sparsity, plan_pruning, prune, select_targets  # noqa: E402
from .masking import apply, enforce, make_permanent, masks, remove  # noqa: E402
from .schedules import SCHEDULES, make_schedule, register_schedule  # noqa: E402
from .finetune import Callback, GradualPruner, finetune, gradual_prune, iterative_prune  # noqa: E402
from .io import load, save  # noqa: E402
from .lottery import LotteryRecord, LotteryResult, lottery_ticket  # noqa: E402
from .distill import Distiller, distill  # noqa: E402
from .export import ExportResult, export_onnx, onnx_latency  # noqa: E402  (onnx imported lazily)
from .sparse import SparseConv2d, SparseLinear, measure_break_even, to_dense, to_sparse  # noqa: E402
from .advise import Advice, advise  # noqa: E402

__all__ = [
    "Registry", "CRITERIA", "ScoreContext", "register_criterion", "Plan", "TensorPlan", "select",
    "compute_scores", "global_sparsity", "plan_pruning", "prune", "select_targets", "apply", "enforce",
    "make_permanent", "masks", "remove", "SCHEDULES", "make_schedule", "register_schedule", "Callback",
    "GradualPruner", "finetune", "gradual_prune", "iterative_prune", "load", "save", "__version__",
    "LotteryResult", "lottery_ticket", "ExportResult", "export_onnx", "onnx_latency", "SparseConv2d",
    "SparseLinear", "measure_break_even", "to_dense", "to_sparse", "Advice", "advise", "LotteryRecord",
    "Distiller", "distill",
]
