"""Where the pieces of a hooked tensor live, read off the model.

A ``Placement`` says along which dim the tensor is split over the tensor
parallel axis (``tp_dim``) and over the data parallel axis (``dp_dim``);
``None`` means replicated. It is inferred from what the model says:
DTensor placements; fairscale / megatron-core ``ColumnParallelLinear``
(``gather_output=False``: output split on the last dim) and
``RowParallelLinear`` (``input_is_parallel=True``: input split on the last
dim); DTensor-sharded ``nn.Linear`` weights (colwise / rowwise); the
parameter partition dims of TP layers; and the layout's batch dim for data
parallel activations. A user's ``expected_shape`` overrides the TP dim and is
validated against the local shape. ``LocalValue`` is what the hook sees.
The rule for gradients under data parallelism is here too, once:
``gradient_placement`` and ``dp_grad_divisor``.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Literal, Optional, Sequence, Tuple

import torch
from torch import nn

from flex_model.layout import ParallelLayout

# Parameter partition dims of tensor-parallel layers that do not tag their
# parameters (megatron-core sets ``param.partition_dim`` itself).
PARAM_TP_DIMS = {
    "ColumnParallelLinear": {"weight": 0, "bias": 0},
    "RowParallelLinear": {"weight": 1},
    "VocabParallelEmbedding": {"weight": 0},
    "ParallelEmbedding": {"weight": 1},
}


@dataclass(frozen=True)
class Placement:
    """How a full tensor is split over one pipeline stage's dp × tp ranks.

    ``tp_dim``/``dp_dim``: the dim split over that axis, None if replicated.
    ``dp_mean``: the full value is the mean of the dp ranks' values (local
    parameter gradients before data-parallel averaging).
    """

    tp_dim: Optional[int] = None
    dp_dim: Optional[int] = None
    dp_mean: bool = False


Side = Literal["input", "output", "param"]


@dataclass(frozen=True)
class LocalValue:
    """What one firing sees on this rank: the local tensor and where it comes from.

    ``side``: the module's "input", "output" or a parameter ("param", named
    ``param_name``); ``is_grad``: a gradient of that value. ``from_dtensor``:
    the tensor is a DTensor's local shard, whose placement (``dtensor_tp_dim``,
    None when replicated) wins over what the module says.
    """

    hook_name: str
    module: nn.Module
    side: Side
    tensor: torch.Tensor
    is_grad: bool = False
    param_name: str = ""
    from_dtensor: bool = False
    dtensor_tp_dim: Optional[int] = None


def gradient_placement(placement: Placement, dp: int) -> Placement:
    """The placement of a gradient of a value placed as ``placement``: a value every dp rank holds
    whole gets a part of its gradient from each rank, and the full gradient is their mean (DDP/FSDP)."""
    if dp > 1 and placement.dp_dim is None:
        return replace(placement, dp_mean=True)
    return placement


def dp_grad_divisor(placement: Placement, dp: int, grad_mean: bool) -> int:
    """How much larger a gradient assembled from dp batch slices is than the framework's gradient.

    Each rank's gradient comes from its own loss; concatenated over the batch
    slices they are the gradient of the SUM of the dp ranks' losses. Under
    the mean convention (DDP/FSDP: ``grad_mean``) the framework's gradient is
    that of their mean: divide by dp. Else (or when not batch-split) 1."""
    return dp if grad_mean and placement.dp_dim is not None else 1


def is_dtensor(x: object) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(x, DTensor)


def module_tp_dims(module: nn.Module) -> dict:
    """``{"output": dim}`` / ``{"input": dim}`` for a tensor-parallel layer, else ``{}``."""
    name = type(module).__name__
    if name == "ColumnParallelLinear" and getattr(module, "gather_output", True) is False:
        return {"output": -1}
    if name == "RowParallelLinear" and getattr(module, "input_is_parallel", False):
        return {"input": -1}
    weight = getattr(module, "weight", None)
    if isinstance(module, nn.Linear) and is_dtensor(weight):
        shard_dims = [p.dim for p in weight.placements if p.is_shard()]
        if shard_dims == [0]:
            return {"output": -1}  # colwise: local output holds a slice of out_features
        if shard_dims == [1]:
            return {"input": -1}  # rowwise: local input holds a slice of in_features
    return {}


def param_tp_dim(module: nn.Module, param_name: str, param: torch.Tensor) -> Optional[int]:
    if getattr(param, "tensor_model_parallel", False) and hasattr(param, "partition_dim"):
        return int(param.partition_dim)
    return PARAM_TP_DIMS.get(type(module).__name__, {}).get(param_name)


def to_local(x: torch.Tensor) -> Tuple[torch.Tensor, Optional[int], Callable[[torch.Tensor], torch.Tensor]]:
    """``(local_tensor, tp_dim or None, rewrap)`` for a plain tensor, DTensor or AsyncCollectiveTensor.

    For a DTensor the tp dim comes from its placement (a Partial value is
    reduced first) and ``rewrap`` turns an edited local tensor back into a
    DTensor of the same placement; all steps are autograd-aware.
    """
    from torch.distributed._functional_collectives import AsyncCollectiveTensor, wait_tensor

    if isinstance(x, AsyncCollectiveTensor):
        x = wait_tensor(x)
    if not is_dtensor(x):
        return x, None, lambda y: y
    from torch.distributed.tensor import DTensor, Replicate

    if x.device_mesh.ndim != 1:
        raise ValueError(f"DTensor values on a {x.device_mesh.ndim}-D mesh are not supported; hook a module "
                         "whose value lives on a 1-D tensor-parallel mesh")
    if x.placements[0].is_partial():
        x = x.redistribute(placements=[Replicate()])
    tp_dim = x.placements[0].dim % x.ndim if x.placements[0].is_shard() else None
    mesh, placements, shape, stride = x.device_mesh, x.placements, x.shape, x.stride()
    rewrap = lambda y: DTensor.from_local(y, mesh, placements, run_check=False, shape=shape, stride=stride)  # noqa: E731
    return x.to_local(), tp_dim, rewrap


def infer_placement(value: LocalValue, layout: ParallelLayout,
                    expected_shape: Optional[Sequence[Optional[int]]] = None) -> Placement:
    """The placement of ``value.tensor`` over this rank's pipeline stage.

    A DTensor's own placement wins over the module's: e.g. a colwise layer's
    output gradient may be Replicate. Under data parallel a value is split on
    the batch dim unless ``expected_shape`` gives that dim its local size
    (e.g. position embeddings, the same on every rank)."""
    local = value.tensor
    dp_dim = None
    if layout.dp > 1 and value.side != "param":
        if local.ndim <= layout.batch_dim % max(local.ndim, 1) or local.ndim == 0:
            raise ValueError(f'hook "{value.hook_name}": a {local.ndim}-d value cannot be split on batch dim '
                             f"{layout.batch_dim} under data parallel; pick another leaf with unpack_idx")
        dp_dim = layout.batch_dim % local.ndim
    tp_dim = None
    if layout.tp > 1:
        if value.from_dtensor or value.dtensor_tp_dim is not None:
            tp_dim = value.dtensor_tp_dim
        elif value.side == "param":
            tp_dim = param_tp_dim(value.module, value.param_name, local)
        else:
            tp_dim = module_tp_dims(value.module).get(value.side)
        if tp_dim is not None:
            tp_dim %= local.ndim
    if expected_shape is not None:
        tp_dim = _check_expected(expected_shape, local, layout, tp_dim, dp_dim, value.hook_name)
        if dp_dim is not None and expected_shape[dp_dim] == local.shape[dp_dim]:
            dp_dim = None  # full size = local size: the same value on every data parallel rank
    placement = Placement(tp_dim=tp_dim, dp_dim=dp_dim)
    if value.side == "param" or value.is_grad:
        return gradient_placement(placement, layout.dp)
    return placement


def _check_expected(expected: Sequence[Optional[int]], local: torch.Tensor, layout: ParallelLayout,
                    tp_dim: Optional[int], dp_dim: Optional[int], hook_name: str) -> Optional[int]:
    """Validate ``expected`` against the local shape; return the tp dim it implies."""
    shape = tuple(local.shape)
    msg = (f'expected_shape {tuple(expected)} does not match local shape {shape} × tp {layout.tp} '
           f'on hook "{hook_name}"')
    if len(expected) != len(shape):
        raise ValueError(f"{msg}: expected_shape has {len(expected)} dims, the value has {len(shape)}; "
                         "give one entry per dim (None where any size is fine)")
    split = [i for i, (e, n) in enumerate(zip(expected, shape))
             if e is not None and layout.tp > 1 and e == n * layout.tp and e != n]
    if len(split) > 1:
        split = [i for i in split if i == tp_dim] or split[-1:]
    for i, (e, n) in enumerate(zip(expected, shape)):
        if e is None or e == n or i in split:
            continue
        if i == dp_dim and e > n:  # the full batch; dp slices may be uneven
            continue
        sizes = f"{n} (replicated) or {n * layout.tp} (split over tp)" if layout.tp > 1 else f"{n}"
        raise ValueError(f"{msg}: dim {i} is {n} locally, so its full size is {sizes}, not {e}")
    if split:
        return split[0]
    return tp_dim if tp_dim is not None and expected[tp_dim] is None else None
