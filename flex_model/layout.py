"""The parallel layout: which ranks form the data, pipeline and tensor axes.

One ``ParallelLayout`` is built (and validated) when a model is wrapped and
passed to everything that needs it; nothing reads a global. Rank order is
data, not an assumption: fairscale orders the axes ``("dp", "pp", "tp")``
(outermost first), Megatron-LM ``("pp", "dp", "tp")``; a ``DeviceMesh`` says
its own order through its dim names. ``StageGroups`` owns the process groups
flex_model creates for one layout and releases them.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

AXES = ("dp", "pp", "tp")
FAIRSCALE_ORDER = ("dp", "pp", "tp")
MEGATRON_ORDER = ("pp", "dp", "tp")


@dataclass(frozen=True)
class ParallelLayout:
    """Sizes and rank order of the dp/pp/tp axes over the wrapped group.

    ``ranks`` are the global ranks of the wrapped group in group order;
    ``rank`` is this process's global rank; ``batch_dim`` is the dim along
    which data parallelism splits activations.
    """

    dp: int = 1
    pp: int = 1
    tp: int = 1
    order: Tuple[str, ...] = FAIRSCALE_ORDER
    ranks: Tuple[int, ...] = (0,)
    rank: int = 0
    batch_dim: int = 0

    def __post_init__(self) -> None:
        for axis in AXES:
            size = getattr(self, axis)
            if not isinstance(size, int) or size < 1:
                raise ValueError(f"{axis} size must be a positive int, got {size!r}")
        if sorted(self.order) != sorted(AXES):
            raise ValueError(f"order must be a permutation of {AXES}, got {self.order}")
        if self.dp * self.pp * self.tp != len(self.ranks):
            raise ValueError(
                f"data_parallel_size {self.dp} × pipeline_parallel_size {self.pp} × tensor_parallel_size "
                f"{self.tp} = {self.dp * self.pp * self.tp}, but the process group has {len(self.ranks)} "
                f"ranks; choose sizes whose product is the group size")
        if self.rank not in self.ranks:
            raise ValueError(f"rank {self.rank} is not in the wrapped process group {list(self.ranks)}")

    # -- construction ------------------------------------------------------
    @classmethod
    def single(cls) -> "ParallelLayout":
        return cls()

    @classmethod
    def from_sizes(cls, *, tp: int = 1, pp: int = 1, dp: int = 1, group: Optional[dist.ProcessGroup] = None,
                   order: Sequence[str] = FAIRSCALE_ORDER, batch_dim: int = 0) -> "ParallelLayout":
        """The layout of ``group`` (default: the world), split into the given sizes."""
        if not dist.is_available() or not dist.is_initialized():
            if tp * pp * dp != 1:
                raise ValueError(f"sizes tp={tp} pp={pp} dp={dp} need torch.distributed: call "
                                 "torch.distributed.init_process_group (torchrun does it) before wrapping")
            return cls(batch_dim=batch_dim)
        ranks = tuple(dist.get_process_group_ranks(group or dist.group.WORLD))
        return cls(dp=dp, pp=pp, tp=tp, order=tuple(order), ranks=ranks, rank=dist.get_rank(),
                   batch_dim=batch_dim)

    @classmethod
    def from_device_mesh(cls, mesh, batch_dim: int = 0) -> "ParallelLayout":
        """The layout of a ``DeviceMesh`` whose dim names are among dp/pp/tp (others fold into dp)."""
        names = tuple(mesh.mesh_dim_names or ())
        if len(names) != mesh.ndim:
            raise ValueError("the DeviceMesh needs mesh_dim_names, e.g. init_device_mesh('cpu', (2, 2), "
                             "mesh_dim_names=('dp', 'tp'))")
        unknown = [n for n in names if n not in AXES]
        if unknown:
            raise ValueError(f"mesh dims {unknown} are not among {AXES}; rename them")
        sizes = dict(zip(names, mesh.mesh.shape))
        order = names + tuple(a for a in AXES if a not in names)
        ranks = tuple(int(r) for r in mesh.mesh.flatten().tolist())
        return cls(dp=sizes.get("dp", 1), pp=sizes.get("pp", 1), tp=sizes.get("tp", 1), order=order,
                   ranks=ranks, rank=dist.get_rank(), batch_dim=batch_dim)

    @classmethod
    def from_fairscale(cls, batch_dim: int = 0) -> "ParallelLayout":
        """The layout that fairscale's ``initialize_model_parallel`` set up (order dp, pp, tp)."""
        from fairscale.nn.model_parallel import initialize as fs

        tp = fs.get_model_parallel_world_size()
        pp = len(fs.get_pipeline_parallel_ranks())  # fairscale has no get_pipeline_parallel_world_size
        return cls.from_sizes(tp=tp, pp=pp, dp=fs.get_data_parallel_world_size(), order=FAIRSCALE_ORDER,
                              batch_dim=batch_dim)

    # -- queries -------------------------------------------------------------
    @property
    def world_size(self) -> int:
        return len(self.ranks)

    @property
    def is_single(self) -> bool:
        return self.world_size == 1

    def coords(self, global_rank: int) -> Dict[str, int]:
        """``{"dp": i, "pp": j, "tp": k}`` of a global rank."""
        index = self.ranks.index(global_rank)
        out: Dict[str, int] = {}
        for axis in reversed(self.order):  # innermost axis varies fastest
            size = getattr(self, axis)
            out[axis] = index % size
            index //= size
        return out

    def global_rank(self, dp: int = 0, pp: int = 0, tp: int = 0) -> int:
        coords = {"dp": dp, "pp": pp, "tp": tp}
        index = 0
        for axis in self.order:
            index = index * getattr(self, axis) + coords[axis]
        return self.ranks[index]

    def stage_ranks(self, pp: int) -> List[int]:
        """Global ranks of pipeline stage ``pp``, ordered by (dp, tp)."""
        return [self.global_rank(d, pp, t) for d in range(self.dp) for t in range(self.tp)]

    @property
    def my(self) -> Dict[str, int]:
        return self.coords(self.rank)

    @property
    def owner(self) -> int:
        """The global rank where ``output_dict`` lives: rank (dp 0, pp 0, tp 0)."""
        return self.global_rank(0, 0, 0)


def check_against_frameworks(layout: ParallelLayout) -> None:
    """Raise if the layout's tp / pp groups for this rank differ from those fairscale or megatron-core
    already made (a wrong ``parallel_order`` would otherwise hang in a collective)."""
    me = layout.my
    mine = {"tp": [layout.global_rank(me["dp"], me["pp"], t) for t in range(layout.tp)],
            "pp": [layout.global_rank(me["dp"], p, me["tp"]) for p in range(layout.pp)]}
    theirs = {}
    fs = sys.modules.get("fairscale.nn.model_parallel.initialize")
    if fs is not None and fs.model_parallel_is_initialized():
        theirs["fairscale"] = {"tp": fs.get_model_parallel_group(), "pp": fs.get_pipeline_parallel_group()}
    ps = sys.modules.get("megatron.core.parallel_state")
    if ps is not None and ps.model_parallel_is_initialized():
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
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    flag = torch.tensor([int(bool(problem))], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if flag.item():
        raise ValueError(problem or f"rank {layout.rank}: another rank's layout does not match its framework's "
                                    "groups (see its error); pass the parallel_order the framework uses")


class StageGroups:
    """Process groups flex_model creates for one layout; ``release()`` destroys them.

    ``stage`` spans this rank's pipeline stage (dp × tp ranks); ``roots`` spans
    the root (dp 0, tp 0) of every stage, for shipping captures to the owner.
    Creating them is collective: every rank of the default group must wrap
    its model at the same point (as it must call ``new_group``).
    """

    def __init__(self, layout: ParallelLayout) -> None:
        self.layout = layout
        me = layout.my
        self.stage_ranks = layout.stage_ranks(me["pp"])
        self.root_ranks = [layout.global_rank(0, p, 0) for p in range(layout.pp)]
        self._created: List[dist.ProcessGroup] = []
        stages = [self._new(layout.stage_ranks(p)) for p in range(layout.pp)]
        self.stage = stages[me["pp"]]
        self.roots = self._new(self.root_ranks)

    def _new(self, ranks: List[int]) -> Optional[dist.ProcessGroup]:
        if len(ranks) == 1:
            return None
        group = dist.new_group(ranks)  # every rank of the default group calls this, members or not
        if self.layout.rank not in ranks:
            return None
        self._created.append(group)
        return group

    def release(self) -> None:
        for group in self._created:
            dist.destroy_process_group(group)
        self._created.clear()
        self.stage = self.roots = None
