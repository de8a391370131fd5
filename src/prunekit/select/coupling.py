"""Coupled tensors: rows removed from a weight take their bias entries with them (torch's ln_structured does not)."""
from __future__ import annotations

from torch import nn

from prunekit.plan import Plan, TensorPlan


def couple_biases(model: nn.Module, plan: Plan) -> None:
    """Rows removed from a weight take their bias entries with them (torch's ln_structured does not)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    for tp in list(plan):
        if tp.pattern != "structured" or tp.dim != 0 or not tp.name.endswith(".weight"):
            continue
        bname = tp.name[: -len("weight")] + "bias"
        b = params.get(bname)
        if b is None or bname in plan.tensors or b.dim() != 1 or b.shape[0] != tp.shape[0]:
            continue
        plan.tensors[bname] = TensorPlan(bname, tuple(b.shape), "structured", units=b.shape[0],
                                         pruned_units=len(tp.pruned_idx), dim=0,
                                         pruned_idx=list(tp.pruned_idx), coupled_to=tp.name)
