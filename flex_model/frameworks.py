"""What each framework looks like, and the layout read off it.

One place knows the frameworks flex_model reads: fairscale and
megatron-core model-parallel state, FSDP2 (``fully_shard``) state and the
DTensor meshes of parameters, DDP and FSDP1 wrappers. Each reader turns one
framework's state into a ``Reading``: this rank's groups along the axes the
framework fixes, the whole ``ParallelLayout`` when it fixes all of it, and
its data-parallel gradient convention (mean or sum). ``choose_layout``
turns what the user passed (sizes, a mesh, a layout, or nothing) and the
readings into one layout and one gradient convention; ``check_layout``
makes sure that layout agrees with every reading. Mistakes are raised on
every rank alike, agreed through one ``any_rank`` before any group of ours
is created, so no rank is left waiting in a collective.
``uses_fsdp`` / ``fsdp1_roots`` tell FSDP apart.
"""
from __future__ import annotations

import dataclasses
import itertools
import sys
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch.distributed as dist
from torch import nn

from flex_model import collectives as C
from flex_model.layout import (AXES, FAIRSCALE_ORDER, MEGATRON_ORDER, UNSUPPORTED_DIMS, ParallelLayout,
                               mesh_dim_axes)

SIZE_ARGS = {"dp": "data_parallel_size", "pp": "pipeline_parallel_size", "tp": "tensor_parallel_size"}


def uses_fsdp(module: nn.Module) -> bool:
    """Whether FSDP1 (``FullyShardedDataParallel``) or FSDP2 (``fully_shard``) wraps part of ``module``."""
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    return any(isinstance(m, (FullyShardedDataParallel, FSDPModule)) for m in module.modules())


def fsdp1_roots(module: nn.Module) -> List[nn.Module]:
    """The FSDP1 wrappers in ``module``, outermost first."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    return [m for m in module.modules() if isinstance(m, FullyShardedDataParallel)]


@dataclass
class Reading:
    """What one framework's state says about the layout, on this rank.

    ``groups``: this rank's global ranks (sorted) along each axis the
    framework fixes; ``layout``: the whole layout, when the framework fixes
    all of it over the wrapped group; ``reduces_grads``: the framework
    reduces gradients over dp, ``grad_mean`` says whether it averages them
    (None with ``grad_note`` when it does neither plainly); ``note``: why no
    layout (shown when nothing else gives one)."""

    what: str
    groups: Dict[str, Tuple[int, ...]] = field(default_factory=dict)
    layout: Optional[ParallelLayout] = None
    reduces_grads: bool = False
    grad_mean: Optional[bool] = None
    grad_note: str = ""
    note: str = ""


# -- choosing the layout ----------------------------------------------------------------------------------------
def choose_layout(module: nn.Module, *, tp: int = 1, pp: int = 1, dp: int = 1,
                  group: Optional[dist.ProcessGroup] = None, mesh: Any = None,
                  mesh_axes: Optional[Dict[str, str]] = None, order: Optional[Sequence[str]] = None,
                  batch_dim: int = 0, layout: Optional[ParallelLayout] = None,
                  dp_grad_mean: Optional[bool] = None) -> Tuple[ParallelLayout, bool]:
    """``(layout, dp_grad_mean)`` from what was passed and what the frameworks say.

    A ready ``layout`` (copied), a ``mesh``, or sizes win, and must agree with the frameworks' state (a
    one-rank ``layout`` is taken as is: this rank runs alone);
    with nothing given the layout is read off it. ``order`` None: the framework's, else fairscale's.
    ``dp_grad_mean`` None: the framework's convention (DDP / FSDP1 / FSDP2 average unless FSDP2's
    gradient divide factor is 1), True if none reduces gradients. On a multi-rank job any mistake
    raises on every rank of ``group``."""
    multi = dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1
    if layout is not None and layout.is_single:  # this rank alone, as one process: nothing to agree on
        multi = False
    if not multi:
        if layout is not None:
            return dataclasses.replace(layout), True if dp_grad_mean is None else dp_grad_mean
        if mesh is not None:
            return (ParallelLayout.from_device_mesh(mesh, batch_dim=batch_dim, mesh_axes=mesh_axes),
                    True if dp_grad_mean is None else dp_grad_mean)
        if not (dist.is_available() and dist.is_initialized()):
            return (ParallelLayout.from_sizes(tp=tp, pp=pp, dp=dp, batch_dim=batch_dim),
                    True if dp_grad_mean is None else dp_grad_mean)
    error: Optional[BaseException] = None
    try:
        chosen, readings = _choose(module, tp=tp, pp=pp, dp=dp, group=group, mesh=mesh, mesh_axes=mesh_axes,
                                   order=order, batch_dim=batch_dim, layout=layout)
        if multi:
            problem = check_layout(chosen, readings, group)
            if problem:
                raise ValueError(problem)
        grad_mean = _grad_mean(chosen, readings, dp_grad_mean)
    except Exception as e:  # every rank must hear of it before anyone goes on to create groups
        if not multi:
            raise
        error = e
    if multi and C.any_rank(error is not None, group):
        if error is not None:
            raise error
        raise ValueError(f"rank {dist.get_rank()}: another rank found the layout wrong when wrapping the model "
                         "(its error says why); this rank's own reading raised nothing")
    return chosen, grad_mean


def _choose(module: nn.Module, *, tp: int, pp: int, dp: int, group: Optional[dist.ProcessGroup], mesh: Any,
            mesh_axes: Optional[Dict[str, str]], order: Optional[Sequence[str]], batch_dim: int,
            layout: Optional[ParallelLayout]) -> Tuple[ParallelLayout, List[Reading]]:
    ranks = dist.get_process_group_ranks(group or dist.group.WORLD)
    readings = read_frameworks(module, ranks, mesh_axes=mesh_axes, batch_dim=batch_dim)
    found = read_layout(readings)
    sizes = {"dp": dp, "pp": pp, "tp": tp}
    if layout is not None:
        return dataclasses.replace(layout), readings
    if mesh is not None:
        return _given_mesh_layout(mesh, ranks, mesh_axes, batch_dim), readings
    if any(s != 1 for s in sizes.values()):
        _check_sizes(sizes, found, readings)
        if found is not None and order is None:  # the sizes agree: the framework knows the rank order
            return dataclasses.replace(found, source=f"sizes given, {found.source}"), readings
        return ParallelLayout.from_sizes(**sizes, group=group, order=order or FAIRSCALE_ORDER,
                                         batch_dim=batch_dim), readings
    if found is not None:
        return found, readings
    if len(ranks) > 1:
        notes = "".join(f"; {r.note}" for r in readings if r.note)
        raise ValueError(f"the job has {len(ranks)} ranks but no parallel sizes were given and none could be "
                         f"read off the model{notes}; pass tensor_parallel_size / pipeline_parallel_size / "
                         "data_parallel_size (their product must be the group size) or device_mesh=")
    return ParallelLayout.from_sizes(group=group, batch_dim=batch_dim), readings


def read_layout(readings: Sequence[Reading]) -> Optional[ParallelLayout]:
    """The layout the frameworks fix (the first reading with a whole layout; the readings are in order
    meshes, megatron-core, fairscale, DDP / FSDP1), its ``source`` naming every reading; None if none."""
    whole = [r for r in readings if r.layout is not None]
    if not whole:
        return None
    what = " + ".join(r.what for r in readings if r.layout is not None or r.groups)
    return dataclasses.replace(whole[0].layout, source=f"read from {what}")


def check_layout(layout: ParallelLayout, readings: Sequence[Reading],
                 group: Optional[dist.ProcessGroup] = None) -> str:
    """This rank's problem with ``layout`` ("" if none): it must cover the wrapped group and put together
    the same ranks along each axis as every framework does (a wrong size or ``parallel_order`` would
    otherwise hang in a collective or mix up shards)."""
    ranks = sorted(dist.get_process_group_ranks(group or dist.group.WORLD))
    if sorted(layout.ranks) != ranks:
        return (f"rank {layout.rank}: the layout ({layout.describe()}) covers ranks {sorted(layout.ranks)}, but "
                f"the wrapped group is {ranks}; give a mesh, sizes or process_group= that cover the same ranks")
    for reading in readings:
        for axis, theirs in reading.groups.items():
            mine = tuple(sorted(layout.axis_ranks(axis)))
            if mine == theirs:
                continue
            if len(mine) != len(theirs):
                return (f"rank {layout.rank}: the layout ({layout.describe()}) has {axis}={len(mine)}, but "
                        f"{reading.what} has a {axis} group of {len(theirs)} ranks {list(theirs)}; leave the sizes "
                        f"out to read them off the model, or make {SIZE_ARGS[axis]} agree")
            fix = f"pass parallel_order={reading.layout.order} (outermost axis first), or " if reading.layout else ""
            return (f"rank {layout.rank}: the layout ({layout.describe()}) puts {axis} ranks {list(mine)} together, "
                    f"but {reading.what}'s {axis} group is {list(theirs)}; {fix}leave the sizes and parallel_order "
                    "out to read the layout off the model")
    return ""


def _check_sizes(sizes: Dict[str, int], found: Optional[ParallelLayout], readings: Sequence[Reading]) -> None:
    """Sizes given by hand must be those the frameworks say (every axis a framework fixes)."""
    known: Dict[str, Tuple[int, str]] = {}
    if found is not None:
        known = {a: (getattr(found, a), found.source) for a in AXES}
    for r in readings:
        for axis, ranks in r.groups.items():
            known.setdefault(axis, (len(ranks), f"read from {r.what}"))
    wrong = [a for a in AXES if a in known and known[a][0] != sizes[a]]
    if wrong:
        given = ", ".join(f"{SIZE_ARGS[a]}={sizes[a]}" for a in AXES)
        says = ", ".join(f"{a}={known[a][0]}" for a in AXES if a in known)
        raise ValueError(f"the sizes given ({given}) contradict the model's framework state ({says}; "
                         f"{known[wrong[0]][1]}); leave the sizes out to read them off the model, or make them agree")


def _grad_mean(layout: ParallelLayout, readings: Sequence[Reading], given: Optional[bool]) -> bool:
    """The data-parallel gradient convention: ``given``, else the frameworks' (they must agree)."""
    if given is not None:
        return bool(given)
    reducers = [r for r in readings if r.reduces_grads]
    if layout.dp == 1 or not reducers:
        return True
    unclear = [r for r in reducers if r.grad_mean is None]
    if unclear:
        raise ValueError(f"{unclear[0].grad_note}; pass dp_grad_mean=True (backward hooks see the gradient of "
                         "the mean of the ranks' losses) or dp_grad_mean=False (of their sum)")
    conventions = {r.grad_mean for r in reducers}
    if len(conventions) > 1:
        says = ", ".join(f"{r.what}: {'mean' if r.grad_mean else 'sum'}" for r in reducers)
        raise ValueError(f"the frameworks reduce data-parallel gradients differently ({says}); pass dp_grad_mean=")
    return conventions.pop()


# -- reading the frameworks --------------------------------------------------------------------------------------
def read_frameworks(module: nn.Module, ranks: Sequence[int], *, mesh_axes: Optional[Dict[str, str]] = None,
                    batch_dim: int = 0) -> List[Reading]:
    """Every framework's reading of ``module`` and the process state, in order: FSDP2 / DTensor meshes,
    megatron-core, fairscale, DDP, FSDP1. ``ranks``: the wrapped group's global ranks. Local: no
    collective; raises (the same on every rank) on a state flex_model cannot place."""
    rank = dist.get_rank()
    world = tuple(range(dist.get_world_size()))
    out: List[Reading] = list(_read_meshes(module, ranks, rank, mesh_axes, batch_dim))
    for reader in (_read_megatron, _read_fairscale):
        reading = reader(world, rank, batch_dim)
        if reading is not None:
            out.append(reading)
    out.extend(_read_data_parallel(module, ranks, rank, batch_dim))
    return out


def _fairscale_state() -> Any:
    """fairscale's ``initialize`` module when its model parallel state is set up (only if fairscale was
    imported: its state cannot be set up otherwise), else None."""
    fs = sys.modules.get("fairscale.nn.model_parallel.initialize")
    return fs if fs is not None and fs.model_parallel_is_initialized() else None


def _megatron_state() -> Any:
    """megatron-core's ``parallel_state`` when initialized (only if megatron was imported), else None."""
    ps = sys.modules.get("megatron.core.parallel_state")
    return ps if ps is not None and ps.model_parallel_is_initialized() else None


def _read_fairscale(world: Tuple[int, ...], rank: int, batch_dim: int) -> Optional[Reading]:
    fs = _fairscale_state()
    if fs is None:
        return None
    groups = {"tp": fs.get_model_parallel_group(), "pp": fs.get_pipeline_parallel_group(),
              "dp": fs.get_data_parallel_group()}
    return _grid_reading("fairscale model parallel state", groups, world, rank, FAIRSCALE_ORDER, batch_dim)


def _read_megatron(world: Tuple[int, ...], rank: int, batch_dim: int) -> Optional[Reading]:
    ps = _megatron_state()
    if ps is None:
        return None
    cp = ps.get_context_parallel_world_size()
    if cp > 1:
        raise ValueError(f"megatron-core is set up with context_parallel_size={cp}: {UNSUPPORTED_DIMS['cp']}; "
                         "flex_model reads tensor, pipeline and data parallel state only")
    groups = {"tp": ps.get_tensor_model_parallel_group(), "dp": ps.get_data_parallel_group()}
    pp = ps.get_pipeline_model_parallel_group()
    if not isinstance(pp, (list, tuple)):  # a list with encoder/decoder pipelines: left to the check by sizes
        groups["pp"] = pp
    return _grid_reading("megatron-core parallel_state", groups, world, rank, MEGATRON_ORDER, batch_dim)


def _grid_reading(what: str, groups: Dict[str, Any], world: Tuple[int, ...], rank: int,
                  preferred: Sequence[str], batch_dim: int) -> Reading:
    """A framework whose groups split the world into a dp × pp × tp grid: the layout in the rank order
    (``preferred`` first, then any other) that groups this rank as the framework does."""
    mine = {a: tuple(sorted(dist.get_process_group_ranks(g))) for a, g in groups.items()}
    sizes = {a: len(r) for a, r in mine.items()}
    sizes.setdefault("pp", len(world) // (sizes["tp"] * sizes["dp"]))
    candidates = [tuple(preferred)] + [o for o in itertools.permutations(AXES) if o != tuple(preferred)]
    layouts = [ParallelLayout(dp=sizes["dp"], pp=sizes["pp"], tp=sizes["tp"], order=o, ranks=world, rank=rank,
                              batch_dim=batch_dim, source=f"read from {what}") for o in candidates]
    match = [lay for lay in layouts if all(tuple(sorted(lay.axis_ranks(a))) == r for a, r in mine.items())]
    return Reading(what, mine, (match or layouts)[0])  # no match: the check says which group differs


def _read_meshes(module: nn.Module, ranks: Sequence[int], rank: int, mesh_axes: Optional[Dict[str, str]],
                 batch_dim: int) -> Iterator[Reading]:
    """FSDP2's meshes (its data-parallel mesh, with the DTensor mesh of tensor-parallel parameters) and the
    meshes of other DTensor parameters: one reading per distinct layout."""
    seen: Dict[Tuple, Reading] = {}
    managed: set = set()
    for mesh, axes, what, grad in _fsdp2_meshes(module, managed, mesh_axes):
        key = (tuple(mesh.mesh.flatten().tolist()), tuple(mesh.mesh.shape), tuple(axes))
        if key in seen:
            _merge_grad(seen[key], grad)
            continue
        reading = _mesh_reading(mesh, axes, what, ranks, rank, mesh_axes, batch_dim)
        reading.reduces_grads, (reading.grad_mean, reading.grad_note) = True, grad
        seen[key] = reading
    from torch.distributed.tensor import DTensor

    for p in module.parameters():
        if not isinstance(p, DTensor) or id(p) in managed:
            continue
        mesh = p.device_mesh
        names = mesh.mesh_dim_names
        if not names:
            key = ("unnamed", tuple(mesh.mesh.flatten().tolist()))
            seen.setdefault(key, Reading(f"DTensor mesh {tuple(mesh.mesh.shape)}", note=(
                "the DTensor parameters' mesh has no dim names, so flex_model cannot tell what it splits (name "
                "them, e.g. mesh_dim_names=('tp',))")))
            continue
        axes = mesh_dim_axes(names, tuple(mesh.mesh.shape), mesh_axes)
        key = (tuple(mesh.mesh.flatten().tolist()), tuple(mesh.mesh.shape), tuple(axes))
        if key not in seen:
            seen[key] = _mesh_reading(mesh, axes, f"DTensor mesh {tuple(names)}", ranks, rank, mesh_axes, batch_dim)
    yield from seen.values()


def _merge_grad(reading: Reading, grad: Tuple[Optional[bool], str]) -> None:
    if grad != (reading.grad_mean, reading.grad_note):
        reading.grad_mean = None
        reading.grad_note = (f"FSDP2 modules on {reading.what} reduce gradients differently "
                             f"({reading.grad_note or reading.grad_mean} and {grad[1] or grad[0]})")


def _fsdp2_meshes(module: nn.Module, managed: set, mesh_axes: Optional[Dict[str, str]],
                  ) -> Iterator[Tuple[Any, List[Optional[str]], str, Tuple[Optional[bool], str]]]:
    """``(mesh, axes of its dims, what, (grad_mean, note))`` for each parameter FSDP2 manages (adding its
    registered tensors' ids to ``managed``). The mesh is the one its sharded parameter lives on: FSDP2's
    data-parallel mesh (1-D; 2-D replicate × shard for HSDP), concatenated with the parameter's own
    DTensor mesh when it was tensor parallel before ``fully_shard``."""
    from torch.distributed.fsdp import FSDPModule

    for m in module.modules():
        if not isinstance(m, FSDPModule):
            continue
        try:
            state = m._get_fsdp_state()
            param_groups = list(getattr(state, "_fsdp_param_groups", None) or
                                [g for g in [getattr(state, "_fsdp_param_group", None)] if g is not None])
            for pg in param_groups:
                for fp in pg.fsdp_params:
                    for attr in ("sharded_param", "_unsharded_param"):
                        if getattr(fp, attr, None) is not None:
                            managed.add(id(getattr(fp, attr)))
                    yield _fsdp2_param_mesh(pg, fp, mesh_axes)
        except AttributeError as e:
            raise ValueError(f"cannot read the FSDP2 state of {type(m).__name__} in this torch version ({e}); "
                             "pass device_mesh= or the sizes") from e


def _fsdp2_param_mesh(pg: Any, fp: Any, mesh_axes: Optional[Dict[str, str]]):
    info = fp.mesh_info
    dp_mesh = info.mesh
    dp_names = tuple(dp_mesh.mesh_dim_names or ())
    spmd = getattr(fp, "_spmd_mesh", None)
    spmd = dp_mesh if spmd is None else spmd
    dims = getattr(info, "dp_mesh_dims", None)
    dp_label = dp_names if dp_names else f"(unnamed, {dp_mesh.size()} ranks)"
    if dims is not None:  # fully_shard(mesh, dp_mesh_dims=...): one mesh, its data-parallel dims named
        data = set(dims.shard_names) | set(dims.replicate_names)
        names = tuple(spmd.mesh_dim_names)
        axes = ["dp" if n in data else mesh_dim_axes([n], [int(k)], mesh_axes)[0]
                for n, k in zip(names, spmd.mesh.shape)]
        what = f"FSDP2 mesh {names} (data parallel {tuple(n for n in names if n in data)})"
    elif spmd is not dp_mesh:  # tensor parallel, then fully_shard: FSDP2's mesh + the DTensor mesh
        tp_mesh = fp._unsharded_dtensor_spec.mesh
        tp_names = tuple(tp_mesh.mesh_dim_names or ())
        if len(tp_names) != tp_mesh.ndim:
            raise ValueError("the DTensor mesh of the tensor-parallel parameters under FSDP2 has no dim names; "
                             "name them, e.g. mesh_dim_names=('tp',)")
        axes = ["dp"] * dp_mesh.ndim + mesh_dim_axes(tp_names, tuple(tp_mesh.mesh.shape), mesh_axes)
        what = f"FSDP2 mesh {dp_label} + DTensor mesh {tp_names}"
    else:
        axes = ["dp"] * dp_mesh.ndim
        what = f"FSDP2 mesh {dp_label}"
    return spmd, axes, what, _fsdp2_grad_mean(pg, dp_mesh.size())


def _fsdp2_grad_mean(pg: Any, dp: int) -> Tuple[Optional[bool], str]:
    """FSDP2 averages gradients over dp unless ``set_gradient_divide_factor`` changed the divisor: 1 makes
    it a sum (what torchtitan does, normalising the loss itself); the dp size is the mean again.
    (``set_force_sum_reduction_for_comms`` changes only the collective's op, not the result.)"""
    factor = getattr(pg, "gradient_divide_factor", None)
    if factor is None or abs(float(factor) - dp) < 1e-9:
        return True, ""
    if abs(float(factor) - 1.0) < 1e-9:
        return False, ""
    return None, (f"FSDP2 divides gradients by {factor} (set_gradient_divide_factor), neither 1 (a sum over "
                  f"the {dp} data-parallel ranks) nor {dp} (their mean)")


def _mesh_reading(mesh: Any, axes: Sequence[Optional[str]], what: str, ranks: Sequence[int], rank: int,
                  mesh_axes: Optional[Dict[str, str]], batch_dim: int) -> Reading:
    """The reading of a mesh: its axes' groups, and the whole layout when it covers the wrapped group —
    itself, or the root mesh it was sliced from (e.g. ``mesh["tp"]`` of a ("dp", "tp") mesh)."""
    _refuse_context_parallel(mesh)
    lay = ParallelLayout.from_mesh(mesh.mesh, axes, rank=rank, batch_dim=batch_dim, source=f"read from {what}")
    groups = {a: tuple(sorted(lay.axis_ranks(a))) for a in AXES if a in axes}
    if sorted(lay.ranks) == sorted(ranks):
        return Reading(what, groups, lay)
    root = _root_over(mesh, ranks)
    if root is not None:
        what = f"{what} within {root.mesh_dim_names}"
        whole = ParallelLayout.from_device_mesh(root, batch_dim=batch_dim, mesh_axes=mesh_axes,
                                                source=f"read from {what}")
        return Reading(what, groups, whole)
    return Reading(what, groups, note=(f"{what} covers {len(lay.ranks)} of the {len(ranks)} ranks; pass the sizes "
                                       "of the other axes too, or device_mesh= the mesh over all ranks"))


def _given_mesh_layout(mesh: Any, ranks: Sequence[int], mesh_axes: Optional[Dict[str, str]],
                       batch_dim: int) -> ParallelLayout:
    """The layout of the ``device_mesh`` given: the mesh's own if it covers the wrapped group, else that of
    the root mesh it was sliced from (``mesh["tp"]`` of a ("dp", "tp") mesh) if that one does."""
    lay = ParallelLayout.from_device_mesh(mesh, batch_dim=batch_dim, mesh_axes=mesh_axes)
    if sorted(lay.ranks) == sorted(ranks):
        return lay
    root = _root_over(mesh, ranks)
    if root is None:
        raise ValueError(f"the device_mesh {tuple(mesh.mesh_dim_names or ())} covers ranks {sorted(lay.ranks)}, "
                         f"but the wrapped group is {sorted(ranks)}; pass the mesh over the whole group (e.g. the "
                         "2-D mesh, not mesh['tp'])")
    return ParallelLayout.from_device_mesh(root, batch_dim=batch_dim, mesh_axes=mesh_axes,
                                           source=f"{lay.source} within {root.mesh_dim_names}")


def _root_over(mesh: Any, ranks: Sequence[int]) -> Any:
    """The named root mesh ``mesh`` was sliced from, when it covers exactly ``ranks``; else None."""
    root = mesh._get_root_mesh() if hasattr(mesh, "_get_root_mesh") else None
    if root is None or root is mesh or sorted(root.mesh.flatten().tolist()) != sorted(ranks):
        return None
    if len(root.mesh_dim_names or ()) != root.ndim:
        return None
    _refuse_context_parallel(root)
    return root


def _refuse_context_parallel(mesh: Any) -> None:
    """A (root) mesh with a context-parallel dim of size > 1: its flattenings (torchtitan's
    ``dp_shard_cp``, ``dp_cp``) would pass for data parallel, but they split the sequence."""
    root = mesh._get_root_mesh() if hasattr(mesh, "_get_root_mesh") else mesh
    names = tuple(root.mesh_dim_names or ())
    for name, size in zip(names, root.mesh.shape):
        if name == "cp" and size > 1:
            raise ValueError(f"the mesh {names} has a context-parallel dim 'cp' of size {int(size)}: "
                             f"{UNSUPPORTED_DIMS['cp']}")


def _read_data_parallel(module: nn.Module, ranks: Sequence[int], rank: int, batch_dim: int) -> Iterator[Reading]:
    """DDP and FSDP1 (the outermost wrapper of each): data parallel over their process group, gradients
    averaged (DDP and FSDP1 divide by the group size)."""
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.nn.parallel import DistributedDataParallel

    for kind, cls in (("DDP", DistributedDataParallel), ("FSDP1", FullyShardedDataParallel)):
        wrappers = [m for m in module.modules() if isinstance(m, cls)]
        if not wrappers:
            continue
        m = wrappers[0]
        dp_ranks = dist.get_process_group_ranks(m.process_group)
        what = f"{kind}: data parallel over {len(dp_ranks)} ranks"
        groups = {"dp": tuple(sorted(dp_ranks))}
        inter = getattr(m, "_inter_node_pg", None)
        if kind == "FSDP1" and inter is not None and "HYBRID" in str(getattr(m, "sharding_strategy", "")):
            # HSDP: sharded within process_group, replicated across _inter_node_pg; this rank sees only its
            # own two groups, so the data-parallel ranks are known only when they are the whole group.
            n = len(dp_ranks) * dist.get_world_size(inter)
            what, groups = f"FSDP1 hybrid shard: data parallel over {n} ranks", {}
            dp_ranks = list(ranks) if n == len(ranks) else dp_ranks
        layout = None
        if sorted(dp_ranks) == sorted(ranks):
            layout = ParallelLayout(dp=len(ranks), ranks=tuple(ranks), rank=rank, batch_dim=batch_dim,
                                    source=f"read from {what}")
        yield Reading(what, groups, layout, reduces_grads=True, grad_mean=True)
