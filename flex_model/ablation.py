"""Ablation of chosen hidden units, switched per forward pass with hook groups.

``Ablation(blocks, mode)`` is a ``ShardwiseEdit`` for a forward hook: the
units in ``blocks`` (``(start, end)`` global unit ranges of the value's last
dim) are replaced by zero (``"zero"``), by a recorded running mean
(``"mean"``, from a ``RunningMean`` hook run in earlier passes) or by the
same units at another token of the batch (``"resample"``, a seeded
permutation of the batch × seq tokens). Register it in a group (e.g.
``flex.create_hook_group("ablate", "mlp.act", editing_function=Ablation(...))``)
and run ``flex(x, groups="ablate")``. Each rank edits its own shard; under
data parallel ``resample`` draws from the rank's own batch slice and
``RunningMean`` records the rank's own slice (call ``all_reduce()`` to
share it).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from flex_model.collectives import all_reduce_
from flex_model.hook_function import ShardInfo, ShardwiseEdit
from flex_model.routing import Block, blocks_mask, global_units, unit_count

MODES = ("zero", "mean", "resample")


class RunningMean(ShardwiseEdit):
    """Records the per-unit mean of the hooked value over every token it has seen; edits nothing."""

    def __init__(self) -> None:
        self.sum: Optional[torch.Tensor] = None  # [global units]; only this rank's shard is filled
        self.count = 0

    def edit_shard(self, current_module: nn.Module, local: torch.Tensor, shard: ShardInfo,
                   modules: nn.ModuleDict) -> None:
        units = global_units(shard, local)
        if self.sum is None:
            self.sum = torch.zeros(unit_count(shard, local), dtype=torch.float64)
        flat = local.detach().reshape(-1, local.shape[-1])
        self.sum[units.cpu()] += flat.sum(0).double().cpu()
        self.count += flat.shape[0]
        return None

    @property
    def mean(self) -> torch.Tensor:
        if self.sum is None or self.count == 0:
            raise ValueError("RunningMean has recorded nothing yet; run some passes with its hook before "
                             "mean ablation")
        return (self.sum / self.count).float()

    def all_reduce(self, group: Optional[dist.ProcessGroup] = None) -> None:
        """Sum the records of every rank of ``group`` (e.g. the data parallel ranks)."""
        counts = torch.tensor([float(self.count)], dtype=torch.float64)
        all_reduce_(self.sum, group)  # CPU float64 statistics: moved to the group's device and back
        all_reduce_(counts, group)
        self.count = int(counts.item())


class Ablation(ShardwiseEdit):
    """Replace the units in ``blocks`` by zero, a recorded mean, or values resampled from other tokens."""

    def __init__(self, blocks: Sequence[Block], mode: str = "zero", mean: Optional[RunningMean] = None,
                 seed: int = 0) -> None:
        if mode not in MODES:
            raise ValueError(f"ablation mode must be one of {MODES}, got {mode!r}")
        if mode == "mean" and mean is None:
            raise ValueError('mode="mean" needs mean=RunningMean() registered on the same module and run first')
        self.blocks = [tuple(b) for b in blocks]
        self.mode, self.mean, self.seed = mode, mean, seed

    def edit_shard(self, current_module: nn.Module, local: torch.Tensor, shard: ShardInfo,
                   modules: nn.ModuleDict) -> torch.Tensor:
        units = global_units(shard, local)
        full = unit_count(shard, local)
        end = max((e for _, e in self.blocks), default=0)
        if end > full:
            raise ValueError(f"ablation blocks reach unit {end} but the hooked value has {full} units; "
                             f"use blocks with end <= {full}")
        sel = blocks_mask(self.blocks, units)
        if self.mode == "zero":
            source = torch.zeros_like(local)
        elif self.mode == "mean":
            source = self.mean.mean.to(local.device, local.dtype)[units.cpu()].expand_as(local)
        else:
            flat = local.detach().reshape(-1, local.shape[-1])
            g = torch.Generator().manual_seed(self.seed)
            source = flat[torch.randperm(flat.shape[0], generator=g).to(local.device)].view_as(local)
        return torch.where(sel, source, local)
