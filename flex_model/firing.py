"""One hook firing: unpack → gather → store → edit → scatter → repack.

``HOOK_KINDS`` is the one table from a hook type to the torch method that
registers it and to the hooked value's side. ``fire`` runs one firing:

1. unpack: pick the ``unpack_idx``-th tensor leaf; a DTensor becomes its
   local shard; infer the ``Placement`` of that shard.
2. gather: on one process, nothing; otherwise one all-to-all over the
   pipeline stage carries every rank's header (shape, error status) to all
   ranks and its piece to the root (``collectives.exchange``), so any
   rank's error surfaces on all.
3. store: the full, detached value (before the edit) goes to ``output_dict``
   (on CPU unless ``offload_to_cpu=False``) on the root, on every rank, or
   nowhere (``store``); pipeline stages other than the owner's queue it.
4. edit: the editing function runs once, on the root, on the full tensor;
   its result is validated (same shape, dtype, device).
5. scatter: the root's verdict is broadcast; an edited tensor goes back as
   pieces, through ``ScatterEdit`` so gradients follow single-process
   semantics.
6. repack: the edited leaf is put back in a value of the same type.

Gradients under data parallel: backward hooks see the gradient of the mean
of the per-rank losses (the DDP/FSDP convention), i.e. the gathered local
gradients divided by the dp size — the single-process gradient when each
rank's loss is a mean over its batch slice. ``dp_grad_mean=False`` shows
the raw concatenation instead.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

import torch
from torch import nn

from flex_model import collectives as C
from flex_model.hook_function import HookFunction, Shard, ShardwiseEdit
from flex_model.layout import ParallelLayout
from flex_model.placement import Placement, _is_dtensor, infer_placement, to_local
from flex_model.tree import replace_leaf, tensor_leaves


@dataclass(frozen=True)
class HookKind:
    name: str
    side: str  # where the value sits: "input", "output" or "param"
    is_grad: bool
    register: Callable[[Any, Callable], Any]  # (module or parameter, callback) -> torch handle
    adapt: Callable[[Callable], Callable]  # fire(module, value, args) -> torch's callback signature


HOOK_KINDS: Dict[str, HookKind] = {k.name: k for k in [
    HookKind("forward", "output", False, lambda m, cb: m.register_forward_hook(cb),
             lambda f: lambda mod, args, out: f(mod, out, args)),
    HookKind("forward_pre", "input", False, lambda m, cb: m.register_forward_pre_hook(cb, with_kwargs=True),
             lambda f: lambda mod, args, kwargs: f(mod, (args, kwargs), None)),
    HookKind("full_backward", "input", True, lambda m, cb: m.register_full_backward_hook(cb),
             lambda f: lambda mod, grad_in, grad_out: f(mod, grad_in, None)),
    HookKind("full_backward_pre", "output", True, lambda m, cb: m.register_full_backward_pre_hook(cb),
             lambda f: lambda mod, grad_out: f(mod, grad_out, None)),
    HookKind("tensor", "param", True, lambda p, cb: p.register_hook(cb), None),
]}


@dataclass
class Runtime:
    """The state every hook of one FlexModel fires against."""

    layout: ParallelLayout
    peers: Optional[C.StagePeers]  # None when this rank's stage is one rank
    output_dict: Dict[str, List[torch.Tensor]]
    save_ctx: SimpleNamespace
    modules: nn.ModuleDict
    store: str = "root"  # "root" | "all" | "none"
    offload_to_cpu: bool = True
    dp_grad_mean: bool = True
    active: Optional[Set[HookFunction]] = None  # None: every hook fires
    outbox: List[Tuple[str, torch.Tensor]] = field(default_factory=list)  # pipeline captures for the owner
    capacity: Dict[Tuple[str, str], int] = field(default_factory=dict)  # (name, hook type) -> exchange slot bytes

    def store_value(self, name: str, full: torch.Tensor, fresh: bool = False) -> None:
        """Keep ``full`` (a copy, unless ``fresh``: already a new tensor nobody else holds)."""
        value = full.detach()
        if self.offload_to_cpu and value.device.type != "cpu":
            value = value.cpu()
        elif not fresh:
            value = value.clone()
        if self.store == "all" or self.layout.rank == self.layout.owner:
            self.output_dict.setdefault(name, []).append(value)
        else:
            self.outbox.append((name, value))


def attach(hook: HookFunction, rt: Runtime, target: Any, module: nn.Module, param_name: str = "") -> Any:
    """Register ``hook`` on ``target`` (a module, or a parameter of ``module``); return the torch handle."""
    kind = HOOK_KINDS[hook.hook_type]

    def fire_here(mod: nn.Module, value: Any, args: Any) -> Any:
        return fire(hook, rt, kind, mod, value, args, param_name)

    if kind.adapt is None:
        return kind.register(target, lambda grad: fire_here(module, grad, None))
    return kind.register(target, kind.adapt(fire_here))


def fire(hook: HookFunction, rt: Runtime, kind: HookKind, module: nn.Module, value: Any, args: Any,
         param_name: str = "") -> Any:
    """One firing of ``hook`` on ``value``; returns the repacked value, or None for unchanged."""
    if rt.active is not None and hook not in rt.active:
        return None
    if kind.is_grad and not tensor_leaves(value):  # e.g. grad_input of a module called with keyword args
        warnings.warn(f'hook "{hook.module_name}" ({hook.hook_type}) got no gradient tensors (its inputs were '
                      "passed as keyword arguments or need no grad); nothing captured or edited", stacklevel=2)
        return None
    shardwise = isinstance(hook.editing_function, ShardwiseEdit)
    error, local, placement, rewrap = None, None, None, None
    try:
        leaf = _pick_leaf(hook, value)
        local, dtensor_dim, rewrap = to_local(leaf)
        placement = infer_placement(module=module, side=kind.side, local=local, layout=rt.layout,
                                    expected_shape=hook.expected_shape, hook_name=hook.module_name,
                                    dtensor_tp_dim=dtensor_dim, param_name=param_name,
                                    from_dtensor=_is_dtensor(leaf), is_grad=kind.is_grad)
    except Exception as e:
        # Under data parallel ranks see different values: the exchange's headers raise it on every rank.
        # Without it every rank of the stage runs the same module on same-shaped values and fails alike.
        if rt.peers is None or shardwise or rt.layout.dp == 1:
            raise
        error = e
    if shardwise:
        new = _edit_shardwise(hook, rt, module, local, placement, args)
    elif rt.peers is None:
        new = _edit_here(hook, rt, module, local)
    else:
        new = _edit_across(hook, rt, kind, module, local, placement, error)
    if new is None:
        return None
    return replace_leaf(value, hook.unpack_idx, rewrap(new))


def _pick_leaf(hook: HookFunction, value: Any) -> torch.Tensor:
    leaves = tensor_leaves(value)
    if not -len(leaves) <= hook.unpack_idx < len(leaves):
        raise IndexError(f'unpack_idx {hook.unpack_idx} is out of range on hook "{hook.module_name}" '
                         f"({hook.hook_type}): the hooked value has {len(leaves)} tensor(s) "
                         f"{[tuple(t.shape) for t in leaves]}; pick an index below {len(leaves)}")
    return leaves[hook.unpack_idx]


def _run_edit(hook: HookFunction, rt: Runtime, module: nn.Module, x: torch.Tensor) -> Optional[torch.Tensor]:
    """Call the user's editing function on the full tensor and validate its result."""
    try:
        y = hook.editing_function(module, x, rt.save_ctx, rt.modules)
    except Exception as e:
        e.add_note(f'raised in the editing function of hook "{hook.module_name}" ({hook.hook_type}) '
                   f"on rank {rt.layout.rank}")
        raise
    if y is None:
        return None
    if not isinstance(y, torch.Tensor):
        raise TypeError(f'the editing function of hook "{hook.module_name}" returned {type(y).__name__}; '
                        "return a tensor like its input, or None to leave the value unchanged")
    if y.shape != x.shape or y.dtype != x.dtype or y.device != x.device:
        raise ValueError(f'the editing function of hook "{hook.module_name}" returned shape {tuple(y.shape)} '
                         f"{y.dtype} on {y.device}, but its input is shape {tuple(x.shape)} {x.dtype} on "
                         f"{x.device}; return a tensor of the input's shape, dtype and device")
    return y


def _edit_here(hook: HookFunction, rt: Runtime, module: nn.Module, local: torch.Tensor) -> Optional[torch.Tensor]:
    """The whole value is on this rank: store it, edit it in the autograd graph."""
    if rt.store != "none":
        rt.store_value(hook.module_name, local)
    if hook.editing_function is None:
        return None
    return _run_edit(hook, rt, module, local)


def _edit_shardwise(hook: HookFunction, rt: Runtime, module: nn.Module, local: torch.Tensor,
                    placement: Placement, args: Any) -> Optional[torch.Tensor]:
    shard = Shard(tp_dim=placement.tp_dim, tp_rank=rt.layout.my["tp"], tp_size=rt.layout.tp,
                  dp_dim=placement.dp_dim, module_args=args)
    y = hook.editing_function.edit_shard(module, local, shard, rt.modules)
    if y is not None and (y.shape != local.shape or y.dtype != local.dtype):
        raise ValueError(f'the shardwise edit of hook "{hook.module_name}" returned shape {tuple(y.shape)} '
                         f"{y.dtype} for a shard of shape {tuple(local.shape)} {local.dtype}")
    return y


def _comm_device(peers: C.StagePeers) -> torch.device:
    """Where a header goes when this rank has no value to take the device from (NCCL: CUDA only)."""
    if torch.distributed.get_backend(peers.group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _edit_across(hook: HookFunction, rt: Runtime, kind: HookKind, module: nn.Module, local: Optional[torch.Tensor],
                 placement: Optional[Placement], error: Optional[BaseException]) -> Optional[torch.Tensor]:
    """The value is split over the stage: gather to the root, edit there once, scatter back."""
    peers, name = rt.peers, hook.module_name
    device = local.device if local is not None else _comm_device(peers)
    needed = hook.editing_function is not None or rt.store != "none"
    if rt.layout.dp == 1 and hook.editing_function is None and (rt.store == "none" or (
            rt.store == "root" and placement.tp_dim is None)):
        return _edit_here(hook, rt, module, local) if peers.is_root else None  # nothing to move: no collective
    key = (name, hook.hook_type)
    shapes, full, rt.capacity[key] = C.exchange(peers, local, placement, error, device, name, send=needed,
                                                everyone=rt.store == "all", capacity=rt.capacity.get(key, 0))
    if not needed:
        return None
    local_value = local.detach()
    scale = peers.dp if kind.is_grad and placement.dp_dim is not None and rt.dp_grad_mean else 1
    if full is not None and scale != 1:
        full = full / scale
    # A capture can skip its copy when the exchange made a new tensor that no edit will touch.
    fresh = full is not None and full is not local_value and hook.editing_function is None
    if full is not None and (rt.store == "all" or (rt.store == "root" and peers.is_root)):
        rt.store_value(name, full, fresh=fresh)
    if hook.editing_function is None:
        return None

    track = torch.is_grad_enabled() and not kind.is_grad
    leaf = edited = None
    if peers.is_root:
        try:
            with torch.set_grad_enabled(track):
                leaf = full.detach().requires_grad_(track)
                edited = _run_edit(hook, rt, module, leaf)
        except Exception as e:
            C.broadcast_status(peers, C.FAILED, e, device, name)
        status = C.UNCHANGED if edited is None else C.OK
        status, flag = C.broadcast_status(peers, status, None, device, name,
                                          flag=int(edited is not None and edited.requires_grad))
        if edited is not None and scale != 1:
            edited = edited * scale
    else:
        status, flag = C.broadcast_status(peers, C.OK, None, device, name)
    if status == C.UNCHANGED:
        return None
    if flag:
        dp_mean = peers.dp if placement.dp_dim is not None and rt.dp_grad_mean else 1  # trainable modules' grads
        job = C.EditedOnRoot(peers, placement, shapes, leaf, edited, grad_scale=dp_mean)
        return C.ScatterEdit.apply(local, torch.empty(0, requires_grad=True), job)
    return C.scatter_from_root(peers, edited.detach() if edited is not None else None, placement, shapes, local)
