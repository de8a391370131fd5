"""ZOO: built-in models (a registry), datasets that ship inside packages, and generated text, for the
demo, the tests and the benchmarks. Nothing here is downloaded at run time."""
from prunekit.zoo.models import MODELS, build_model

__all__ = ["MODELS", "build_model"]
