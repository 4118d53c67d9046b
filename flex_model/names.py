"""Name resolution: from the dotted name a user knows to the live module.

Wrappers add path components: DDP/DataParallel and accelerate add ``module``,
FSDP1 ``_fsdp_wrapped_module``, ``torch.compile`` ``_orig_mod``, activation
checkpointing ``_checkpoint_wrapped_module``. A user may name a layer with or
without them; both resolve to the innermost module. Unknown names raise a
``ValueError`` listing the closest existing names.
"""
from __future__ import annotations

import difflib
from typing import Dict, Iterator, List, Tuple

from torch import nn

WRAPPER_CHILDREN = ("_fsdp_wrapped_module", "_orig_mod", "_checkpoint_wrapped_module")
DATA_PARALLEL_WRAPPERS = ("DistributedDataParallel", "DataParallel")


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _walk(module: nn.Module, real: str = "", canon: str = "") -> Iterator[Tuple[str, str, nn.Module]]:
    """Yield ``(real_name, canonical_name, module)`` depth-first, parents first."""
    yield real, canon, module
    drops_module = type(module).__name__ in DATA_PARALLEL_WRAPPERS
    for child_name, child in module._modules.items():
        if child is None:
            continue
        is_wrapper = child_name in WRAPPER_CHILDREN or (drops_module and child_name == "module")
        yield from _walk(child, _join(real, child_name), canon if is_wrapper else _join(canon, child_name))


class NameResolver:
    """Maps real and canonical (wrapper-free) dotted names to modules and parameters."""

    def __init__(self, root: nn.Module) -> None:
        self.modules: Dict[str, Tuple[str, nn.Module]] = {}  # any accepted name -> (real name, module)
        self.canonical: Dict[str, str] = {}  # real name -> canonical name
        for real, canon, module in _walk(root):
            self.modules[canon] = (real, module)  # deeper entries win: the innermost module
            self.canonical[real] = canon
        for real, _, module in _walk(root):
            self.modules.setdefault(real, (real, module))

    def module_names(self) -> List[str]:
        """Canonical names of every module (the names of the unwrapped model)."""
        return sorted(set(self.canonical.values()))

    def module(self, name: str) -> Tuple[str, nn.Module]:
        """``(real_name, module)`` for a module name, or a ValueError with close matches."""
        if not isinstance(name, str):
            raise TypeError(f"a module name must be a string, got {type(name).__name__}")
        if name in self.modules:
            return self.modules[name]
        param_owner = self._param_owner(name)
        if param_owner is not None:
            raise ValueError(f'"{name}" names a parameter, not a module; use register_hook for a tensor '
                             f'hook on it, or name its module "{param_owner}"')
        raise ValueError(unknown_name(f'no module named "{name}"', name, self.module_names()))

    def parameter(self, name: str) -> Tuple[str, nn.Module, nn.Parameter]:
        """``(canonical_name, owning_module, parameter)`` for a dotted parameter name."""
        owner = self._param_owner(name)
        if owner is None:
            if name in self.modules:
                raise ValueError(f'"{name}" names a module, not a tensor; tensor hooks take a parameter '
                                 f'name such as "{self._example_param(name)}", module hooks take module names')
            raise ValueError(unknown_name(f'no parameter named "{name}"', name, self.parameter_names()))
        module = self.modules[owner][1]
        return name, module, getattr(module, name.rsplit(".", 1)[-1])

    def parameter_names(self) -> List[str]:
        names = []
        for canon, (_, module) in self.modules.items():
            if self.canonical.get(canon, canon) != canon and canon in self.canonical:
                continue
            names.extend(_join(canon, p) for p, _ in module.named_parameters(recurse=False))
        return sorted(set(names))

    def _param_owner(self, name: str) -> str | None:
        owner, _, attr = name.rpartition(".")
        entry = self.modules.get(owner)
        if entry is None or not attr:
            return None
        return owner if attr in dict(entry[1].named_parameters(recurse=False)) else None

    def _example_param(self, module_name: str) -> str:
        params = [p for p, _ in self.modules[module_name][1].named_parameters()]
        return _join(module_name, params[0]) if params else _join(module_name, "weight")


def unknown_name(problem: str, name: str, candidates: List[str]) -> str:
    """``problem`` (e.g. ``no module named "x"``) and the existing names closest to ``name``."""
    candidates = [c for c in candidates if c]  # the root's name "" helps nobody
    close = difflib.get_close_matches(name, candidates, n=5, cutoff=0.4)
    hint = f"closest names: {close}" if close else f"some existing names: {candidates[:8]}"
    return f"{problem} in the wrapped model; {hint}"
