"""Random scores: the baseline every criterion must beat."""
from __future__ import annotations

import torch

from prunekit.criteria.base import ScoreContext, register_criterion


@register_criterion("random")
def random_scores(param: torch.Tensor, ctx: ScoreContext) -> torch.Tensor:
    """Uniform random scores, seeded per tensor; a baseline every method must beat.

    Reduced over slices the i.i.d. scores still give a uniformly random order of
    slices, so the same criterion serves structured pruning.
    """
    return torch.rand(param.shape, generator=ctx.generator(), dtype=torch.float32)
