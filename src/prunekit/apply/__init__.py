"""APPLY: carry a :class:`~prunekit.plan.Plan` out on a model, reversibly.

- :mod:`~prunekit.apply.masking`: masks as 1-bit buffers, pruned weights stored as zeros (dense speed,
  state_dict-safe, undoable with ``keep_original``);
- :mod:`~prunekit.apply.biascorr`: bias correction, the mean output kept through pruning.

The other applier, physical removal, is :mod:`prunekit.surgery`.
"""
from prunekit.apply import biascorr, masking
from prunekit.apply.masking import (
    MaskEnforcer,
    MaskGuard,
    apply,
    current_plan,
    enforce,
    global_sparsity,
    is_masked,
    keep_masks,
    make_permanent,
    masks,
    remove,
    revived,
    sparsity,
)

__all__ = ["biascorr", "masking", "MaskEnforcer", "apply", "current_plan", "enforce", "global_sparsity",
           "is_masked", "keep_masks", "MaskGuard", "revived", "make_permanent", "masks", "remove", "sparsity"]
