"""Full, unsharded parameters: FSDP1 flat parameters, FSDP2/DTensor, TP layers.

``full_parameter`` is collective wherever the parameter is sharded: every
rank of the job must call it; every rank gets the full value (detached).
"""
from __future__ import annotations

import torch
from torch import nn

from flex_model import collectives as C
from flex_model.frameworks import fsdp1_roots
from flex_model.layout import ParallelLayout
from flex_model.names import NameResolver
from flex_model.placement import Placement, param_tp_dim


def full_parameter(root: nn.Module, names: NameResolver, name: str, layout: ParallelLayout) -> torch.Tensor:
    """The full value of parameter ``name`` of ``root``, detached, on every rank."""
    fsdp1 = fsdp1_roots(root)
    if fsdp1:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        with FSDP.summon_full_params(fsdp1[0], writeback=False):
            _, owner, _ = NameResolver(root).parameter(name)
            return getattr(owner, name.rsplit(".", 1)[-1]).detach().clone()
    _, owner, param = names.parameter(name)
    from torch.distributed.tensor import DTensor

    if isinstance(param, DTensor):
        return param.full_tensor().detach()
    tp_dim = param_tp_dim(owner, name.rsplit(".", 1)[-1], param) if layout.tp > 1 else None
    if tp_dim is None or layout.stage is None:
        return param.detach().clone()
    local = param.detach()
    _, full, _ = C.exchange(layout.stage, local, Placement(tp_dim=tp_dim), None, local.device, name, send=True,
                            everyone=True, capacity=local.numel() * local.element_size())
    return full.clone()
