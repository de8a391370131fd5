"""The tests' name for :mod:`prunekit.zoo.timm_compat` (timm without torchvision)."""
from prunekit.zoo.timm_compat import import_timm

__all__ = ["import_timm"]
