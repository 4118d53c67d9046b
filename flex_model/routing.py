"""Gradient routing: per-token, per-unit gradient weights as shardwise edits on hooks.

A ``Router`` holds a weight table (class × blocks of hidden units) and, for
one pass, ``mask_ids`` of shape ``[batch, seq]`` (0 = forget, 1 = retain, any
other non-negative integer class; or floats in [0, 1] that interpolate
between the rows of class 0 and class 1). Units outside every block keep
weight 1. Forward values never change (bit-identical); only gradients do:

* ``RouteActivation`` (forward hook on a module whose output ends in a
  hidden dim): the gradient reaching everything upstream is scaled per token
  and unit — ``x * w + x.detach() * (1 - w)``, done exactly as ``grad * w``.
* ``RouteParameters`` (forward hook on a Linear): only that Linear's own
  weight and bias gradients are scaled per token (fastmask's
  ``masking_is_param_level``); the gradient to its input is untouched.

Both are ``ShardwiseEdit``s: they run on every rank on its own shard with no
communication (under data parallel each rank sets its own ``mask_ids``
slice; under tensor parallel global unit indices map onto the shard).
Register them with ``FlexModel.create_hook_group("route", ...)`` and pick
them per pass with ``flex(x, groups="route")``.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from flex_model.hook_function import ShardInfo, ShardwiseEdit

Block = Tuple[int, int]


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by ``w``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(w)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (w,) = ctx.saved_tensors
        return grad * w, None


def scale_grad(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``x`` unchanged; its gradient multiplied by ``w`` (broadcast to ``x``)."""
    return _ScaleGrad.apply(x, w)


def check_blocks(blocks: Sequence[Block], hidden_size: int) -> list:
    """Validate ``(start, end)`` unit ranges against ``hidden_size``; return them as a list."""
    out = []
    for block in blocks:
        if len(block) != 2 or not all(isinstance(i, int) for i in block):
            raise TypeError(f"a block is a (start, end) pair of ints, got {block!r}")
        start, end = block
        if not 0 <= start < end:
            raise ValueError(f"block {block} is empty or negative; use 0 <= start < end")
        if end > hidden_size:
            raise ValueError(f"block {block} goes beyond the hidden size {hidden_size}; "
                             f"use end <= {hidden_size} (or build the router with a larger hidden_size)")
        out.append((start, end))
    return out


def blocks_mask(blocks: Sequence[Block], units: torch.Tensor) -> torch.Tensor:
    """Bool mask over ``units`` (global indices): True where a unit lies in some block."""
    sel = torch.zeros(units.shape, dtype=torch.bool, device=units.device)
    for start, end in blocks:
        sel |= (units >= start) & (units < end)
    return sel


def global_units(shard: ShardInfo, local: torch.Tensor) -> torch.Tensor:
    """Global indices of the last-dim units of ``local``."""
    return shard.global_index(local.ndim - 1, local.shape[-1]).to(local.device)


def unit_count(shard: ShardInfo, local: torch.Tensor) -> int:
    """Number of global (unsharded) units of the last dim of ``local``."""
    return local.shape[-1] * (shard.tp_size if shard.tp_dim == local.ndim - 1 else 1)


class Router:
    """Weights per token class and unit block, and this pass's ``mask_ids``.

    ``hidden_size``: number of (global, unsharded) units addressed;
    ``blocks``: list of ``(start, end)`` unit ranges; ``weights``:
    ``{class_id: [weight per block]}`` — 0 detaches, fractions damp, negatives
    reverse the gradient. Units outside every block keep weight 1.
    """

    def __init__(self, hidden_size: int, blocks: Sequence[Block], weights: Mapping[int, Sequence[float]]) -> None:
        if not isinstance(hidden_size, int) or hidden_size < 1:
            raise ValueError(f"hidden_size must be a positive int, got {hidden_size!r}")
        self.hidden_size = hidden_size
        self.blocks = check_blocks(blocks, hidden_size)
        if not weights:
            raise ValueError("the weight table is empty; give {class_id: [weight per block]}, "
                             "e.g. {0: [0.0], 1: [1.0]}")
        bad = [c for c in weights if not isinstance(c, int) or isinstance(c, bool) or c < 0]
        if bad:
            raise ValueError(f"class ids must be non-negative ints, got {bad}")
        self.classes = sorted(weights)
        table = torch.full((max(self.classes) + 1, hidden_size), float("nan"))
        for c, row in weights.items():
            if len(row) != len(self.blocks):
                raise ValueError(f"class {c} has {len(row)} weight(s) but there are {len(self.blocks)} block(s); "
                                 "give one weight per block")
            table[c] = 1.0
            for (start, end), w in zip(self.blocks, row):
                table[c, start:end] = float(w)
        self.table = table  # [max class + 1, hidden_size]; rows of absent classes are NaN
        self.mask_ids: Optional[torch.Tensor] = None

    @contextmanager
    def masks(self, mask_ids: torch.Tensor) -> Iterator["Router"]:
        """``with router.masks(mask_ids): loss = ...`` sets ``mask_ids`` for the passes inside."""
        previous, self.mask_ids = self.mask_ids, mask_ids
        try:
            yield self
        finally:
            self.mask_ids = previous

    def weights(self, value: torch.Tensor, units: torch.Tensor) -> torch.Tensor:
        """Per token and unit weights for ``value`` ([batch, seq, ..., len(units)]), broadcastable to it."""
        m = self.mask_ids
        if m is None:
            raise ValueError("the router has no mask_ids for this pass; set router.mask_ids (shape [batch, seq]) "
                             "or run the pass inside `with router.masks(mask_ids):`")
        if not isinstance(m, torch.Tensor) or m.is_complex():
            kind = type(m).__name__ if not isinstance(m, torch.Tensor) else str(m.dtype)
            raise TypeError(f"mask_ids must be a tensor of integer class ids or of floats in [0, 1], got {kind}; "
                            "e.g. torch.ones(batch, seq, dtype=torch.long) to retain every token")
        if value.ndim < 3 or tuple(m.shape) != tuple(value.shape[:2]):
            raise ValueError(f"mask_ids has shape {tuple(m.shape)} but the hooked value has shape "
                             f"{tuple(value.shape)}; mask_ids must be [batch, seq] = {tuple(value.shape[:2])} "
                             "(under data parallel: this rank's batch slice)")
        if units.numel() and int(units.max()) >= self.hidden_size:
            raise ValueError(f"the hooked value has units up to {int(units.max())} but the router covers "
                             f"hidden_size {self.hidden_size}; build the router with hidden_size >= "
                             f"{int(units.max()) + 1}")
        table = self.table.to(value.device)[:, units.to(value.device)]
        m = m.to(value.device)
        if m.is_floating_point():
            missing = [c for c in (0, 1) if c not in self.classes]
            if missing:
                raise ValueError(f"continuous mask_ids interpolate between classes 0 and 1, but the weight table "
                                 f"lacks class(es) {missing}; add them")
            if bool(((m < 0) | (m > 1) | m.isnan()).any()):
                raise ValueError(f"continuous mask_ids must lie in [0, 1]; got values in "
                                 f"[{float(m.min())}, {float(m.max())}]")
            m = m[..., None]
            w = (1 - m) * table[0] + m * table[1]
        else:
            used = torch.unique(m).tolist()
            absent = [c for c in used if c < 0 or c not in self.classes]
            if absent:
                raise ValueError(f"mask_ids contain class id(s) {absent} but the weight table has classes "
                                 f"{self.classes}; add a row for each or fix mask_ids")
            w = table[m.long()]
        w = w.to(value.dtype)
        return w.view(*w.shape[:2], *([1] * (value.ndim - 3)), w.shape[-1])


class RouteActivation(ShardwiseEdit):
    """Activation-level routing on the hooked value's last (unit) dim: gradient × weight."""

    def __init__(self, router: Router, unit_offset: int = 0) -> None:
        self.router, self.unit_offset = router, unit_offset

    def edit_shard(self, current_module: nn.Module, local: torch.Tensor, shard: ShardInfo,
                   modules: nn.ModuleDict) -> torch.Tensor:
        units = global_units(shard, local) + self.unit_offset
        return scale_grad(local, self.router.weights(local, units))


def _parallel_input(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The input as the layer itself uses it (fairscale's ColumnParallelLinear all-reduces its gradient)."""
    kind = type(module).__name__
    if kind == "ColumnParallelLinear":
        if getattr(module, "gather_output", True):
            raise ValueError("parameter-level routing on a ColumnParallelLinear needs gather_output=False "
                             "(its output must be the local shard of units)")
        from fairscale.nn.model_parallel.mappings import copy_to_model_parallel_region

        return copy_to_model_parallel_region(x)
    if not isinstance(module, nn.Linear) or type(module.weight).__name__ == "DTensor":
        raise TypeError(f"RouteParameters hooks an nn.Linear or fairscale ColumnParallelLinear, got {kind}")
    return x


class RouteParameters(ShardwiseEdit):
    """Parameter-level routing on a Linear (forward hook): only its weight/bias grads scaled per token.

    Returns ``out.detach() + (a - a.detach()) + w * (p - p.detach())`` with
    ``a = linear(x, W.detach(), b.detach())`` (gradient to the input) and
    ``p = linear(x.detach(), W, b)`` (gradient to W, b) — the value is ``out``.
    """

    def __init__(self, router: Router, unit_offset: int = 0) -> None:
        self.router, self.unit_offset = router, unit_offset

    def edit_shard(self, current_module: nn.Module, local: torch.Tensor, shard: ShardInfo,
                   modules: nn.ModuleDict) -> torch.Tensor:
        if not shard.module_args:
            raise ValueError("RouteParameters must be registered as a forward hook (it needs the layer's input)")
        x, weight, bias = shard.module_args[0], current_module.weight, current_module.bias
        units = global_units(shard, local) + self.unit_offset
        w = self.router.weights(local, units)
        a = F.linear(_parallel_input(current_module, x), weight.detach(), None if bias is None else bias.detach())
        p = F.linear(x.detach(), weight, bias)
        return local.detach() + (a - a.detach()) + w * (p - p.detach())
