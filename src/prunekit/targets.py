"""Which tensors to prune: ``select_targets`` (types, globs, the final classifier) and dotted-name lookup.

Tensors are addressed by dotted names (``"features.3.weight"``), never by live modules, so that plans
can be saved and applied to another copy of a model. ``owner_of`` resolves a name to (module, attribute)
with close matches in the error for a typo.
"""
from __future__ import annotations

import difflib
import fnmatch
from typing import Iterable, List, Optional, Sequence, Tuple, Union

from torch import nn

from prunekit.errors import PrunekitError, UnknownNameError

DEFAULT_TYPES: Tuple[str, ...] = ("Linear", "Conv1d", "Conv2d", "Conv3d")


Patterns = Optional[Union[str, Sequence[str]]]


def _as_list(p: Patterns) -> List[str]:
    if p is None:
        return []
    return [p] if isinstance(p, str) else list(p)


def _type_matcher(types: Optional[Iterable[Union[str, type]]]):
    wanted = list(DEFAULT_TYPES if types is None else types)
    classes = []
    for t in wanted:
        if isinstance(t, type):
            classes.append(t)
        elif isinstance(getattr(nn, str(t), None), type):
            classes.append(getattr(nn, t))
        else:
            raise PrunekitError(f"unknown module type {t!r}; give torch.nn class names such as "
                             f"{', '.join(DEFAULT_TYPES)}, 'Embedding', or classes")
    return tuple(classes)


def _matches(name: str, module_name: str, patterns: List[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(module_name, p) for p in patterns)


def classifier_name(model: nn.Module) -> Optional[str]:
    """The final classifier: the last Linear/Conv module in registration order."""
    last = None
    for name, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            last = name
    return last


def select_targets(model: nn.Module, *, types=None, include: Patterns = None, exclude: Patterns = None,
                   include_classifier: bool = False, param: str = "weight") -> List[str]:
    """Dotted names of the parameters to prune.

    Default: the weights of Linear and Conv layers, without the final classifier
    (pruning it hurts accuracy most and saves least). ``include``/``exclude`` are
    glob patterns matched against module or parameter names (``"features.*"``).
    A tensor shared by several modules (tied weights) is selected once, under the
    first selected name: pruning it prunes it under all its names.
    """
    classes = _type_matcher(types)
    inc, exc = _as_list(include), _as_list(exclude)
    clf = None if include_classifier else classifier_name(model)
    found, seen = [], set()
    for mod_name, module in model.named_modules(remove_duplicate=False):
        p = module._parameters.get(param)
        if p is None and (param + "_orig") in module._parameters:
            raise PrunekitError(f"{mod_name}.{param} is pruned by torch.nn.utils.prune; call "
                             f"torch.nn.utils.prune.remove(module, {param!r}) before using prunekit")
        if p is None or not isinstance(module, classes):
            continue
        name = f"{mod_name}.{param}" if mod_name else param
        if inc and not _matches(name, mod_name, inc):
            continue
        if _matches(name, mod_name, exc):
            continue
        if mod_name == clf and not (inc and _matches(name, mod_name, inc)):
            continue  # an explicit include still wins over the classifier default
        if id(p) in seen:
            continue  # tied: already selected under another name
        seen.add(id(p))
        found.append(name)
    for pat in inc:
        if not any(fnmatch.fnmatchcase(n, pat) or fnmatch.fnmatchcase(n.rpartition(".")[0], pat) for n in found):
            avail = [n for n, m in model.named_modules() if isinstance(m, classes)]
            raise PrunekitError(f"include pattern {pat!r} matches no prunable layer; layers of the "
                             f"selected types: {', '.join(avail) or '(none)'}")
    if not found:
        raise PrunekitError("no parameters selected for pruning (check types/include/exclude; "
                         "the final classifier is excluded unless include_classifier=True)")
    return found


def owner_of(model: nn.Module, name: str) -> Tuple[nn.Module, str]:
    """(module, attribute) of a dotted parameter name, with a helpful error."""
    mod_name, _, pname = name.rpartition(".")
    params = dict(model.named_parameters(remove_duplicate=False))  # tied tensors answer to every name
    if name not in params and name + "_orig" in params:
        raise PrunekitError(f"{name} is pruned by torch.nn.utils.prune (it has {pname}_orig); call "
                         f"torch.nn.utils.prune.remove(module, {pname!r}) before using prunekit")
    if name not in params:
        close = difflib.get_close_matches(name, list(params), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise UnknownNameError(f"unknown parameter {name!r} in {type(model).__name__}{hint}")
    return model.get_submodule(mod_name), pname
