"""A named activation cache: ``flex.run_with_cache(*args, names_filter=...)`` → ``(output, cache)``.

One forward pass with a capture hook on every selected module (every module
of the model by default); the hooks exist for that call only and are removed
afterwards, also when the pass raises. What lands in the cache is the full,
unsharded value of each module's output — gathered over tensor-parallel
shards and data-parallel batch slices as every ``FlexModel`` capture is — on
the owner rank (``store="root"`` semantics; every rank with ``store="all"``).
In replica scope (``scope="replica"``) each data-parallel replica's owner
holds its replica's rows.

The capture hooks (``Recorder``) are registered after the wrapper's own,
with ``output_dict`` keys of their own (``register(..., store_as=...)``)
taken out again after the pass: the wrapper's ``output_dict`` is left as it
was, and the user's own hooks (edits, captures) fire as usual in the pass —
the cache holds what flowed out of each module, after the user's edits of
that module. Built only on ``FlexModel``'s public surface: ``register``
(with ``store_as``), ``update_hook_groups``, ``storing``,
``wrapped_module_names``, ``aliases``. One pipeline stage (no pipeline parallelism).
"""
from __future__ import annotations

import difflib
import itertools
import re
from contextlib import ExitStack
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from flex_model.flex_model import FlexModel, HookHandle
from flex_model.groups import ALL
from flex_model.hook_function import ExpectedShape, HookFunction, Scope

NamesFilter = Union[None, str, Sequence[str], Callable[[str], bool]]
LAYER = "{i}"  # the layer index in a name pattern: "layers.{i}.mlp"


# -- names ------------------------------------------------------------------------------------------------
def hookable_names(flex: FlexModel) -> List[str]:
    """Every name a cache can hold: the module names of the unwrapped model (without the root, with the
    hook points installed so far), then the model's aliases (``flex.aliases()``: ``blocks.0.resid_post``,
    ...) where the wrapper has them."""
    names = list(flex.wrapped_module_names)
    aliases = getattr(flex, "aliases", None)
    if callable(aliases):
        names += [a for a in aliases() if a not in names]
    return names


def pattern_regex(pattern: str) -> "re.Pattern[str]":
    """``"layers.{i}.mlp"`` → a regex matching ``layers.0.mlp``, ``layers.1.mlp``, ... (group 1: the index)."""
    return re.compile("^" + re.escape(pattern).replace(re.escape(LAYER), r"(\d+)") + "$")


def expand_pattern(pattern: str, names: Iterable[str]) -> List[str]:
    """The names matching ``pattern`` (with ``{i}``), by layer index."""
    regex = pattern_regex(pattern)
    found = [(int(m.group(1)), n) for n in names for m in [regex.match(n)] if m]
    return [n for _, n in sorted(found)]


def select_names(flex: FlexModel, names_filter: NamesFilter) -> List[str]:
    """The names a filter selects: None → every name (``hookable_names``); a callable → the names it
    accepts; a name or a list of names, each exact or a pattern with ``{i}`` (unknown names raise when
    registered, with the closest existing names)."""
    candidates = hookable_names(flex)
    if names_filter is None:
        return candidates
    if callable(names_filter):
        chosen = [n for n in candidates if names_filter(n)]
        if not chosen:
            raise ValueError(f"names_filter accepts none of the model's {len(candidates)} names; some names: "
                             f"{candidates[:8]}")
        return chosen
    if isinstance(names_filter, str):
        names_filter = [names_filter]
    chosen = []
    for name in names_filter:
        if not isinstance(name, str):
            raise TypeError(f"names_filter takes a callable, a name or a list of names; got {name!r} in the list")
        if LAYER in name:
            matched = expand_pattern(name, candidates)
            if not matched:
                close = difflib.get_close_matches(name.replace(LAYER, "0"), candidates, n=5, cutoff=0.4)
                raise ValueError(f'no name matches the pattern "{name}"; closest names: {close}')
            chosen += [n for n in matched if n not in chosen]
        elif name not in chosen:
            chosen.append(name)
    return chosen


def _shape_for(name: str, expected_shapes: Optional[Mapping[str, ExpectedShape]]) -> ExpectedShape:
    if not expected_shapes:
        return None
    if name in expected_shapes:
        return expected_shapes[name]
    for pattern, shape in expected_shapes.items():
        if LAYER in pattern and pattern_regex(pattern).match(name):
            return shape
    return None


# -- the recorder: capture hooks whose captures go under keys of their own ----------------------------------
_RECORDERS = itertools.count()


class Recorder:
    """Capture-only hooks on ``names``, registered on ``flex`` with ``output_dict`` keys of their own
    (``register(..., store_as=...)``), so they never mix with the captures of the user's hooks.

    ``with Recorder(flex, names) as rec: flex(x, groups=rec.groups(...)); values = rec.take()``.
    ``attach()`` / ``detach()`` put the hooks on and take them off inside the block (e.g. per generation
    step); the block's end takes them off, also on an error. The hooks carry a group of their own, which
    ``groups()`` adds to a pass's group choice. A wrapper made with ``store="none"`` stores as "root"
    inside the block (what its own hooks capture there is dropped at the end). ``here``: whether this rank
    receives the captures."""

    def __init__(self, flex: FlexModel, names: Sequence[str], *, hook_type: str = "forward", unpack_idx: int = 0,
                 scope: Optional[Scope] = None, expected_shapes: Optional[Mapping[str, ExpectedShape]] = None,
                 attached: bool = True) -> None:
        self.flex, self.names = flex, list(names)
        self.hook_type, self.unpack_idx = hook_type, unpack_idx
        self.scope = scope or flex.scope
        self.expected_shapes = expected_shapes
        self.tag = f"capture#{next(_RECORDERS)}"
        self.keys = {n: key_for(n, self.tag) for n in self.names}
        self._start_attached = attached
        self._handles: List[HookHandle] = []
        self._stack: Optional[ExitStack] = None
        self._before: Optional[Dict[str, int]] = None

    @property
    def store(self) -> str:
        return "all" if self.flex.store == "all" else "root"

    @property
    def here(self) -> bool:
        layout = self.flex.layout
        owner = layout.owner if self.scope == "global" else layout.replica_owner
        return self.store == "all" or layout.rank == owner

    def __enter__(self) -> "Recorder":
        if self.flex.layout.pp > 1:
            raise NotImplementedError(
                "the research tools (run_with_cache, patching_sweep, generate) run on one pipeline stage: the "
                "later stages' captures reach the owner only once every stage has run its part of the pass "
                "(gather_pipeline_outputs), which one call on each rank cannot wait for; register capture hooks "
                "and call flex.gather_pipeline_outputs() after the pipeline's pass instead")
        self._stack = ExitStack()
        if self.flex.store == "none":  # nothing of the user's hooks may stay: lengths now, cut back at the end
            self._before = {k: len(v) for k, v in self.flex.output_dict.items()}
            self._stack.enter_context(self.flex.storing("root"))
        try:
            if self._start_attached:
                self.attach()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def attach(self) -> None:
        """Put the capture hooks on (nothing if they are on); they come after every hook already there."""
        if self._handles:
            return
        try:
            for name in self.names:
                hook = HookFunction(name, _shape_for(name, self.expected_shapes), unpack_idx=self.unpack_idx,
                                    scope=self.scope)
                self._handles.append(self.flex.register(hook, self.hook_type, store_as=self.keys[name]))
        except BaseException:
            self.detach()
            raise
        self.flex.update_hook_groups([h.hook for h in self._handles], self.tag)

    def detach(self) -> None:
        """Take the capture hooks off (what they captured stays until ``take``)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def groups(self, groups: Union[str, Iterable[str]] = ALL, complement: bool = False) -> Union[str, List[str]]:
        """``groups`` for a pass that fires the user's choice and the capture hooks."""
        if complement or groups == ALL or not self._handles:
            return groups  # the capture hooks are in "all" and in no group a complement leaves out
        return ([groups] if isinstance(groups, str) else list(groups)) + [self.tag]

    def take(self) -> Dict[str, List[torch.Tensor]]:
        """What was captured since the last ``take`` (name → one tensor per firing, in firing order)."""
        output_dict = self.flex.output_dict
        return {n: output_dict.pop(k) for n, k in self.keys.items() if output_dict.get(k)}

    def __exit__(self, *exc: Any) -> None:
        self.detach()
        output_dict = self.flex.output_dict
        for key in self.keys.values():
            output_dict.pop(key, None)
        if self._stack is not None:
            self._stack.close()
            self._stack = None
        if self._before is not None:  # store="none": the user's hooks keep nothing
            for key in list(output_dict):
                if key not in self._before:
                    del output_dict[key]
                else:
                    del output_dict[key][self._before[key]:]
            self._before = None


def key_for(name: str, tool: str) -> str:
    """The ``output_dict`` key a tool's hook on ``name`` stores under: ``"<name> (<tool>)"`` (errors name it)."""
    return f"{name} ({tool})"


def note_on_failure(error: BaseException, what: str) -> None:
    """Add a hint for a capture that cannot be placed (under tensor parallelism)."""
    text = str(error)
    m = re.search(r'hook "([^"]+?)(?: \([\w#]+\))?"', text)
    if m and ("expected_shape" in text or "cannot" in text):
        name = m.group(1)
        error.add_note(f'{what}: leave "{name}" out (names_filter=...) or give its full shape, e.g. '
                       f'expected_shapes={{"{name}": (None, None, FULL_WIDTH)}} (None: any size)')


# -- the cache ----------------------------------------------------------------------------------------------
class ActivationCache(Mapping[str, torch.Tensor]):
    """Full activations by name, from one pass (``run_with_cache``).

    ``cache[name]`` is the module's full output (one tensor: the module fired once in the pass; see
    ``firings`` for modules called several times). ``stack("layers.{i}.mlp")`` stacks a per-layer family
    into ``(n_layers, ...)``; ``stack("mlp")`` finds the family ``<...>.{i}.mlp`` (or ``.hook_mlp``)
    itself. ``to(device)`` moves every tensor. On ranks that hold no captures (all but the owner, with
    ``store="root"``) the cache is empty and ``here`` is False; ``names`` lists what was asked for
    everywhere.
    """

    def __init__(self, firings: Dict[str, List[torch.Tensor]], names: Sequence[str] = (), here: bool = True) -> None:
        self._firings = {n: list(v) for n, v in firings.items()}
        self.names = list(names) or list(self._firings)
        self.here = here

    # -- Mapping ----------------------------------------------------------------------
    def __getitem__(self, name: str) -> torch.Tensor:
        values = self._lookup(name)
        if len(values) != 1:
            raise ValueError(f'"{name}" fired {len(values)} times in the pass; cache.firings("{name}") lists '
                             "every firing's value")
        return values[0]

    def __iter__(self) -> Iterator[str]:
        return iter(self._firings)

    def __len__(self) -> int:
        return len(self._firings)

    def __contains__(self, name: object) -> bool:
        return name in self._firings

    def firings(self, name: str) -> List[torch.Tensor]:
        """Every value ``name`` produced in the pass, in order (one per call of the module)."""
        return list(self._lookup(name))

    def _lookup(self, name: str) -> List[torch.Tensor]:
        if name in self._firings:
            return self._firings[name]
        if not self.here:
            raise KeyError(f'this rank holds no captures ("{name}" is on the owner rank; run inside '
                           '`with flex.storing("all"):` for a copy on every rank)')
        if name in self.names:
            raise KeyError(f'"{name}" was hooked but never fired in the pass')
        close = difflib.get_close_matches(name, list(self._firings), n=5, cutoff=0.4)
        raise KeyError(f'"{name}" is not in the cache; closest names: {close or list(self._firings)[:8]}')

    # -- layers -------------------------------------------------------------------------
    def layer_names(self, name: str) -> List[str]:
        """The names of the per-layer family ``name`` stands for, by layer index: a pattern with ``{i}``
        (``"layers.{i}.mlp"``), or the end of the names, found as ``<prefix>.{i}.[...].<name>`` (or
        ``hook_<name>``): ``"mlp"``, ``"mlp.up"``, ``"up"``, ``"resid_post"``. Several families end so: an
        error naming them."""
        if LAYER in name:
            found = expand_pattern(name, self._firings)
        else:
            regex = re.compile(r"^(.*?)(\d+)\.((?:.*\.)?)(?:hook_)?" + re.escape(name) + "$")
            hits = [(m.group(1) + "{i}." + m.group(3), int(m.group(2)), n)
                    for n in self._firings for m in [regex.match(n)] if m]
            families = sorted({f + name for f, _, _ in hits})
            if len(families) > 1:
                raise ValueError(f'"{name}" names several per-layer families ({families}); give one as a pattern')
            found = [n for _, _, n in sorted(hits, key=lambda h: h[1])]
        if not found:
            raise KeyError(f'no cached name matches "{name}" as a per-layer family; cached names: '
                           f"{list(self._firings)[:8]}" if self.here else "this rank holds no captures")
        return found

    def stack(self, name: str, dim: int = 0) -> torch.Tensor:
        """The per-layer family ``name`` stacked along a new ``dim``: ``(n_layers, ...)`` by default."""
        return torch.stack([self[n] for n in self.layer_names(name)], dim=dim)

    # -- moving ---------------------------------------------------------------------------
    def to(self, *args: Any, **kwargs: Any) -> "ActivationCache":
        """A cache with every tensor moved (``Tensor.to`` arguments: a device, a dtype)."""
        return ActivationCache({n: [t.to(*args, **kwargs) for t in v] for n, v in self._firings.items()},
                               self.names, self.here)

    def cpu(self) -> "ActivationCache":
        return self.to("cpu")

    def __repr__(self) -> str:
        if not self.here:
            return f"ActivationCache(empty on this rank; {len(self.names)} names kept on the owner)"
        shapes = ", ".join(f"{n}: {tuple(v[0].shape)}" + (f" x{len(v)}" if len(v) > 1 else "")
                           for n, v in list(self._firings.items())[:6])
        more = f", ... ({len(self)} names)" if len(self) > 6 else ""
        return f"ActivationCache({shapes}{more})"


def run_with_cache(flex: FlexModel, *args: Any, names_filter: NamesFilter = None,
                   groups: Union[str, Iterable[str]] = ALL, complement: bool = False, hook_type: str = "forward",
                   unpack_idx: int = 0, scope: Optional[Scope] = None,
                   expected_shapes: Optional[Mapping[str, ExpectedShape]] = None,
                   **kwargs: Any) -> Tuple[Any, ActivationCache]:
    """Run ``flex(*args, groups=groups, complement=complement, **kwargs)`` once and return ``(output, cache)``.

    ``names_filter``: None (every module of the model, and its aliases where the wrapper has them), a
    callable on a name, a name, or a list of names (each may be a pattern with ``{i}``:
    ``"layers.{i}.mlp"``). The cache holds each name's full value (``hook_type`` "forward": the module
    output's ``unpack_idx``-th tensor leaf; "forward_pre": its input), after the wrapper's own hooks on
    that module fired; ``groups`` / ``complement`` choose which of those fire, the capture hooks always do.
    ``scope`` (None: the wrapper's): "global" gathers every replica's rows to the owner; "replica" gives
    each replica's owner its own rows. The cache is on the owner (``store="root"`` semantics, also for a
    wrapper made with ``store="none"``), or on every rank inside ``with flex.storing("all"):``.
    ``expected_shapes``: full shapes by name or pattern, for values whose split the model does not say
    (see ``HookFunction.expected_shape``). Call on every rank alike."""
    names = select_names(flex, names_filter)
    with Recorder(flex, names, hook_type=hook_type, unpack_idx=unpack_idx, scope=scope,
                  expected_shapes=expected_shapes) as rec:
        try:
            output = flex(*args, groups=rec.groups(groups, complement), complement=complement, **kwargs)
        except Exception as e:
            note_on_failure(e, "run_with_cache")
            raise
        values = rec.take()
        here = rec.here
    return output, ActivationCache(values, names, here)
