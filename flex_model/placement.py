"""Where the pieces of a hooked tensor live, read off the model and checked against the value.

A ``Placement`` says along which dim the tensor is split over the tensor
parallel axis (``tp_dim``) and over the data parallel axis (``dp_dim``);
``None`` means replicated. ``LocalValue`` is what the hook sees.

Over tensor parallel, in this order:

1. a DTensor value: its own placement wins;
2. a parameter: the TP layer's partition dim;
3. a plain local tensor: what the model says about it (a ``Claim``), then
   checked against its size:

   - the parallel style on the module: torch's ``ColwiseParallel`` /
     ``RowwiseParallel`` / ``SequenceParallel`` / ``PrepareModuleInput`` /
     ``PrepareModuleOutput`` (read off the hooks ``parallelize_module``
     installed, and where ours runs among them), HuggingFace's tensor
     parallel layers (read off the ``forward`` they install);
   - megatron-core and fairscale layers: ``ColumnParallelLinear`` /
     ``RowParallelLinear`` (``gather_output``, ``input_is_parallel``,
     ``sequence_parallel``), ``VocabParallelEmbedding``
     (``reduce_scatter_embeddings``), norms whose parameters are tagged
     ``sequence_parallel``, Megatron modules whose ``config.sequence_parallel``
     puts their hidden states ``[s, b, h]`` in the sequence parallel region
     (split on dim 0), ``DotProductAttention`` (heads), ``GPTModel`` (vocab);
   - the module's full sizes: a Linear's ``out_features`` / ``in_features``
     (megatron ``output_size`` / ``input_size``), an embedding's
     ``embedding_dim``. A value whose dim has the full size is whole there
     (a colwise layer that gathers its output before returning); one with a
     1/tp slice is split there; any other size is an error naming the
     module, the sizes and the fix (``expected_shape=``), never a guess.

   - a module's own declaration, ``module._flex_tp_dim = {"output": d, "input": d}``
     (``d`` a dim, or ``(dim, full size)`` to check the size too): the
     ``flex_model.hook_points`` hook points declare the head dim of attention
     values this way (``_declared_claim``).

   A module the model says nothing about is replicated, unless a sequence
   parallel part sits inside it (its values may be split on the sequence
   dim): then it cannot be told, and that is an error asking for
   ``expected_shape``. Values that cannot be gathered into one tensor
   (packed/strided shards, partial sums) are an error too.

A user's ``expected_shape`` overrides all this and is validated against the
local shape. Over data parallel a value is split on the layout's batch dim.
The rule for gradients under data parallelism is here too, once:
``gradient_placement`` and ``dp_grad_divisor``.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace
from typing import Any, Callable, Dict, List, Literal, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from flex_model.layout import ParallelLayout
from flex_model.tree import tensor_leaves

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
    None when replicated) wins over what the module says. ``hook_id``: the id
    of our torch hook on the module (where it runs among the hooks a parallel
    style installed); ``hooked``: the whole hooked value and ``leaf_index``
    the leaf this is (which argument / output it is).
    """

    hook_name: str
    module: nn.Module
    side: Side
    tensor: torch.Tensor
    is_grad: bool = False
    param_name: str = ""
    from_dtensor: bool = False
    dtensor_tp_dim: Optional[int] = None
    hook_id: Optional[int] = None
    hooked: Any = None
    leaf_index: int = 0


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


def param_tp_dim(module: nn.Module, param_name: str, param: torch.Tensor) -> Optional[int]:
    if getattr(param, "tensor_model_parallel", False) and hasattr(param, "partition_dim"):
        return int(param.partition_dim)
    return PARAM_TP_DIMS.get(type(module).__name__, {}).get(param_name)


def to_local(x: torch.Tensor) -> Tuple[torch.Tensor, Optional[int], Callable[[torch.Tensor], torch.Tensor]]:
    """``(local_tensor, tp_dim or None, rewrap)`` for a plain tensor, DTensor or AsyncCollectiveTensor.

    For a DTensor the tp dim comes from its placement (a Partial value is
    reduced first) and ``rewrap`` turns an edited local tensor back into a
    DTensor of the same placement; all steps are autograd-aware. A placement
    whose pieces are not plain slices (a strided shard of packed weights) or
    a split that does not divide evenly is an error.
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
    place = x.placements[0]
    if not (place.is_shard() or place.is_replicate()):
        raise ValueError(f"a DTensor of shape {tuple(x.shape)} placed {place!r} holds interleaved pieces (packed "
                         "weights sharded with a split factor), which do not concatenate into the full tensor; "
                         "hook a value that is a plain shard or replicated")
    tp_dim = place.dim % x.ndim if place.is_shard() else None
    if tp_dim is not None and x.shape[tp_dim] % x.device_mesh.size():
        raise ValueError(f"a DTensor of shape {tuple(x.shape)} is split on dim {tp_dim} over "
                         f"{x.device_mesh.size()} ranks unevenly; uneven splits are not supported")
    mesh, placements, shape, stride = x.device_mesh, x.placements, x.shape, x.stride()
    rewrap = lambda y: DTensor.from_local(y, mesh, placements, run_check=False, shape=shape, stride=stride)  # noqa: E731
    return x.to_local(), tp_dim, rewrap


# == What the model says about a plain local value ==========================================================
@dataclass(frozen=True)
class Claim:
    """What the model says about one plain local value.

    ``said``: a source declares where its pieces live: split on ``split``
    over tp, or whole (``split=None``). ``sizes``: ``(dim, full size)`` pairs
    the module knows (a Linear's widths), checked against the local value.
    ``source``: who says so, for messages. ``doubt``: why it cannot be told
    (an error unless ``expected_shape`` says); ``unsupported``: why the
    pieces cannot be gathered at all (an error, whatever the user says).
    """

    said: bool = False
    split: Optional[int] = None
    sizes: Tuple[Tuple[int, int], ...] = ()
    source: str = ""
    doubt: str = ""
    unsupported: str = ""

    def known(self) -> bool:
        return self.said or bool(self.sizes) or bool(self.doubt) or bool(self.unsupported)


NOTHING = Claim()
_AFTER_ALL = math.inf  # a gradient sees the value after every hook of its side has run
Position = Union[int, str, None]  # which positional argument / keyword / output the leaf is


def _closure(fn: Any) -> List[Any]:
    out = []
    for cell in getattr(fn, "__closure__", None) or ():
        try:
            out.append(cell.cell_contents)
        except ValueError:  # an empty cell
            pass
    return out


def _is_a(obj: Any, class_name: str, package: str) -> bool:
    """``obj`` is an instance of a class named ``class_name`` from ``package`` (checked without importing it)."""
    return any(c.__name__ == class_name and c.__module__.startswith(package) for c in type(obj).__mro__)


def _position(value: LocalValue) -> Position:
    """Which argument (index or keyword) or output (index) of the module the leaf is; 0 when unknown."""
    hooked = value.hooked
    if hooked is None:
        return 0
    leaves = tensor_leaves(hooked)
    if not leaves:
        return None
    leaf = leaves[value.leaf_index % len(leaves)]
    if value.side == "input" and not value.is_grad and isinstance(hooked, tuple) and len(hooked) == 2:
        args, kwargs = hooked
        for i, a in enumerate(args):
            if a is leaf:
                return i
        for k, a in (kwargs or {}).items():
            if a is leaf:
                return k
        return None
    if isinstance(hooked, torch.Tensor):
        return 0 if hooked is leaf else None
    if isinstance(hooked, (tuple, list)):
        return next((i for i, a in enumerate(hooked) if a is leaf), None)
    return None


def _dim_of(layout: Any, ndim: int, source: str) -> Claim:
    """A claim from a torch ``Placement`` (Replicate / Shard) of a value with ``ndim`` dims."""
    if layout.is_replicate():
        return Claim(said=True, split=None, source=source)
    if layout.is_shard() and ndim > 0:
        return Claim(said=True, split=layout.dim % ndim, source=source)
    return Claim(unsupported=f"{source} says it is placed {layout}: its ranks' pieces do not concatenate into "
                             "the full value (a partial sum or interleaved pieces)")


# -- torch.distributed.tensor.parallel styles, read off the hooks parallelize_module installed --------------
@dataclass(frozen=True)
class _Transform:
    """One hook a parallel style put on a module: what the value is before it and after it.

    ``before`` / ``after``: position → torch Placement of the plain local
    value there; a position missing from ``after`` is a DTensor after it
    (or left alone, when missing from both)."""

    index: int
    style: str
    before: Dict[Position, Any]
    after: Dict[Position, Any]


def _torch_transforms(module: nn.Module, side: str) -> List[_Transform]:
    hooks = module._forward_pre_hooks if side == "input" else module._forward_hooks
    found = []
    for index, fn in enumerate(hooks.values()):
        for obj in _closure(fn):
            t = _read_style(obj, index, side)
            if t is not None:
                found.append(t)
                break
    return found


def _read_style(obj: Any, index: int, side: str) -> Optional[_Transform]:
    """The ``_Transform`` a torch parallel style's hook closes over (a partial of its static method, or the
    style itself for PrepareModuleInput / PrepareModuleOutput), else None."""
    if isinstance(obj, functools.partial) and getattr(obj.func, "__module__", "") == \
            "torch.distributed.tensor.parallel.style":
        style, _, fn = obj.func.__qualname__.partition(".")
        args = obj.args
        if style in ("ColwiseParallel", "RowwiseParallel"):
            if fn == "_prepare_input_fn":
                return _Transform(index, style, {0: args[0][0]}, {})
            if fn == "_prepare_output_fn":
                return _Transform(index, style, {}, {0: args[0][0]} if args[1] else {})
        if style == "SequenceParallel":
            if fn == "_prepare_input_fn":
                return _Transform(index, style, {0: args[0][0]}, {})
            if fn == "_prepare_output_fn":  # a sequence-sharded norm / dropout returns its input's sharding
                return _Transform(index, style, {}, {0: "sequence"} if args[0] else {})
        return None
    if _is_a(obj, "PrepareModuleInput", "torch.distributed") and side == "input":
        before = {i: p for i, p in enumerate(obj.input_layouts or ()) if p is not None}
        before.update({k: p for k, p in (obj.input_kwarg_layouts or {}).items() if p is not None})
        after = {}
        if obj.use_local_output:
            after = {i: p for i, p in enumerate(obj.desired_input_layouts or ()) if p is not None}
            after.update({k: p for k, p in (obj.desired_input_kwarg_layouts or {}).items() if p is not None})
        return _Transform(index, "PrepareModuleInput", before, after)
    if _is_a(obj, "PrepareModuleOutput", "torch.distributed") and side == "output":
        before = {i: p for i, p in enumerate(obj.output_layouts) if p is not None}
        after = {}
        if obj.use_local_output:
            after = {i: d for i, (p, d) in enumerate(zip(obj.output_layouts, obj.desired_output_layouts))
                     if p is not None}
        return _Transform(index, "PrepareModuleOutput", before, after)
    return None


def _torch_style_claim(value: LocalValue, pos: Position) -> Claim:
    """What torch's parallel styles on the module say about this plain value: the layout right before the
    first style hook when ours runs first, else right after the last style hook that ran before ours."""
    transforms = _torch_transforms(value.module, value.side)
    if not transforms:
        return NOTHING
    ndim = value.tensor.ndim
    if value.is_grad:
        where: Optional[float] = _AFTER_ALL
    else:
        hooks = value.module._forward_pre_hooks if value.side == "input" else value.module._forward_hooks
        ids = list(hooks.keys())
        where = ids.index(value.hook_id) if value.hook_id in ids else None
    if where is None:  # where our hook runs is not known: every plain view the styles allow must agree
        views = ([transforms[0].before[pos]] if pos in transforms[0].before else []) + [
            t.after[pos] for t in transforms if pos in t.after]
        if not views:
            return NOTHING
        if any(repr(v) != repr(views[0]) for v in views):
            return Claim(doubt=f"{transforms[0].style} on it changes the {value.side}, and where this hook runs "
                               "among its hooks is not known")
        return _from_layout(views[0], ndim, f"{transforms[0].style} on the module", value.module)
    ran = [t for t in transforms if t.index < where]
    if ran:
        t = ran[-1]
        layout = t.after.get(pos)
        side_words = "after it"
    else:
        t = transforms[0]
        layout = t.before.get(pos)
        side_words = "before it"
    if layout is None:
        return NOTHING
    return _from_layout(layout, ndim, f"{t.style} on the module ({value.side} {side_words})", value.module)


def _from_layout(layout: Any, ndim: int, source: str, module: nn.Module) -> Claim:
    if isinstance(layout, str):  # SequenceParallel's output: sharded as its input
        seq = next((t.before.get(0) for t in _torch_transforms(module, "input")
                    if t.style == "SequenceParallel" and t.before), None)
        return _dim_of(seq, ndim, source) if seq is not None else NOTHING
    return _dim_of(layout, ndim, source)


# -- HuggingFace transformers tensor parallel layers (they replace module.forward) --------------------------
def _hf_layer(module: nn.Module) -> Any:
    forward = module.__dict__.get("forward")
    if forward is None:
        return None
    return next((obj for obj in _closure(forward) if _is_a(obj, "TensorParallelLayer", "transformers")), None)


def _hf_claim(value: LocalValue, pos: Position) -> Claim:
    """HF layers transform the inputs as the module is called and the output before it returns: a
    pre-hook (and an input gradient) sees the input as passed, a forward hook the output as returned."""
    from torch.distributed.tensor import Replicate, Shard

    layer = _hf_layer(value.module)
    if layer is None:
        return NOTHING
    style, ndim = type(layer).__name__, value.tensor.ndim
    source = f"HF {style} on the module"
    if style == "ReplicatedWithGradAllReduce":
        return Claim(doubt=f"{source} sits between colwise and rowwise layers on a split axis (which dim "
                           "is split is not said)")
    if pos != 0:
        return NOTHING
    inputs = value.side == "input"
    local_out = getattr(layer, "use_local_output", True)
    if style in ("ColwiseParallel", "RowwiseParallel"):
        layout = layer.input_layouts if inputs else layer.output_layouts
        return _dim_of(layout, ndim, source) if inputs or local_out else NOTHING
    if style == "SequenceParallel":
        return _dim_of(Shard(layer.sequence_dim), ndim, source) if inputs or local_out else NOTHING
    if style in ("EmbeddingParallel", "MoeExpertsParallel", "AllReduceParallel"):
        if inputs and style == "AllReduceParallel":
            return NOTHING
        return _dim_of(Replicate(), ndim, source)
    if style == "PackedColwiseParallel":
        if inputs:
            return _dim_of(Replicate(), ndim, source)
        if local_out:
            return Claim(unsupported=f"{source}: its output holds this rank's slice of each of the "
                                     f"{layer.split_factor} packed parts (interleaved), which do not concatenate "
                                     "into the full value; hook the module's input, or a module after the parts "
                                     "are split")
    return NOTHING


# -- megatron-core and fairscale layers ----------------------------------------------------------------------
def _is_megatron(module: nn.Module) -> bool:
    return type(module).__module__.startswith("megatron.")


def _sequence_parallel_config(module: nn.Module) -> bool:
    config = getattr(module, "config", None)
    return bool(getattr(config, "sequence_parallel", False)) and _is_megatron(module)


def _tagged_sequence_parallel(module: nn.Module) -> bool:
    """Megatron tags the parameters of modules that run on sequence-split values (norms, row-parallel biases)."""
    params = list(module.parameters(recurse=False))
    return bool(params) and all(getattr(p, "sequence_parallel", False) for p in params)


def _linear_sizes(module: nn.Module) -> Optional[Tuple[int, int, str]]:
    """``(full in width, full out width, what says so)`` of a Linear-like layer, else None."""
    name = type(module).__name__
    if name in ("ColumnParallelLinear", "RowParallelLinear"):
        if hasattr(module, "input_size") and hasattr(module, "output_size"):  # megatron-core
            return int(module.input_size), int(module.output_size), f"{name}(input_size, output_size)"
        if hasattr(module, "in_features") and hasattr(module, "out_features"):  # fairscale
            return int(module.in_features), int(module.out_features), f"{name}(in_features, out_features)"
    if isinstance(module, nn.Linear) or (hasattr(module, "in_features") and hasattr(module, "out_features")
                                         and _hf_layer(module) is not None):
        return int(module.in_features), int(module.out_features), f"{name}(in_features, out_features)"
    return None


def _layer_claim(value: LocalValue, pos: Position, tp: int) -> Claim:
    """What a framework layer's type and attributes say (flags and full sizes)."""
    module, side, x = value.module, value.side, value.tensor
    name = type(module).__name__
    claims: List[Claim] = []
    sizes = _linear_sizes(module)
    if sizes is not None:
        full_in, full_out, source = sizes
        if side == "input" and pos == 0:
            claims.append(Claim(sizes=((-1, full_in),), source=source))
        if side == "output" and pos in (0, 1) and (pos == 0 or _is_megatron(module)):  # megatron: (out, bias)
            claims.append(Claim(sizes=((-1, full_out),), source=source))
    elif isinstance(module, nn.Embedding) or name in ("VocabParallelEmbedding", "ParallelEmbedding"):
        if side == "output" and pos == 0 and hasattr(module, "embedding_dim"):
            claims.append(Claim(sizes=((-1, int(module.embedding_dim)),), source=f"{name}(embedding_dim)"))
        if side == "input":
            claims.append(Claim(said=True, source=f"{name} (token ids)"))
    seq = getattr(module, "sequence_parallel", False) is True and not getattr(module, "explicit_expert_comm", False)
    if name == "ColumnParallelLinear":
        if side == "output" and pos == 0 and not getattr(module, "gather_output", True):
            claims.append(Claim(said=True, split=x.ndim - 1, source=f"{name}(gather_output=False)"))
        if side == "input" and pos == 0 and seq:
            claims.append(Claim(said=True, split=0, source=f"{name}(sequence_parallel=True)"))
    elif name == "RowParallelLinear":
        if side == "input" and pos == 0 and getattr(module, "input_is_parallel", False):
            claims.append(Claim(said=True, split=x.ndim - 1, source=f"{name}(input_is_parallel=True)"))
        if side == "output" and pos == 0 and seq:
            claims.append(Claim(said=True, split=0, source=f"{name}(sequence_parallel=True)"))
    elif name == "VocabParallelEmbedding" and getattr(module, "reduce_scatter_embeddings", False):
        if side == "output" and pos == 0:
            claims.append(Claim(said=True, split=0, source=f"{name}(reduce_scatter_embeddings=True)"))
    elif name == "DotProductAttention" and _is_megatron(module):
        cfg = module.config
        if side == "input" and pos in (0, 1, 2):  # query, key, value [s, b, heads, head dim]
            heads = cfg.num_attention_heads if pos == 0 else (cfg.num_query_groups or cfg.num_attention_heads)
            claims.append(Claim(said=True, split=2, sizes=((2, int(heads)),), source=f"{name} (attention heads)"))
        if side == "output" and pos == 0:
            claims.append(Claim(sizes=((-1, int(module.hidden_size_per_partition) * tp),),
                                source=f"{name} (hidden_size_per_partition × tp)"))
    elif name == "GPTModel" and _is_megatron(module):
        if side == "output" and pos == 0 and x.ndim == 3:
            claims.append(Claim(sizes=((-1, int(module.vocab_size)),), source=f"{name}(vocab_size)"))
        else:
            claims.append(Claim(said=True, source=f"{name} (token ids, positions, mask, loss)"))
    elif name == "LanguageModelEmbedding" and _is_megatron(module) and side == "output" and pos == 0:
        scatter = module.config.sequence_parallel and getattr(module, "scatter_to_sequence_parallel", True)
        claims.append(Claim(said=True, split=0 if scatter else None,
                            source=f"{name}(config.sequence_parallel={module.config.sequence_parallel})"))
    elif _tagged_sequence_parallel(module) and pos == 0 and side in ("input", "output"):
        claims.append(Claim(said=True, split=0, source=f"{name} (parameters tagged sequence_parallel)"))
    elif _sequence_parallel_config(module) and x.is_floating_point() and x.ndim == 3 \
            and x.shape[-1] == module.config.hidden_size:
        claims.append(Claim(said=True, split=0, source=f"{name}(config.sequence_parallel=True): hidden states "
                                                       "[s, b, h] are split on the sequence dim"))
    return _merge(claims)


def _merge(claims: Sequence[Claim]) -> Claim:
    """One claim from several, most specific first: their sizes together, the first declared split."""
    if not claims:
        return NOTHING
    said = [c for c in claims if c.said]
    return Claim(said=bool(said), split=said[0].split if said else None,
                 sizes=tuple(s for c in claims for s in c.sizes),
                 source="; ".join(dict.fromkeys(c.source for c in claims if c.source)),
                 doubt=next((c.doubt for c in claims if c.doubt), ""),
                 unsupported=next((c.unsupported for c in claims if c.unsupported), ""))


def sequence_parallel_inside(module: nn.Module) -> str:
    """A sequence parallel part inside ``module`` (its name and why), or "" when there is none."""
    from torch.distributed.tensor import Shard

    for name, sub in module.named_modules():
        where = f'"{name}"' if name else "the module itself"
        layer = _hf_layer(sub)
        if layer is not None:
            layouts = [getattr(layer, a, None) for a in ("input_layouts", "output_layouts")]
            if type(layer).__name__ in ("SequenceParallel", "ReplicatedWithGradAllReduce") or any(
                    isinstance(p, Shard) and p.dim != -1 for p in layouts):
                return f"{where} ({type(layer).__name__})"
        for side in ("input", "output"):
            for t in _torch_transforms(sub, side):
                layouts = list(t.before.values()) + list(t.after.values())
                if t.style == "SequenceParallel" or any(isinstance(p, Shard) and p.dim != -1 for p in layouts):
                    return f"{where} ({t.style})"
        if _sequence_parallel_config(sub) or _tagged_sequence_parallel(sub) or \
                getattr(sub, "sequence_parallel", False) is True:
            return f"{where} ({type(sub).__name__}, Megatron sequence parallel)"
    return ""


def _declared_claim(value: LocalValue, pos: Position) -> Claim:
    """What a module declares about its own first input / output: ``module._flex_tp_dim = {"output": dim or
    (dim, full size or None), "input": ...}`` (hook points do; ``flex_model.hook_points``). With a full size,
    the value is whole when it has it and split when it has a 1/tp slice of it."""
    declared = getattr(value.module, "_flex_tp_dim", None)
    if not isinstance(declared, dict) or pos != 0 or declared.get(value.side) is None:
        return NOTHING
    entry = declared[value.side]
    dim, full = entry if isinstance(entry, tuple) else (entry, None)
    source = f"{type(value.module).__name__}._flex_tp_dim"
    if value.tensor.ndim == 0:
        return NOTHING
    dim %= value.tensor.ndim
    return Claim(said=True, split=dim, sizes=((dim, int(full)),) if full else (), source=source)


def claim_of(value: LocalValue, layout: ParallelLayout) -> Claim:
    """Everything the model says about a plain local value (its module, side and argument)."""
    pos = _position(value)
    claim = _merge([c for c in (_declared_claim(value, pos), _hf_claim(value, pos), _torch_style_claim(value, pos),
                                _layer_claim(value, pos, layout.tp)) if c.known()])
    if claim.said or claim.doubt or claim.unsupported:
        return claim
    x = value.tensor
    if x.is_floating_point() and x.ndim >= 2 and claim.sizes == ():
        inside = sequence_parallel_inside(value.module)
        if inside:
            return replace(claim, doubt=f"sequence parallelism runs inside it ({inside}): its values may be split "
                                        "on the sequence dim, or whole")
    return claim


def _resolve(claim: Claim, value: LocalValue, layout: ParallelLayout) -> Optional[int]:
    """The tp dim of a plain local value from what the model says, checked against the value's size."""
    x, tp = value.tensor, layout.tp
    where = f'hook "{value.hook_name}" ({"gradient of the " if value.is_grad else ""}{value.side} of ' \
            f'{type(value.module).__name__})'
    if claim.unsupported:
        raise ValueError(f"{where}: {claim.unsupported}")
    if claim.doubt:
        raise ValueError(f"{where}: the local value has shape {tuple(x.shape)} on each of {tp} tensor parallel "
                         f"ranks; {claim.doubt}, so which dim is split cannot be told. Pass the full shape, "
                         f"e.g. HookFunction(\"{value.hook_name}\", expected_shape={_example(x, tp)}) with the "
                         "full size of every dim")
    whole, split = set(), None
    for dim, full in claim.sizes:
        if x.ndim == 0:
            continue
        d = dim % x.ndim
        n = x.shape[d]
        if n == full:
            whole.add(d)
        elif n * tp == full:
            if split is not None and split != d:
                raise ValueError(f"{where}: dims {split} and {d} both hold a 1/{tp} slice ({claim.source})")
            split = d
        else:
            raise ValueError(f"{where}: dim {d} is {n} on this rank, but {claim.source} gives its full size "
                             f"as {full}: {n} is neither the whole ({full}) nor a 1/{tp} slice "
                             f"({full / tp:g}) of it, so where the pieces live cannot be told. Pass the full "
                             f'shape, e.g. HookFunction("{value.hook_name}", expected_shape='
                             f"{_example(x, tp, d, full)})")
    if split is not None:
        if claim.said and claim.split is not None and claim.split not in (split,) and claim.split not in whole:
            raise ValueError(f"{where}: {claim.source} says dim {claim.split} is split, but dim {split} holds "
                             f"a 1/{tp} slice of its full size; pass expected_shape= with the full shape")
        return split
    if claim.said and claim.split is not None and claim.split in whole:
        return None  # declared split there, but the module gathered it before returning: whole
    return claim.split if claim.said else None


def _example(x: torch.Tensor, tp: int, dim: Optional[int] = None, full: Optional[int] = None) -> tuple:
    shape = list(x.shape)
    if dim is not None and full is not None and full % max(tp, 1) == 0 and shape[dim] * tp != full:
        shape[dim] = full
    return tuple(shape)


def infer_placement(value: LocalValue, layout: ParallelLayout,
                    expected_shape: Optional[Sequence[Optional[int]]] = None, *,
                    dp: Optional[int] = None) -> Placement:
    """The placement of ``value.tensor`` over this rank's pipeline stage (over its replica's tp ranks
    with ``dp=1``: replica scope gathers no batch slices).

    A DTensor's own placement wins over the module's: e.g. a colwise layer's
    output gradient may be Replicate. A plain local value's tp dim is what the
    model says about it, checked against its size (``claim_of``); errors
    where that cannot be told. Under data parallel a value is split on the
    batch dim unless ``expected_shape`` gives that dim its local size (e.g.
    position embeddings, the same on every rank)."""
    local = value.tensor
    dp = layout.dp if dp is None else dp
    dp_dim = None
    if dp > 1 and value.side != "param":
        if local.ndim <= layout.batch_dim % max(local.ndim, 1) or local.ndim == 0:
            raise ValueError(f'hook "{value.hook_name}": a {local.ndim}-d value cannot be split on batch dim '
                             f"{layout.batch_dim} under data parallel; pick another leaf with unpack_idx")
        dp_dim = layout.batch_dim % local.ndim
    tp_dim = None
    if layout.tp > 1:
        if value.from_dtensor or value.dtensor_tp_dim is not None:
            tp_dim = value.dtensor_tp_dim
        elif value.side == "param":
            param = getattr(value.module, value.param_name, None)
            if value.is_grad and getattr(param, "sequence_parallel", False):
                raise ValueError(f'hook "{value.hook_name}": {type(value.module).__name__}.{value.param_name} is '
                                 "tagged sequence_parallel: during backward each tp rank holds the partial "
                                 "gradient of its part of the sequence, which Megatron sums over tp only after "
                                 "backward (finalize_model_grads); no rank holds the full gradient yet. Read "
                                 "param.grad after that instead of hooking the gradient")
            tp_dim = param_tp_dim(value.module, value.param_name, local)
        else:
            claim = claim_of(value, layout)
            if expected_shape is None:
                tp_dim = _resolve(claim, value, layout)
            elif claim.unsupported:
                _resolve(claim, value, layout)  # raises: no shape makes these pieces one tensor
            elif claim.doubt and any(e is None for i, e in enumerate(expected_shape) if i != dp_dim):
                raise ValueError(f'hook "{value.hook_name}": expected_shape {tuple(expected_shape)} leaves dims '
                                 f"unsaid, but {claim.doubt}; give the full size of every dim (None only for "
                                 "the batch dim under data parallel)")
            else:
                try:
                    tp_dim = _resolve(claim, value, layout)  # a hint for expected_shape's ties
                except ValueError:
                    tp_dim = None
        if tp_dim is not None:
            tp_dim %= local.ndim
    if expected_shape is not None:
        tp_dim = _check_expected(expected_shape, local, layout, tp_dim, dp_dim, value.hook_name)
        if dp_dim is not None and expected_shape[dp_dim] == local.shape[dp_dim]:
            dp_dim = None  # full size = local size: the same value on every data parallel rank
    placement = Placement(tp_dim=tp_dim, dp_dim=dp_dim)
    if value.side == "param" or value.is_grad:
        return gradient_placement(placement, dp)
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
