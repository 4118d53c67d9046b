"""Generation with per-step hooks: ``flex.generate(input_ids, hooks=..., capture=..., steps=..., **generate_kwargs)``.

HuggingFace ``generate`` runs one forward pass per decoding step. During
``flex.generate`` every editing function of the wrapper can read where the
pass is in ``save_ctx.generation``, a ``GenerationContext``:

- ``step``: 0 is the prefill (the whole prompt, ``positions`` = every prompt
  position); step ``s >= 1`` computes the token chosen at step ``s - 1``, at
  position ``prompt_length + s - 1`` — one position with the KV cache on
  (without it, every position so far). The logits of step ``s`` choose the
  ``s``-th new token (counting from 0).
- ``positions``: the sequence indices (of the padded prompt, as the hooked
  values index them) of the tokens this pass computes.
- ``selected``: whether ``steps`` selects this step.

``hooks`` (HookFunctions, or ``(hook_function, hook_type)`` pairs) are
registered on the wrapper for the selected steps only and removed after the
call; hooks registered before the call fire on every step (and can test
``save_ctx.generation.step`` themselves). ``capture`` names are captured
(full values, as ``run_with_cache`` does) on every selected step; the result's
``captures`` holds one value per (name, step). Under data parallelism every
rank runs ``generate`` on its own prompts (``synced_gpus=True`` is passed,
so the ranks run the same number of steps); in global scope a hook's value
is gathered over the ranks' rows each step, so give every rank prompts of
the same length and ``min_new_tokens=max_new_tokens`` (or use replica
scope, where a hook sees only its replica's rows).
"""
from __future__ import annotations

import itertools
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from flex_model.cache import NamesFilter, Recorder, note_on_failure, select_names
from flex_model.flex_model import FlexModel, HookHandle
from flex_model.groups import ALL
from flex_model.hook_function import ExpectedShape, HookFunction, Scope

HookSpec = Union[HookFunction, Tuple[HookFunction, str]]
_CALLS = itertools.count()


@dataclass(frozen=True)
class GenerationContext:
    """Where a generation is, for editing functions: ``save_ctx.generation`` during ``flex.generate``.

    ``step`` 0 is the prefill; each later step computes one new position (with the KV cache).
    ``positions``: sequence indices of the tokens computed in this pass. ``prompt_length``: the prompt's
    length (with its padding). ``selected``: whether ``steps`` selects this step."""

    step: int
    positions: range
    prompt_length: int
    selected: bool = True

    @property
    def is_prefill(self) -> bool:
        return self.step == 0


def generation_context(save_ctx: Any) -> Optional[GenerationContext]:
    """The ``GenerationContext`` of the pass an editing function runs in, or None outside ``flex.generate``."""
    return getattr(save_ctx, "generation", None)


class StepCaptures(Mapping[str, List[torch.Tensor]]):
    """Per-step captures of a generation: ``captures[name]`` is a list with one full value per captured step
    (``captures.steps``); ``at(step)`` is every name's value at one step; ``stack(name)`` stacks the steps
    (equal shapes: e.g. the steps after the prefill); ``cat(name)`` joins them along the sequence dim (the
    prefill's positions, then one per step: the values of a pass over the whole generated sequence). On
    ranks that receive no captures (``here`` False) it is empty."""

    def __init__(self, by_step: Dict[int, Dict[str, List[torch.Tensor]]], names: Sequence[str], here: bool) -> None:
        self._by_step = by_step
        self.names, self.here = list(names), here

    @property
    def steps(self) -> List[int]:
        return sorted(self._by_step)

    def _one(self, name: str, step: int) -> torch.Tensor:
        values = self._by_step[step].get(name, [])
        if len(values) != 1:
            raise ValueError(f'"{name}" fired {len(values)} times at step {step}; captures.firings("{name}", '
                             f"{step}) lists them")
        return values[0]

    def firings(self, name: str, step: int) -> List[torch.Tensor]:
        return list(self._by_step.get(step, {}).get(name, []))

    def __getitem__(self, name: str) -> List[torch.Tensor]:
        if name not in self.names:
            raise KeyError(f'"{name}" was not captured; captured names: {self.names}')
        if not self.here:
            raise KeyError(f'this rank holds no captures ("{name}" is on the owner rank)')
        return [self._one(name, s) for s in self.steps]

    def __iter__(self) -> Iterator[str]:
        return iter(self.names if self.here else [])

    def __len__(self) -> int:
        return len(self.names) if self.here else 0

    def at(self, step: int) -> Dict[str, torch.Tensor]:
        if step not in self._by_step:
            raise KeyError(f"step {step} was not captured; captured steps: {self.steps}")
        return {n: self._one(n, step) for n in self.names if n in self._by_step[step]}

    def stack(self, name: str, steps: Optional[Iterable[int]] = None, dim: int = 0) -> torch.Tensor:
        steps = self.steps if steps is None else list(steps)
        values = [self._one(name, s) for s in steps]
        shapes = {tuple(v.shape) for v in values}
        if len(shapes) > 1:
            raise ValueError(f'the values of "{name}" differ in shape over steps {steps} ({sorted(shapes)}): the '
                             "prefill holds every prompt position; stack the later steps (steps=...) or join "
                             "them along the sequence with cat()")
        return torch.stack(values, dim=dim)

    def cat(self, name: str, steps: Optional[Iterable[int]] = None, dim: int = 1) -> torch.Tensor:
        steps = self.steps if steps is None else list(steps)
        return torch.cat([self._one(name, s) for s in steps], dim=dim)

    def __repr__(self) -> str:
        if not self.here:
            return f"StepCaptures(empty on this rank; {self.names} kept on the owner)"
        return f"StepCaptures(names={self.names}, steps={self.steps})"


@dataclass
class Generation:
    """What ``flex.generate`` returns: ``sequences`` (the token ids), ``captures`` (``StepCaptures``) and
    ``output`` (what HuggingFace ``generate`` returned). Unpacks as ``ids, captures = flex.generate(...)``."""

    sequences: torch.Tensor
    captures: StepCaptures
    output: Any = field(default=None, repr=False)

    def __iter__(self) -> Iterator[Any]:
        yield self.sequences
        yield self.captures


def generating_module(module: nn.Module) -> nn.Module:
    """The module whose ``generate`` runs: ``module`` itself, or the model inside DDP / FSDP1 / accelerate /
    ``torch.compile`` wrappers."""
    m = module
    while not callable(getattr(type(m), "generate", None)):
        inner = getattr(m, "_orig_mod", None) or getattr(m, "module", None)
        if not isinstance(inner, nn.Module) or inner is m:
            raise TypeError(f"{type(module).__name__} has no generate method (a HuggingFace model has one), "
                            "and no wrapped module that has one")
        m = inner
    return m


def _fsdp1_roots(module: nn.Module, model: nn.Module) -> List[nn.Module]:
    """The FSDP1 wrappers between ``module`` and ``model``: their own parameters are unsharded only in their
    forward, which ``model.generate`` bypasses."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    out, m = [], module
    while m is not model:
        if isinstance(m, FSDP):
            out.append(m)
        m = getattr(m, "_orig_mod", None) or getattr(m, "module")
    return out


def _hook_specs(hooks: Union[HookSpec, Sequence[HookSpec]]) -> List[Tuple[HookFunction, str]]:
    if isinstance(hooks, HookFunction) or (isinstance(hooks, tuple) and len(hooks) == 2
                                           and isinstance(hooks[0], HookFunction) and isinstance(hooks[1], str)):
        hooks = [hooks]
    out = []
    for spec in hooks:
        if isinstance(spec, HookFunction):
            out.append((spec, "forward"))
        elif isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[0], HookFunction):
            out.append((spec[0], spec[1]))
        else:
            raise TypeError(f"hooks takes HookFunctions or (HookFunction, hook_type) pairs; got {spec!r}")
    return out


def _input_length(args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> int:
    for value in (kwargs.get("input_ids"), args[0] if args else None, kwargs.get("inputs_embeds")):
        if isinstance(value, torch.Tensor) and value.ndim >= 2:
            return int(value.shape[1])
    raise ValueError("cannot tell this step's positions: the model's forward got neither input_ids nor "
                     "inputs_embeds")


class _Steps:
    """The forward pre-hook on the generating model: counts the steps, sets ``save_ctx.generation``, and puts
    the selected steps' hooks and captures on (and off) before each pass."""

    def __init__(self, flex: FlexModel, steps: Optional[Iterable[int]], hooks: List[Tuple[HookFunction, str]],
                 recorder: Optional[Recorder], groups: Union[str, Iterable[str]], complement: bool) -> None:
        self.flex, self.hooks, self.recorder = flex, hooks, recorder
        self.groups, self.complement = groups, complement
        self.steps = None if steps is None else set(int(s) for s in steps)
        self.step, self.prompt_length = -1, 0
        self.by_step: Dict[int, Dict[str, List[torch.Tensor]]] = {}
        self.tag = f"generate#{next(_CALLS)}"
        self._handles: List[HookHandle] = []
        self._captured_step: Optional[int] = None

    def __call__(self, module: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> None:
        self.harvest()
        self.step += 1
        length = _input_length(args, kwargs)
        if self.step == 0:
            self.prompt_length = length
        total = self.prompt_length + self.step
        selected = self.steps is None or self.step in self.steps
        self.flex.save_ctx.generation = GenerationContext(self.step, range(max(total - length, 0), total),
                                                          self.prompt_length, selected)
        self._select(selected)

    def _select(self, selected: bool) -> None:
        if selected and not self._handles and self.hooks:
            self._handles = [self.flex.register(h, t) for h, t in self.hooks]
            self.flex.update_hook_groups([h for h, _ in self.hooks], self.tag)
        elif not selected and self._handles:
            self.remove_hooks()
        if self.recorder is not None:
            (self.recorder.attach if selected else self.recorder.detach)()
            self._captured_step = self.step if selected else None
        self.choose()

    def choose(self) -> None:
        """The user's group choice, with this call's hooks and captures in it."""
        groups = self.groups
        if not (self.complement or groups == ALL):
            groups = ([groups] if isinstance(groups, str) else list(groups)) + ([self.tag] if self._handles else [])
            if self.recorder is not None:
                groups = self.recorder.groups(groups)
        self.flex.select_groups(groups, self.complement)

    def harvest(self) -> None:
        """Keep what the last pass captured, under its step."""
        if self.recorder is not None and self._captured_step is not None:
            self.by_step[self._captured_step] = self.recorder.take()
            self._captured_step = None

    def remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def generate(flex: FlexModel, *args: Any, hooks: Union[HookSpec, Sequence[HookSpec]] = (),
             capture: NamesFilter = None, steps: Optional[Iterable[int]] = None,
             groups: Union[str, Iterable[str]] = ALL, complement: bool = False, capture_hook_type: str = "forward",
             unpack_idx: int = 0, scope: Optional[Scope] = None,
             expected_shapes: Optional[Mapping[str, ExpectedShape]] = None, **generate_kwargs: Any) -> Generation:
    """Run the wrapped HuggingFace model's ``generate(*args, **generate_kwargs)`` with per-step hooks.

    ``hooks``: HookFunctions (forward hooks) or ``(hook_function, hook_type)`` pairs, registered on
    ``flex`` for the steps ``steps`` selects (None: every step; e.g. ``range(3, 10)``) and removed after.
    ``capture``: names (a list, a pattern with ``{i}``, or a callable on names; None captures nothing)
    captured on the selected steps, as ``run_with_cache`` captures them (``scope``, ``expected_shapes``,
    ``capture_hook_type``, ``unpack_idx``), after every other hook on the same module. ``groups`` /
    ``complement``: which of the wrapper's other hooks fire on every step (as in ``forward``; that choice
    stays in force afterwards, see ``select_groups``). Editing functions read ``save_ctx.generation`` (a
    ``GenerationContext``). Call on every rank alike."""
    if flex.layout.pp > 1:
        raise NotImplementedError("flex.generate runs on one pipeline stage (HuggingFace generate calls the whole "
                                  "model on every rank)")
    model = generating_module(flex.module)
    hook_specs = _hook_specs(hooks)
    names = select_names(flex, capture) if capture is not None else []
    if not flex.layout.is_single:
        generate_kwargs.setdefault("synced_gpus", True)  # every rank of the layout runs the same number of passes
    had_context = hasattr(flex.save_ctx, "generation")
    previous = getattr(flex.save_ctx, "generation", None)
    with ExitStack() as stack:
        recorder = None
        if names:
            recorder = stack.enter_context(Recorder(flex, names, hook_type=capture_hook_type, unpack_idx=unpack_idx,
                                                    scope=scope, expected_shapes=expected_shapes, attached=False))
        counter = _Steps(flex, steps, hook_specs, recorder, groups, complement)
        handle = model.register_forward_pre_hook(counter, with_kwargs=True)
        stack.callback(lambda: flex.select_groups(groups, complement))
        stack.callback(handle.remove)
        stack.callback(counter.remove_hooks)
        for root in _fsdp1_roots(flex.module, model):
            from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

            stack.enter_context(FSDP.summon_full_params(root, recurse=False, writeback=False))
        try:
            output = model.generate(*args, **generate_kwargs)
        except Exception as e:
            note_on_failure(e, "generate")
            raise
        finally:
            if had_context:
                flex.save_ctx.generation = previous
            elif hasattr(flex.save_ctx, "generation"):
                del flex.save_ctx.generation
        counter.harvest()
        here = recorder.here if recorder is not None else True
    sequences = output if isinstance(output, torch.Tensor) else output.sequences
    return Generation(sequences, StepCaptures(counter.by_step, names, here), output)
