"""``HookFunction``: what a user registers — a module name, a shape hint and an edit.

A HookFunction is plain user data: registering it (``FlexModel.register``)
makes a record inside that wrapper, so one HookFunction may be registered on
several wrappers, or as several hook types; the firing itself lives in
``flex_model.firing``. An editing function follows ``EditingFunction``; a
``ShardwiseEdit`` instead runs on every rank on its own shard, with no
communication (used for routing and ablation, which are elementwise), and
learns where its shard sits from a ``ShardInfo``.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Literal, Optional, Protocol, Sequence, Tuple

import torch
from torch import nn

ExpectedShape = Optional[Sequence[Optional[int]]]
HookType = Literal["forward", "forward_pre", "full_backward", "full_backward_pre", "tensor"]
# Where one firing gathers: "global" over the whole pipeline stage (every data-parallel replica's batch slice,
# one edit for the global batch), "replica" over one replica's tensor-parallel ranks (one edit per replica).
Scope = Literal["global", "replica"]
SCOPES = ("global", "replica")


class EditingFunction(Protocol):
    """``fn(current_module, inputs, save_ctx, modules) -> Tensor | None``.

    ``inputs`` is the full (unsharded) tensor; returning ``None`` leaves the
    value unchanged; a returned tensor must have the same shape, dtype and
    device. ``save_ctx`` is a namespace kept across hooks and passes;
    ``modules`` holds the trainable modules of the FlexModel.
    """

    def __call__(self, current_module: nn.Module, inputs: torch.Tensor, save_ctx: SimpleNamespace,
                 modules: nn.ModuleDict) -> Optional[torch.Tensor]: ...


@dataclass(frozen=True)
class ShardInfo:
    """Where a local shard sits in the full tensor, for a ``ShardwiseEdit``.

    ``tp_dim`` is split over ``tp_size`` ranks and this rank holds block
    ``tp_rank`` (None: not split). ``dp_dim`` is the batch dim split over data
    parallel ranks; each rank holds its own batch slice. ``module_args`` are
    the module's positional inputs for forward hooks (else None).
    """

    tp_dim: Optional[int] = None
    tp_rank: int = 0
    tp_size: int = 1
    dp_dim: Optional[int] = None
    module_args: Optional[Tuple[Any, ...]] = None

    def global_index(self, dim: int, local_size: int) -> torch.Tensor:
        """Global indices, along ``dim``, of this shard's ``local_size`` entries."""
        offset = self.tp_rank * local_size if dim == self.tp_dim else 0
        return torch.arange(offset, offset + local_size)


class ShardwiseEdit:
    """Base class for elementwise edits that run on every rank on its own shard.

    Subclasses implement ``edit_shard``. Nothing is gathered, stored in
    ``output_dict`` or communicated; errors raise on the rank where they occur.
    """

    def edit_shard(self, current_module: nn.Module, local: torch.Tensor, shard: ShardInfo,
                   modules: nn.ModuleDict) -> Optional[torch.Tensor]:
        raise NotImplementedError


class HookFunction:
    """One hook: where (``module_name``), what shape (``expected_shape``), which edit.

    ``unpack_idx`` picks the tensor leaf of the hooked value (depth-first:
    sequence items in order, dict values in insertion order, dataclass fields
    in declaration order; for pre-hooks the value is ``(args, kwargs)``).
    ``scope`` overrides the wrapper's scope for this hook (see ``FlexModel``).
    """

    def __init__(self, module_name: str, expected_shape: ExpectedShape = None,
                 editing_function: Optional[EditingFunction | ShardwiseEdit] = None, unpack_idx: int = 0, *,
                 scope: Optional[Scope] = None) -> None:
        if not isinstance(module_name, str) or not module_name:
            raise TypeError(f"module_name must be a non-empty dotted name, got {module_name!r}")
        if expected_shape is not None:
            if callable(expected_shape) or isinstance(expected_shape, ShardwiseEdit):
                raise TypeError(f"expected_shape (the second argument) got the callable {_label(expected_shape)}; "
                                "pass an editing function by keyword: "
                                f"HookFunction({module_name!r}, editing_function=...)")
            if isinstance(expected_shape, (str, bytes)) or not all(
                    d is None or (isinstance(d, int) and d > 0) for d in expected_shape):
                raise TypeError(f"expected_shape must be a sequence of positive ints or None, got {expected_shape!r}")
            expected_shape = tuple(expected_shape)
        if editing_function is not None and not callable(editing_function) \
                and not isinstance(editing_function, ShardwiseEdit):
            raise TypeError(f"editing_function must be callable, got {type(editing_function).__name__}")
        if not isinstance(unpack_idx, int):
            raise TypeError(f"unpack_idx must be an int, got {unpack_idx!r}")
        if scope is not None and scope not in SCOPES:
            raise ValueError(f'scope must be "global" or "replica" (or None: the wrapper\'s), got {scope!r}')
        self.module_name = module_name
        self.expected_shape = expected_shape
        self.editing_function = editing_function
        self.unpack_idx = unpack_idx
        self.scope = scope

    def __repr__(self) -> str:
        edit = _label(self.editing_function) if self.editing_function is not None else None
        scope = f", scope={self.scope!r}" if self.scope is not None else ""
        return (f"HookFunction({self.module_name!r}, expected_shape={self.expected_shape}, "
                f"editing_function={edit}, unpack_idx={self.unpack_idx}{scope})")


def _label(fn: Any) -> str:
    return getattr(fn, "__name__", type(fn).__name__)
