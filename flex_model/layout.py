"""The parallel layout: which ranks form the data, pipeline and tensor axes, and their groups.

One ``ParallelLayout`` per wrapper owns everything about the layout: the
sizes, the rank order, this rank's coordinates, and the process groups
flex_model creates for it (``build_groups``, collective, once; released by
``release_groups``, which ``FlexModel.restore()`` calls). It is built (and
validated) when a model is wrapped and passed to everything that needs it;
nothing reads a global. Rank order is data, not an assumption: fairscale
orders the axes ``("dp", "pp", "tp")`` (outermost first), Megatron-LM
``("pp", "dp", "tp")``; a ``DeviceMesh`` says its own order through its dim
names. How a layout is read off a framework lives in ``flex_model.frameworks``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from typing import Dict, List, Optional, Sequence, Tuple

import torch.distributed as dist

AXES = ("dp", "pp", "tp")
FAIRSCALE_ORDER = ("dp", "pp", "tp")
MEGATRON_ORDER = ("pp", "dp", "tp")

# What DeviceMesh dim names mean. Data parallel: every name a framework gives a data-parallel dim
# (torchtitan: dp_replicate / dp_shard and their flattenings; FSDP2 / HSDP examples: replicate / shard / fsdp).
DATA_DIMS = frozenset({"dp", "data", "data_parallel", "ddp", "fsdp", "hsdp", "replicate", "shard", "dp_replicate",
                       "dp_shard", "dp_shard_cp", "dp_cp", "batch"})
TENSOR_DIMS = frozenset({"tp", "tensor", "tensor_parallel"})
PIPELINE_DIMS = frozenset({"pp", "pipeline", "pipeline_parallel"})
# Dims flex_model knows and cannot place: why, for the error.
UNSUPPORTED_DIMS = {
    "cp": "context parallel splits the sequence across ranks, which flex_model does not gather",
    "ep": "expert parallel puts different experts on different ranks, which flex_model does not gather",
    "etp": "expert tensor parallel splits experts, which flex_model does not gather",
}


def mesh_dim_axes(names: Sequence[Optional[str]], sizes: Sequence[int],
                  mesh_axes: Optional[Dict[str, str]] = None) -> List[Optional[str]]:
    """The axis (``"dp"``, ``"tp"``, ``"pp"``) of each mesh dim, by its name or as ``mesh_axes`` says;
    None for a dim of size 1 whose name means nothing here. Raises, naming the dim, on any other."""
    mesh_axes = dict(mesh_axes or {})
    bad = {k: v for k, v in mesh_axes.items() if v not in AXES}
    if bad:
        raise ValueError(f"mesh_axes maps mesh dim names to 'dp', 'tp' or 'pp'; got {bad}")
    out: List[Optional[str]] = []
    for name, size in zip(names, sizes):
        if name in mesh_axes:
            out.append(mesh_axes[name])
        elif name in DATA_DIMS:
            out.append("dp")
        elif name in TENSOR_DIMS:
            out.append("tp")
        elif name in PIPELINE_DIMS:
            out.append("pp")
        elif size == 1:
            out.append(None)  # a trivial dim splits nothing
        else:
            why = UNSUPPORTED_DIMS.get(name, "the name is not one flex_model knows (data parallel: "
                                       f"{', '.join(sorted(DATA_DIMS))}; tensor parallel: "
                                       f"{', '.join(sorted(TENSOR_DIMS))}; pipeline: {', '.join(sorted(PIPELINE_DIMS))})")
            raise ValueError(
                f"cannot place mesh dim {name!r} (size {size}) of the mesh {tuple(names)}: {why}. If the dim is "
                f"data, tensor or pipeline parallel for this model, say so: mesh_axes={{{name!r}: 'dp'}} (or "
                "'tp', 'pp'), given to FlexModel(..., mesh_axes=...)")
    return out


@dataclass
class CommStats:
    """What this rank's firings moved over one group: counted by ``collectives``, read (and reset) by
    ``FlexModel.comm_stats()``."""

    collectives: int = 0
    sent_bytes: int = 0
    recv_bytes: int = 0

    def count(self, sent: int, received: int) -> None:
        self.collectives += 1
        self.sent_bytes += sent
        self.recv_bytes += received


@dataclass(frozen=True)
class Stage:
    """The ranks of one pipeline stage (or, in replica scope, of one replica's tensor-parallel ranks),
    ordered by (dp, tp), and their process group; index 0 is the root."""

    group: dist.ProcessGroup
    ranks: Tuple[int, ...]
    dp: int
    tp: int
    me: int  # this rank's index in ``ranks``
    stats: CommStats = field(default_factory=CommStats, compare=False, repr=False)

    @property
    def is_root(self) -> bool:
        return self.me == 0

    def coords(self, index: int) -> Tuple[int, int]:
        """``(dp, tp)`` coordinates of the rank at ``index``."""
        return divmod(index, self.tp)


@dataclass
class ParallelLayout:
    """Sizes and rank order of the dp/pp/tp axes over the wrapped group, and the groups made for it.

    ``ranks`` are the global ranks of the wrapped group in group order;
    ``rank`` is this process's global rank; ``batch_dim`` is the dim along
    which data parallelism splits activations; ``source`` says where the
    layout came from (shown by ``FlexModel.describe()``). After
    ``build_groups()``, ``stage`` is this rank's pipeline stage (None when
    the stage is one rank) and ``roots`` the group of the stages' roots.
    """

    dp: int = 1
    pp: int = 1
    tp: int = 1
    order: Tuple[str, ...] = FAIRSCALE_ORDER
    ranks: Tuple[int, ...] = (0,)
    rank: int = 0
    batch_dim: int = 0
    source: str = field(default="sizes given", compare=False)
    stage: Optional[Stage] = field(default=None, init=False, compare=False, repr=False)
    roots: Optional[dist.ProcessGroup] = field(default=None, init=False, compare=False, repr=False)
    replica: Optional[Stage] = field(default=None, init=False, compare=False, repr=False)
    replica_roots: Optional[dist.ProcessGroup] = field(default=None, init=False, compare=False, repr=False)
    _replicas_built: bool = field(default=False, init=False, compare=False, repr=False)
    _created: List[dist.ProcessGroup] = field(default_factory=list, init=False, compare=False, repr=False)
    _built: bool = field(default=False, init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        for axis in AXES:
            size = getattr(self, axis)
            if not isinstance(size, int) or size < 1:
                raise ValueError(f"{axis} size must be a positive int, got {size!r}")
        self.order, self.ranks = tuple(self.order), tuple(self.ranks)
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
        return cls(source="one process")

    @classmethod
    def from_sizes(cls, *, tp: int = 1, pp: int = 1, dp: int = 1, group: Optional[dist.ProcessGroup] = None,
                   order: Sequence[str] = FAIRSCALE_ORDER, batch_dim: int = 0,
                   source: str = "sizes given") -> "ParallelLayout":
        """The layout of ``group`` (default: the world), split into the given sizes."""
        if not dist.is_available() or not dist.is_initialized():
            if tp * pp * dp != 1:
                raise ValueError(f"sizes tp={tp} pp={pp} dp={dp} need torch.distributed: call "
                                 "torch.distributed.init_process_group (torchrun does it) before wrapping")
            return cls(batch_dim=batch_dim, source="one process")
        ranks = tuple(dist.get_process_group_ranks(group or dist.group.WORLD))
        return cls(dp=dp, pp=pp, tp=tp, order=tuple(order), ranks=ranks, rank=dist.get_rank(),
                   batch_dim=batch_dim, source=source)

    @classmethod
    def from_device_mesh(cls, mesh, batch_dim: int = 0, mesh_axes: Optional[Dict[str, str]] = None, *,
                         rank: Optional[int] = None, source: Optional[str] = None) -> "ParallelLayout":
        """The layout of a ``DeviceMesh``: each dim is data parallel (``dp``, ``fsdp``, ``dp_shard``,
        ``replicate``, ... see ``DATA_DIMS``), ``tp`` or ``pp`` by its name, or as ``mesh_axes`` maps it
        (``{"fsdp": "dp"}``); several dims of one axis merge into it (a 2-D replicate × shard mesh is one
        dp, outer dim first). An unnamed dim, or a named one of unknown meaning and size > 1, is an error
        naming it."""
        names = tuple(mesh.mesh_dim_names or ())
        if len(names) != mesh.ndim:
            raise ValueError(f"the DeviceMesh of shape {tuple(mesh.mesh.shape)} has no mesh_dim_names, so "
                             "flex_model cannot tell its data, tensor and pipeline parallel dims apart; name "
                             "them, e.g. init_device_mesh('cpu', (2, 2), mesh_dim_names=('dp', 'tp')), or pass "
                             "the sizes (data_parallel_size=..., tensor_parallel_size=...)")
        axes = mesh_dim_axes(names, tuple(mesh.mesh.shape), mesh_axes)
        return cls.from_mesh(mesh.mesh, axes, rank=rank, batch_dim=batch_dim,
                             source=source or f"DeviceMesh {names}")

    @classmethod
    def from_mesh(cls, ranks, axes: Sequence[Optional[str]], *, rank: Optional[int] = None, batch_dim: int = 0,
                  source: str = "DeviceMesh") -> "ParallelLayout":
        """The layout of a rank tensor (``DeviceMesh.mesh``) whose dim ``i`` belongs to axis ``axes[i]``
        (``"dp"``, ``"pp"``, ``"tp"``; None for a dim of size 1 that means nothing here).

        Dims of one axis merge into it, outer dim first. When they are not adjacent (e.g.
        ``("dp_replicate", "tp", "dp_shard")``) the rank tensor is transposed so they are: the axes
        keep the order of their first dims, which is the layout's ``order``."""
        import torch

        ranks = torch.as_tensor(ranks)
        axes = tuple(axes)
        if len(axes) != ranks.ndim:
            raise ValueError(f"{len(axes)} axes {axes} for a mesh of {ranks.ndim} dims")
        for i, axis in enumerate(axes):
            if axis is None and ranks.shape[i] != 1:
                raise ValueError(f"mesh dim {i} of size {ranks.shape[i]} has no axis")
            if axis is not None and axis not in AXES:
                raise ValueError(f"mesh dim {i}: axis {axis!r} is not among {AXES}")
        order = tuple(dict.fromkeys(a for a in axes if a is not None))
        perm = [i for axis in order for i in range(len(axes)) if axes[i] == axis]
        perm += [i for i in range(len(axes)) if axes[i] is None]
        sizes = {axis: 1 for axis in AXES}
        for i, axis in enumerate(axes):
            if axis is not None:
                sizes[axis] *= int(ranks.shape[i])
        flat = tuple(int(r) for r in ranks.permute(perm).flatten().tolist())
        order += tuple(a for a in AXES if a not in order)
        if rank is None:
            rank = dist.get_rank()
        return cls(dp=sizes["dp"], pp=sizes["pp"], tp=sizes["tp"], order=order, ranks=flat, rank=rank,
                   batch_dim=batch_dim, source=source)

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

    def axis_ranks(self, axis: str) -> List[int]:
        """Global ranks of this rank's group along ``axis`` (the others fixed at this rank's coordinates)."""
        me = self.my
        return [self.global_rank(**{**me, axis: i}) for i in range(getattr(self, axis))]

    @property
    def root_ranks(self) -> List[int]:
        """The root (dp 0, tp 0) of every pipeline stage, in stage order."""
        return [self.global_rank(0, p, 0) for p in range(self.pp)]

    @property
    def replica_root_ranks(self) -> List[int]:
        """The root (tp 0) of every pipeline stage of this rank's data-parallel replica, in stage order."""
        return [self.global_rank(self.my["dp"], p, 0) for p in range(self.pp)]

    @property
    def replica_owner(self) -> int:
        """Where this replica's captures live in replica scope: its rank (pp 0, tp 0)."""
        return self.global_rank(self.my["dp"], 0, 0)

    @property
    def my(self) -> Dict[str, int]:
        return self.coords(self.rank)

    @property
    def owner(self) -> int:
        """The global rank where ``output_dict`` lives: rank (dp 0, pp 0, tp 0)."""
        return self.global_rank(0, 0, 0)

    def describe(self) -> str:
        """E.g. ``dp=2 pp=1 tp=2 order ('dp', 'pp', 'tp') (sizes given)``; the order only when it matters."""
        order = f" order {self.order}" if sum(getattr(self, a) > 1 for a in AXES) > 1 else ""
        return f"dp={self.dp} pp={self.pp} tp={self.tp}{order} ({self.source})"

    # -- process groups -------------------------------------------------------
    def build_groups(self) -> "ParallelLayout":
        """Create the stage and stage-root groups (collective: every rank of the default group calls it
        at the same point, as ``new_group`` needs); a second call does nothing."""
        if self._built or self.is_single:
            return self
        me = self.my
        stages = [self._new_group(self.stage_ranks(p)) for p in range(self.pp)]
        ranks = tuple(self.stage_ranks(me["pp"]))
        if stages[me["pp"]] is not None:
            self.stage = Stage(stages[me["pp"]], ranks, self.dp, self.tp, ranks.index(self.rank))
        self.roots = self._new_group(self.root_ranks)
        self._built = True
        return self

    def build_replica_groups(self) -> "ParallelLayout":
        """Create the groups of replica scope (collective, like ``build_groups``; once): ``replica``, this
        rank's tensor-parallel ranks in its stage and data-parallel replica (None when tp is 1), and
        ``replica_roots``, the stage roots of this replica (None when pp is 1)."""
        if self._replicas_built or self.is_single:
            return self
        me = self.my
        for d in range(self.dp):
            for p in range(self.pp):
                ranks = [self.global_rank(d, p, t) for t in range(self.tp)]
                group = self._new_group(ranks)
                if group is not None:
                    self.replica = Stage(group, tuple(ranks), 1, self.tp, ranks.index(self.rank))
        for d in range(self.dp):
            group = self._new_group([self.global_rank(d, p, 0) for p in range(self.pp)])
            if group is not None and d == me["dp"]:
                self.replica_roots = group
        self._replicas_built = True
        return self

    def _new_group(self, ranks: List[int]) -> Optional[dist.ProcessGroup]:
        if len(ranks) == 1:
            return None
        # Every rank of the default group calls this, members or not; the group waits as long as the job's.
        group = dist.new_group(ranks, timeout=_job_timeout())
        if self.rank not in ranks:
            return None
        self._created.append(group)
        return group

    def release_groups(self) -> None:
        """Destroy the groups ``build_groups`` created (idempotent)."""
        for group in self._created:
            dist.destroy_process_group(group)
        self._created.clear()
        self.stage = self.roots = self.replica = self.replica_roots = None


def _job_timeout() -> Optional["timedelta"]:
    """The timeout the job gave ``init_process_group`` (read off the default group's backend), so that a
    hung peer fails our groups' collectives as soon as the job's own; None (torch's default) if unknown."""
    import torch

    group = dist.group.WORLD
    for device in ("cpu", "cuda"):
        try:
            return group._get_backend(torch.device(device)).options._timeout
        except (AttributeError, RuntimeError, ValueError):
            continue
    return None
