"""Name resolution: from the dotted name a user knows to the live module.

Wrappers add path components: DDP/DataParallel and accelerate add ``module``,
FSDP1 ``_fsdp_wrapped_module``, ``torch.compile`` ``_orig_mod``, activation
checkpointing ``_checkpoint_wrapped_module``. A user may name a layer with or
without them; both resolve to the innermost module. Unknown names raise a
``ValueError`` listing the closest existing names.

Two kinds of names live here besides the module tree's own:

- **hook points** (``add_points``): identity modules a hook can go on that are
  not children in the module tree (not in any ``_modules``), e.g.
  ``model.layers.0.self_attn.pattern``; they resolve and list like module
  names while installed, and leave ``named_modules()`` / ``state_dict()`` of
  the model unchanged (``flex_model.hook_points`` installs them).
- **aliases** (``add_aliases``): standard names for a value of the model
  (``blocks.3.resid_pre``) that stand for a module (or hook point) and the
  side of it the value sits on: its output, or its first input. ``module()``
  resolves an alias to that module; ``alias()`` says which side.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Dict, Iterable, Iterator, List, Optional, Tuple

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


@dataclass(frozen=True)
class Alias:
    """A standard name for one value of the model.

    ``target``: the (canonical) name of the module or hook point the value
    belongs to; ``side``: ``"output"`` (its output's first tensor) or
    ``"input"`` (its first input: a hook on the value is a pre-hook there).
    ``doc``: what the value is, for listings.
    """

    name: str
    target: str
    side: str = "output"
    doc: str = ""

    def __post_init__(self) -> None:
        if self.side not in ("output", "input"):
            raise ValueError(f'an alias sits on a module\'s "output" or "input", got {self.side!r}')


class NameResolver:
    """Maps real and canonical (wrapper-free) dotted names to modules and parameters; also hook points
    (modules outside the module tree) and aliases (standard names of values), once added."""

    def __init__(self, root: nn.Module) -> None:
        self.modules: Dict[str, Tuple[str, nn.Module]] = {}  # any accepted name -> (real name, module)
        self.canonical: Dict[str, str] = {}  # real name -> canonical name
        for real, canon, module in _walk(root):
            self.modules[canon] = (real, module)  # deeper entries win: the innermost module
            self.canonical[real] = canon
        for real, _, module in _walk(root):
            self.modules.setdefault(real, (real, module))
        self.points: Dict[str, str] = {}  # hook point canonical name -> real name
        self.aliases: Dict[str, Alias] = {}

    def module_names(self) -> List[str]:
        """Canonical names of every module (the names of the unwrapped model) and installed hook point."""
        return sorted(set(self.canonical.values()))

    # -- hook points and aliases ------------------------------------------------------
    def add_points(self, points: Dict[str, Tuple[str, nn.Module]]) -> None:
        """Make ``{canonical name: (real name, module)}`` resolvable like modules; a name already taken by
        a module of the tree is a ValueError (nothing is added then)."""
        taken = [c for c, (r, _) in points.items() if (c in self.modules and c not in self.points)
                 or (r in self.modules and r not in self.points.values())]
        if taken:
            raise ValueError(f"hook point names {taken[:5]} are already module names of the model")
        for canon, (real, module) in points.items():
            self.modules[canon] = (real, module)
            self.modules.setdefault(real, (real, module))
            self.canonical[real] = canon
            self.points[canon] = real

    def remove_points(self, names: Iterable[str]) -> None:
        """Forget the hook points ``names`` (canonical names); unknown names are ignored."""
        for canon in list(names):
            real = self.points.pop(canon, None)
            if real is None:
                continue
            self.modules.pop(canon, None)
            self.modules.pop(real, None)
            self.canonical.pop(real, None)

    def add_aliases(self, aliases: Iterable[Alias]) -> None:
        """Add standard names; one that is a module name already is a ValueError."""
        aliases = list(aliases)
        clash = [a.name for a in aliases if a.name in self.modules and a.name not in self.points]
        if clash:
            raise ValueError(f"aliases {clash[:5]} are module names of the model")
        for a in aliases:
            self.aliases[a.name] = a

    def alias(self, name: str) -> Optional[Alias]:
        """The alias called ``name``, or None (a module name, or nothing)."""
        return self.aliases.get(name) if isinstance(name, str) else None

    def alias_names(self) -> List[str]:
        return sorted(self.aliases)

    def display(self, name: str) -> str:
        """``name``, with the module and side it stands for when it is an alias (for listings)."""
        a = self.alias(name)
        return name if a is None else f"{name} -> {a.target}{' (input)' if a.side == 'input' else ''}"

    def module(self, name: str) -> Tuple[str, nn.Module]:
        """``(real_name, module)`` for a module name (or the target of an alias), or a ValueError with
        close matches."""
        if not isinstance(name, str):
            raise TypeError(f"a module name must be a string, got {type(name).__name__}")
        if name in self.modules:
            return self.modules[name]
        if name in self.aliases:
            return self.module(self.aliases[name].target)
        param_owner = self._param_owner(name)
        if param_owner is not None:
            raise ValueError(f'"{name}" names a parameter, not a module; use register_hook for a tensor '
                             f'hook on it, or name its module "{param_owner}"')
        raise ValueError(unknown_name(f'no module named "{name}"', name, self.module_names() + self.alias_names()))

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
