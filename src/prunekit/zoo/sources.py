"""Models from outside the zoo: timm, a local Hugging Face folder, or your own factory function.

A *model source* is a string (``--model`` on the command line, ``build_model``'s name)::

    timm:resnet18                  a timm architecture, built with pretrained=False (never downloads)
    hf:path/to/folder              a local Hugging Face folder (config.json, weights if any), local files only
    path/to/model.py:make_model    a function in a Python file that returns an nn.Module
    my_package.models:make_model   a function in an importable module

Built models record ``{"name": <source>, "kwargs": {...}}`` (``model._prunekit_spec``) like the built-in
ones, so :func:`prunekit.save` can say how to rebuild them. timm and Hugging Face sources are libraries:
a saved spec naming them is rebuilt on load (a Hugging Face model from the config recorded in the spec, no
folder needed). A file or module factory is code: building it runs that code, so a spec naming one is only
built when the caller trusts it (:func:`trusting`, ``prunekit.load(path, trust_code=True)``, ``prunekit eval
--trust-factory``); :func:`from_source` is the call for code you name yourself.
"""
from __future__ import annotations

import contextlib
import contextvars
import hashlib
import importlib
import importlib.util
import inspect
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, FrozenSet, Iterable, Iterator, Optional, Union

from torch import nn

from prunekit._util import json_safe
from prunekit.errors import InvalidTypeError, PrunekitError, UnknownNameError
from prunekit.zoo.timm_compat import import_timm

__all__ = ["FORMS", "ModelSource", "UntrustedCodeError", "build_source", "cacheable", "data_kwargs", "from_source",
           "is_source", "parse_source", "trusting"]

FORMS = ("timm:NAME", "hf:DIR", "path/to/file.py:FUNCTION", "package.module:FUNCTION")
# arguments that would fetch weights from the network: weights come only from a checkpoint the user gives
_TIMM_REFUSED = ("pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path")
_MODULE_RE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
_NAME_RE = re.compile(r"^[A-Za-z_]\w*$")


class UntrustedCodeError(PrunekitError):
    """A saved spec names Python code (a factory) that the caller did not agree to run."""


@dataclass(frozen=True)
class ModelSource:
    """One parsed model source: ``kind`` (timm, hf, file, module), ``target`` (the timm name, the folder, the
    file's absolute path or the module name) and, for factories, the ``function`` name."""

    kind: str
    target: str
    function: Optional[str] = None

    @property
    def ref(self) -> str:
        """The canonical spelling, as recorded in a saved spec (paths absolute: eval may run elsewhere)."""
        if self.kind in ("timm", "hf"):
            return f"{self.kind}:{self.target}"
        return f"{self.target}:{self.function}"

    @property
    def runs_user_code(self) -> bool:
        return self.kind in ("file", "module")


def is_source(name: Any) -> bool:
    """True when ``name`` is a model source rather than a built-in model name (which never has a colon)."""
    return isinstance(name, str) and ":" in name


def _bad(ref: str, why: str) -> PrunekitError:
    return PrunekitError(f"model {ref!r}: {why}; allowed forms: a built-in name, {', '.join(FORMS)}")


def parse_source(ref: str, *, need_folder: bool = True) -> ModelSource:
    """``ref`` parsed and checked (the folder or file exists, the names are identifiers); nothing is imported.

    ``need_folder=False``: an ``hf:`` folder may be gone (a saved spec that records the config rebuilds without it).
    """
    if not is_source(ref):
        raise _bad(str(ref), "not a model source")
    kind, _, rest = ref.partition(":")
    if kind == "timm":
        if not rest.strip():
            raise _bad(ref, "give the timm model name after 'timm:'")
        return ModelSource("timm", rest.strip())
    if kind == "hf":
        folder = Path(rest).expanduser()
        if not rest or (need_folder and not (folder / "config.json").is_file()):
            raise _bad(ref, f"{folder} is not a local Hugging Face folder (no config.json); nothing is downloaded")
        return ModelSource("hf", str(folder.resolve()))
    target, _, function = ref.rpartition(":")
    if not _NAME_RE.match(function):
        raise _bad(ref, f"{function!r} is not a function name")
    if target.endswith(".py"):
        path = Path(target).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"model {ref!r}: the file {path} does not exist")
        return ModelSource("file", str(path.resolve()), function)
    if not _MODULE_RE.match(target):
        raise _bad(ref, f"{target!r} is neither a .py file nor a module name")
    return ModelSource("module", target, function)


# ----------------------------------------------------------------------------- trust
_TRUSTED: contextvars.ContextVar[Union[bool, FrozenSet[str]]] = contextvars.ContextVar("prunekit_trusted_factories",
                                                                                      default=frozenset())


@contextlib.contextmanager
def trusting(refs: Union[bool, Iterable[str]] = True) -> Iterator[None]:
    """Within the block, build factories named in ``refs`` (True: any factory; False: changes nothing).

    Building a factory runs its code; loading a saved model must never run code the user did not ask for,
    so by default a spec that names a factory is refused (:class:`UntrustedCodeError`).
    """
    before = _TRUSTED.get()
    if refs is False:
        trusted = before
    elif refs is True or before is True:
        trusted = True
    else:
        trusted = before | frozenset(parse_source(r).ref for r in refs if is_source(r))
    token = _TRUSTED.set(trusted)
    try:
        yield
    except PrunekitError as e:
        # prunekit.load reports a spec it cannot build in its own words; a refusal to run code says it better
        if isinstance(e.__cause__, UntrustedCodeError):
            raise e.__cause__ from None
        raise
    finally:
        _TRUSTED.reset(token)


def _check_trusted(src: ModelSource) -> None:
    trusted = _TRUSTED.get()
    if src.runs_user_code and not (trusted is True or src.ref in trusted):
        raise UntrustedCodeError(
            f"the model is built by the factory {src.ref}: building it runs that Python code, which prunekit "
            "only does when asked; trust it with prunekit.load(path, trust_code=True) (CLI: --trust-factory), "
            "or build the model yourself and pass it: prunekit.load(path, model)")


# ----------------------------------------------------------------------------- building
def _factory(src: ModelSource) -> Callable[..., Any]:
    """The factory function (imports its file or module: runs its code; callers checked the trust)."""
    if src.kind == "module":
        try:
            module = importlib.import_module(src.target)
        except ImportError as e:
            raise PrunekitError(f"model {src.ref!r}: cannot import module {src.target!r}: {e}") from e
    else:
        # one module per file content: the same file is imported once, an edited one again
        digest = hashlib.sha1(Path(src.target).read_bytes()).hexdigest()[:12]
        name = f"prunekit_factory_{digest}"
        module = sys.modules.get(name)
        if module is None:
            spec = importlib.util.spec_from_file_location(name, src.target)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            try:
                spec.loader.exec_module(module)
            except BaseException:
                del sys.modules[name]
                raise
    fn = getattr(module, src.function, None)
    if not callable(fn):
        found = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        raise UnknownNameError(f"model {src.ref!r}: {src.target} has no function {src.function!r}; "
                               f"its callables: {', '.join(found[:20]) or 'none'}")
    return fn


def _build_timm(src: ModelSource, kwargs: Dict[str, Any]) -> nn.Module:
    timm = import_timm()
    if timm is None:
        raise PrunekitError(f"model {src.ref!r} needs timm: pip install --no-deps timm")
    refused = [k for k in _TIMM_REFUSED if k in kwargs]
    if refused:
        raise PrunekitError(f"model {src.ref!r}: {', '.join(refused)} not allowed (nothing is downloaded; "
                            "give trained weights with --checkpoint)")
    if not timm.is_model(src.target):
        close = timm.list_models(f"*{src.target}*")[:10]
        raise UnknownNameError(f"unknown timm model {src.target!r}"
                               + (f"; similar: {', '.join(close)}" if close else ""))
    return timm.create_model(src.target, pretrained=False, **kwargs)


def _build_factory(src: ModelSource, kwargs: Dict[str, Any]) -> nn.Module:
    model = _factory(src)(**kwargs)
    if not isinstance(model, nn.Module):
        raise InvalidTypeError(f"model {src.ref!r} returned a {type(model).__name__}, not a torch nn.Module")
    return model


def build_source(ref: str, **kwargs: Any) -> nn.Module:
    """The model ``ref`` names, built with ``kwargs`` and recording how (``model._prunekit_spec``).

    A factory is only built when trusted (:func:`trusting`); see :func:`from_source` for code you name.
    """
    src = parse_source(ref, need_folder="config" not in kwargs)
    _check_trusted(src)
    safe = {k: json_safe(v, f"model {ref!r} argument {k}") for k, v in kwargs.items()}
    if src.kind == "hf":
        from prunekit.zoo.hfsource import build_hf  # transformers: imported only for hf: sources

        model, safe = build_hf(src.target, safe)
    else:
        try:
            model = (_build_timm if src.kind == "timm" else _build_factory)(src, dict(kwargs))
        except TypeError as e:
            raise InvalidTypeError(f"cannot build model {src.ref!r} with {safe}: {e}") from e
    model._prunekit_spec = {"name": src.ref, "kwargs": safe}
    return model


def from_source(ref: str, **kwargs: Any) -> nn.Module:
    """Build the model ``ref`` names, a factory included: calling this is asking for its code to run."""
    with trusting([ref]):
        return build_source(ref, **kwargs)


# ----------------------------------------------------------------------------- from the data
def data_kwargs(name: str, info: Dict[str, Any]) -> Dict[str, Any]:
    """The constructor arguments model ``name`` takes from the data (``info`` of ``get_loaders``): the number
    of classes, and the input channels where the source has such an argument. User arguments override these."""
    n, shape = int(info["num_classes"]), list(info["input_shape"])
    channels = shape[0] if len(shape) == 3 else None
    if not is_source(name):
        return {"num_classes": n}
    src = parse_source(name)
    if src.kind == "timm":
        return {"num_classes": n, **({"in_chans": channels} if channels is not None else {})}
    if src.kind == "hf":
        return {"num_labels": n}
    _check_trusted(src)
    params = inspect.signature(_factory(src)).parameters
    offered = {"num_classes": n, "in_channels": channels, "in_chans": channels}
    return {k: v for k, v in offered.items() if k in params and v is not None}


def cacheable(name: str) -> bool:
    """Whether a dense model of ``name`` may come from prunekit's cache: a factory's code or a Hugging Face
    folder can change under the same name, so those are always built afresh."""
    return not is_source(name) or parse_source(name).kind == "timm"

