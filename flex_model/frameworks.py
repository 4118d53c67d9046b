"""What each framework looks like, and the layout read off it.

One place knows the frameworks flex_model reads: fairscale and
megatron-core model-parallel state, DTensor meshes, DDP and FSDP1/FSDP2
wrappers. ``choose_layout`` turns what the user passed (sizes, a mesh, or
nothing) into one ``ParallelLayout``; ``check_layout`` makes sure a layout
agrees with the groups a framework already made, on every rank, before any
group of ours is created; ``uses_fsdp`` / ``fsdp1_roots`` tell FSDP apart.
"""
from __future__ import annotations

import sys
from typing import Any, List, Optional, Sequence

import torch.distributed as dist
from torch import nn

from flex_model import collectives as C
from flex_model.layout import FAIRSCALE_ORDER, MEGATRON_ORDER, ParallelLayout


def uses_fsdp(module: nn.Module) -> bool:
    """Whether FSDP1 (``FullyShardedDataParallel``) or FSDP2 (``fully_shard``) wraps part of ``module``."""
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    return any(isinstance(m, (FullyShardedDataParallel, FSDPModule)) for m in module.modules())


def fsdp1_roots(module: nn.Module) -> List[nn.Module]:
    """The FSDP1 wrappers in ``module``, outermost first."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    return [m for m in module.modules() if isinstance(m, FullyShardedDataParallel)]


def uses_data_parallel(module: nn.Module) -> bool:
    """DDP, FSDP1 or FSDP2 anywhere in ``module``."""
    from torch.nn.parallel import DistributedDataParallel

    return uses_fsdp(module) or any(isinstance(m, DistributedDataParallel) for m in module.modules())


def choose_layout(module: nn.Module, *, tp: int, pp: int, dp: int, group: Optional[dist.ProcessGroup],
                  mesh: Any, order: Sequence[str], batch_dim: int) -> ParallelLayout:
    """The layout from what was passed: a mesh, sizes, or (all sizes 1 on a multi-rank job) the model."""
    if mesh is not None:
        return ParallelLayout.from_device_mesh(mesh, batch_dim=batch_dim)
    defaults = tp == pp == dp == 1
    if defaults and dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        return read_layout(module, group, batch_dim)
    return ParallelLayout.from_sizes(tp=tp, pp=pp, dp=dp, group=group, order=order, batch_dim=batch_dim)


def read_layout(module: nn.Module, group: Optional[dist.ProcessGroup], batch_dim: int) -> ParallelLayout:
    """The layout a framework already set up, when the user gave no sizes."""
    fs = _fairscale_state()
    if fs is not None:
        tp = fs.get_model_parallel_world_size()
        pp = len(fs.get_pipeline_parallel_ranks())  # fairscale has no get_pipeline_parallel_world_size
        return ParallelLayout.from_sizes(tp=tp, pp=pp, dp=fs.get_data_parallel_world_size(), order=FAIRSCALE_ORDER,
                                         batch_dim=batch_dim, source="read from fairscale model parallel state")
    from torch.distributed.tensor import DTensor

    for p in module.parameters():
        if isinstance(p, DTensor) and p.device_mesh.mesh_dim_names:
            return ParallelLayout.from_device_mesh(p.device_mesh, batch_dim=batch_dim)
    if uses_data_parallel(module):
        return ParallelLayout.from_sizes(dp=dist.get_world_size(group), group=group, batch_dim=batch_dim,
                                         source="read from DDP/FSDP: data parallel over the group")
    raise ValueError(f"the job has {dist.get_world_size(group)} ranks but no parallel sizes were given and none "
                     "could be read off the model; pass tensor_parallel_size / pipeline_parallel_size / "
                     "data_parallel_size (their product must be the group size) or device_mesh=")


def _fairscale_state(import_it: bool = True) -> Any:
    """fairscale's ``initialize`` module when its model parallel state is set up, else None
    (without ``import_it``, None unless fairscale was imported already)."""
    fs = sys.modules.get("fairscale.nn.model_parallel.initialize")
    if fs is None:
        if not import_it:
            return None
        try:
            from fairscale.nn.model_parallel import initialize as fs
        except ImportError:
            return None
    return fs if fs.model_parallel_is_initialized() else None


def _megatron_state() -> Any:
    """megatron-core's ``parallel_state`` when initialized (only if megatron was imported), else None."""
    ps = sys.modules.get("megatron.core.parallel_state")
    return ps if ps is not None and ps.model_parallel_is_initialized() else None


def check_layout(layout: ParallelLayout) -> None:
    """Raise on every rank if the layout's tp / pp groups for any rank differ from those fairscale or
    megatron-core already made (a wrong ``parallel_order`` would otherwise hang in a collective)."""
    me = layout.my
    mine = {"tp": [layout.global_rank(me["dp"], me["pp"], t) for t in range(layout.tp)],
            "pp": [layout.global_rank(me["dp"], p, me["tp"]) for p in range(layout.pp)]}
    theirs = {}
    fs = _fairscale_state(import_it=False)
    if fs is not None:
        theirs["fairscale"] = {"tp": fs.get_model_parallel_group(), "pp": fs.get_pipeline_parallel_group()}
    ps = _megatron_state()
    if ps is not None:
        theirs["megatron-core"] = {"tp": ps.get_tensor_model_parallel_group(),
                                   "pp": ps.get_pipeline_model_parallel_group()}
    problem = ""
    for name, groups in theirs.items():
        for axis, group in groups.items():
            ranks = sorted(dist.get_process_group_ranks(group))
            if len(ranks) == getattr(layout, axis) and ranks != sorted(mine[axis]):
                order = MEGATRON_ORDER if name == "megatron-core" else FAIRSCALE_ORDER
                problem = (f"rank {layout.rank}: the layout puts {axis} ranks {mine[axis]} together, but {name}'s "
                           f"{axis} group is {ranks}; pass parallel_order={order} (outermost axis first), or "
                           f"leave the sizes out to read the layout from {name}")
    # Every rank must agree before anyone goes on to create groups (a collective).
    if C.any_rank(bool(problem)):
        raise ValueError(problem or f"rank {layout.rank}: another rank's layout does not match its framework's "
                                    "groups (see its error); pass the parallel_order the framework uses")
