"""Expansion: extra MLP hidden units attached to an existing model through hooks.

``expand(flex, ["layers.0.mlp", ...], d_expand)`` gives each named MLP
``d_expand`` extra hidden units — an up-projection ``d_model → d_expand``,
the activation, and a down-projection ``d_expand → d_model`` (no bias,
zero-initialised, so the model is unchanged at init) — as trainable modules
(``register_trainable_module``) added to the MLP's output by a forward hook.
The model's source and parameters are untouched. With a ``Router`` the
expanded units are routed too: they are units ``unit_offset ..
unit_offset + d_expand - 1`` of its table (e.g. offset = the MLP's own
hidden size, so one table covers original and expanded units).

Ablating the expanded units = running a pass without the expansion's group
(``flex(x, groups="ablate")`` or any groups that leave ``"expand"`` out).
``contract()`` returns a plain copy of the original model (no hooks, no
extra units), which computes exactly what the ablated expanded model does.
Each rank computes the expanded units on its own (replicated) MLP input;
under data parallel call ``all_reduce_grads()`` before the optimizer step.
"""
from __future__ import annotations

import copy
from typing import Dict, List, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from flex_model.collectives import all_reduce_
from flex_model.flex_model import FlexModel
from flex_model.hook_function import HookFunction, ShardInfo, ShardwiseEdit
from flex_model.routing import Router, scale_grad

class ExpandedUnits(nn.Module):
    """``down(act(up(x)))`` with ``d_expand`` hidden units; ``down`` starts at zero."""

    def __init__(self, d_model: int, d_expand: int, activation: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.up = nn.Linear(d_model, d_expand)
        self.act = activation if activation is not None else nn.GELU()
        self.down = nn.Linear(d_expand, d_model, bias=False)
        nn.init.zeros_(self.down.weight)


class Expansion(ShardwiseEdit):
    """Forward hook on an MLP: output + the expanded units' contribution (routed if the router has masks)."""

    def __init__(self, key: str, router: Optional[Router] = None, unit_offset: int = 0,
                 param_level: bool = False) -> None:
        self.key, self.router, self.unit_offset, self.param_level = key, router, unit_offset, param_level

    def edit_shard(self, current_module: nn.Module, local: torch.Tensor, shard: ShardInfo,
                   modules: nn.ModuleDict) -> torch.Tensor:
        units: ExpandedUnits = modules[self.key]
        x = shard.module_args[0]
        h = units.up(x)
        if self.router is not None and self.router.mask_ids is not None:
            w = self.router.weights(h, torch.arange(h.shape[-1], device=h.device) + self.unit_offset)
            if self.param_level:  # gradient to x unscaled (through a), to up's weight and bias scaled (p)
                a = F.linear(x, units.up.weight.detach(), units.up.bias.detach())
                p = F.linear(x.detach(), units.up.weight, units.up.bias)
                h = h.detach() + (a - a.detach()) + w * (p - p.detach())
            else:
                h = scale_grad(h, w)
        return local + units.down(units.act(h))


class Expanded:
    """What ``expand`` attached: the hooks, the expanded units, and ``contract()``."""

    def __init__(self, flex: FlexModel, hooks: List[HookFunction], units: Dict[str, ExpandedUnits]) -> None:
        self.flex, self.hooks, self.units = flex, hooks, units

    def parameters(self) -> List[nn.Parameter]:
        return [p for u in self.units.values() for p in u.parameters()]

    def all_reduce_grads(self, group: Optional[dist.ProcessGroup] = None) -> None:
        """Average the expanded units' gradients over ``group`` (the data parallel ranks)."""
        for p in self.parameters():
            if p.grad is not None:
                all_reduce_(p.grad, group, op=dist.ReduceOp.AVG)  # the DDP/FSDP mean convention

    def contract(self) -> nn.Module:
        """A plain deep copy of the wrapped model with every FlexModel hook (and the expansion) dropped."""
        return self.flex.copy_without_hooks()


def expand(flex: FlexModel, module_names: Sequence[str], d_expand: int, *, d_model: Optional[int] = None,
           activation: Optional[nn.Module] = None, router: Optional[Router] = None, unit_offset: int = 0,
           param_level: bool = False, group: str = "expand") -> Expanded:
    """Attach ``d_expand`` extra hidden units to each named MLP; tag their hooks ``group``."""
    if not isinstance(d_expand, int) or d_expand < 1:
        raise ValueError(f"d_expand must be a positive int, got {d_expand!r}")
    if isinstance(module_names, str):
        module_names = [module_names]
    hooks, units = [], {}
    for name in module_names:
        size = d_model or _input_size(flex, name)
        key = "expand_" + name.replace(".", "_")
        units[name] = ExpandedUnits(size, d_expand, copy.deepcopy(activation))
        flex.register_trainable_module(key, units[name])
        hook = HookFunction(name, editing_function=Expansion(key, router, unit_offset, param_level))
        flex.register_forward_hook(hook)
        hooks.append(hook)
    flex.update_hook_groups(hooks, group)
    return Expanded(flex, hooks, units)


def _input_size(flex: FlexModel, name: str) -> int:
    module = flex.get_module(name)  # raises with close matches for unknown names
    for m in module.modules():
        size = getattr(m, "in_features", None)
        if isinstance(size, int):
            return size
    raise ValueError(f'cannot read the input size of "{name}" (no submodule with in_features); pass d_model=')
