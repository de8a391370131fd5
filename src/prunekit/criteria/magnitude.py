"""Magnitude: ``|w|`` (Han et al. 2015); structured patterns take the Ln norm of each slice."""
from __future__ import annotations

import torch

from prunekit.criteria.base import CRITERIA, ScoreContext, register_criterion


def _abs_into(chunk: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    return torch.abs(chunk, out=out)


@register_criterion("l1", elementwise=_abs_into)
def l1_magnitude(param: torch.Tensor, ctx: ScoreContext) -> torch.Tensor:
    """|w|: the magnitude criterion. Structured: the Ln norm of each slice."""
    return param.detach().abs()


CRITERIA.register("magnitude")(l1_magnitude)  # the same Criterion under its common name
