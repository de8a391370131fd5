"""Import timm on a machine without torchvision (``timm:NAME`` model sources, the tests and the benchmarks use it;
prunekit imports timm only through :func:`import_timm`, and only when a timm model is asked for).

timm imports ``torchvision.ops.misc.FrozenBatchNorm2d`` (and some data transforms)
at import time, but PyPI's torchvision is a CUDA build that cannot load next to the
CPU torch used here. The models these tests build never use those names, so a
stand-in package answers the imports while ``timm`` loads, and is removed again
afterwards so that other libraries (transformers) do not think torchvision exists.
"""
import importlib
import importlib.abc
import importlib.machinery
import sys
import types


class _Placeholder(type):
    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Placeholder(name, (), {})


class _StubModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Placeholder(name, (), {})


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path, target=None):
        if fullname == "torchvision" or fullname.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        m = _StubModule(spec.name)
        m.__path__ = []
        return m

    def exec_module(self, module):
        pass


def import_timm():
    """timm, or None when it is not installed."""
    if "timm" in sys.modules:
        return sys.modules["timm"]
    if importlib.util.find_spec("timm") is None:
        return None
    try:
        import torchvision  # noqa: F401  (a working torchvision: nothing to stand in for)
        return importlib.import_module("timm")
    except Exception:
        pass
    finder = _Finder()
    sys.meta_path.insert(0, finder)
    try:
        return importlib.import_module("timm")
    finally:
        sys.meta_path.remove(finder)
        for k in [k for k in sys.modules if k == "torchvision" or k.startswith("torchvision.")]:
            del sys.modules[k]
