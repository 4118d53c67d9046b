"""Full, unsharded parameters: FSDP1 flat parameters, FSDP2/DTensor, TP layers.

``full_parameter`` is collective wherever the parameter is sharded: every
rank of the job must call it; every rank gets the full value (detached).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from flex_model import collectives as C
from flex_model.layout import ParallelLayout
from flex_model.names import NameResolver
from flex_model.placement import Placement, param_tp_dim


def full_parameter(root: nn.Module, names: NameResolver, name: str, peers: Optional[C.StagePeers],
                   layout: ParallelLayout) -> torch.Tensor:
    fsdp1 = [m for m in root.modules() if type(m).__name__ == "FullyShardedDataParallel"]
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
    if tp_dim is None or peers is None:
        return param.detach().clone()
    local = param.detach()
    _, full, _ = C.exchange(peers, local, Placement(tp_dim=tp_dim), None, local.device, name, send=True,
                            everyone=True, capacity=local.numel() * local.element_size())
    return full.clone()
