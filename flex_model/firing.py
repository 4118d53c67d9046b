"""One hook firing: unpack → gather → store → edit → scatter → repack.

``HOOK_KINDS`` is the one table from a hook type to the torch method that
registers it and to the hooked value's side. A ``Registration`` is the
wrapper's record of one registered hook. ``fire`` runs one firing:

1. unpack: pick the ``unpack_idx``-th tensor leaf; a DTensor becomes its
   local shard; infer the ``Placement`` of that shard.
2. gather: on one process, nothing; otherwise one all-to-all over the
   pipeline stage carries every rank's header (shape, error status) to all
   ranks and its piece to the root (``collectives.exchange``), so any
   rank's error surfaces on all.
3. store: the full, detached value (before the edit) goes to ``output_dict``
   (on CPU unless ``offload_to_cpu=False``) on the root, on every rank, or
   nowhere (``store``); pipeline stages other than the owner's queue it. On
   CUDA the copy to host runs on a side stream and the capture is put in
   place when the pass ends (``Runtime.store_value``, ``Runtime.sync``).
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
the raw concatenation instead (the rule is ``placement.dp_grad_divisor``).
"""
from __future__ import annotations

import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Callable, Dict, Iterator, List, Literal, Optional, Set, Tuple

import torch
from torch import nn

from flex_model import collectives as C
from flex_model.hook_function import HookFunction, Scope, ShardInfo, ShardwiseEdit
from flex_model.layout import ParallelLayout, Stage
from flex_model.placement import LocalValue, Placement, dp_grad_divisor, infer_placement, is_dtensor, to_local
from flex_model.tree import replace_leaf, tensor_leaves

Store = Literal["root", "all", "none"]


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


# Where torch keeps a module's (or a tensor's) hooks, by handle id.
_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
               "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called")
_UNSET = object()


@dataclass(eq=False)
class Registration:
    """One registration of a ``HookFunction`` on one FlexModel (owned by the wrapper, not the hook).

    ``target`` is the module or parameter the torch hook sits on and
    ``handle`` its torch handle (both None while the target lives on another
    pipeline stage); ``capacity`` the exchange chunk size in bytes of each
    stage rank, the largest piece it has sent so far (the same list on every rank).
    """

    hook: HookFunction
    kind: HookKind
    target: Any = None
    handle: Any = None
    capacity: List[int] = field(default_factory=list)  # per stage index; empty until the first exchange
    scope: Scope = "global"
    hook_id: Optional[int] = None  # the torch handle's id, kept as an int (torch.compile cannot trace handles)
    _prior_full_backward: Any = _UNSET  # the target's ``_is_full_backward_hook`` before we registered

    @property
    def hook_type(self) -> str:
        return self.kind.name

    @property
    def name(self) -> str:
        return self.hook.module_name

    def stage(self, layout: ParallelLayout) -> Optional[Stage]:
        """The ranks this hook's firings gather over: the pipeline stage, or in replica scope this rank's
        replica's tensor-parallel ranks (None: one rank, nothing to gather)."""
        return layout.stage if self.scope == "global" else layout.replica

    def defers(self, rt: "Runtime") -> bool:
        """Whether a failure of this hook on one rank is kept until the end of the pass: where no exchange
        of ours follows it (shardwise edits, captures nobody keeps without data parallelism), and in replica
        scope always (its exchanges span one replica; the other replicas learn of it at the pass end)."""
        return isinstance(self.hook.editing_function, ShardwiseEdit) or _nothing_moves(self, rt) or (
            self.scope == "replica" and rt.layout.stage is not None)

    def detach(self) -> None:
        """Remove the torch hook and undo what registering it set on the target (idempotent)."""
        if self.handle is not None:
            self.handle.remove()
            self._restore_flag(self.target)
            self.handle = None

    def strip_from(self, target: Any) -> None:
        """Remove this hook from ``target``, a deep copy of the target it was registered on."""
        if self.handle is not None:
            for attr in _HOOK_DICTS:
                hooks = getattr(target, attr, None)
                if isinstance(hooks, dict):
                    hooks.pop(self.handle.id, None)
            self._restore_flag(target)

    def _restore_flag(self, target: Any) -> None:
        # torch marks a module with full backward hooks and never unmarks it; a later
        # register_backward_hook by the user would then raise.
        if self._prior_full_backward is not _UNSET and not target._backward_hooks:
            target._is_full_backward_hook = self._prior_full_backward

    def __repr__(self) -> str:
        return f"Registration({self.hook!r}, {self.hook_type})"


@dataclass
class Runtime:
    """The state every hook of one FlexModel fires against.

    ``failure``: the first hook failure of this pass that was kept instead of
    raised (a rank-local failure where no collective of ours follows: raising
    there would leave the peers in the model's own collectives); the
    end-of-pass ``agree`` turns it into an error on every rank.
    """

    layout: ParallelLayout
    output_dict: Dict[str, List[torch.Tensor]]
    save_ctx: SimpleNamespace
    modules: nn.ModuleDict
    store: Store = "root"
    offload_to_cpu: bool = True
    dp_grad_mean: bool = True
    active: Optional[Set[Registration]] = None  # None: every hook fires
    outbox: List[Tuple[str, torch.Tensor, Scope]] = field(default_factory=list)  # pipeline captures to ship
    failure: Optional[Tuple[str, BaseException]] = None
    backward_check_queued: bool = False
    firings: int = 0  # since the last FlexModel.comm_stats()
    async_copies: bool = True  # CUDA captures offloaded by a side-stream copy (see ``store_value``)
    # Captures whose host copy may still run: (name, host tensor, scope, kept here, event or None).
    pending: List[Tuple[str, torch.Tensor, Scope, bool, Any]] = field(default_factory=list)
    _windows: int = 0  # open ``deferred_copies`` blocks
    _sync_task: Optional[int] = None  # the backward pass (graph task) whose end runs ``sync``
    _copy_streams: Dict[Any, Any] = field(default_factory=dict)  # CUDA device -> side stream

    def keep_failure(self, reg: Registration, error: BaseException) -> None:
        """Keep ``error`` until the end of the pass (the first one wins); in a backward pass, make sure
        the end-of-backward agreement runs."""
        if self.failure is None:
            error.add_note(f'raised in hook "{reg.name}" ({reg.hook_type}) on rank {self.layout.rank}; kept '
                           "until the end of the pass so that every rank raises")
            self.failure = (reg.name, error)

    def agree(self, when: str) -> None:
        """Every rank of the stage raises if a failure was kept on any (a collective over the stage)."""
        failure, self.failure = self.failure, None
        C.agree(self.layout.stage, failure, when)

    def store_value(self, name: str, full: torch.Tensor, fresh: bool = False, scope: Scope = "global") -> None:
        """Keep ``full`` (a copy, unless ``fresh``: already a new tensor nobody else holds) in
        ``output_dict`` on its owner (the replica's, in replica scope), or queue it for shipping there.

        Off the critical path on CUDA: while the host will wait anyway before user code can see the
        capture — inside ``deferred_copies`` (``FlexModel.forward``), or in a backward pass, whose end
        runs ``sync`` — a CUDA value offloaded to CPU is copied to pinned memory on a side stream
        (``_host_copy``) and the firing returns at once; the capture is held in ``pending`` and enters
        ``output_dict`` (or the outbox) only in ``sync``, after its copy's event completed. Elsewhere
        (the wrapped module called directly), on CPU, under gloo, and for values kept on the GPU, the
        copy is made here, as it always was. Either way ``output_dict`` receives the same values in the
        same order, and never a tensor whose copy may still be running."""
        value, event = full.detach(), None
        if self.offload_to_cpu and value.device.type in ASYNC_DEVICES and self.async_copies \
                and self._copies_can_wait():
            value, event = _host_copy(value, fresh, self._copy_streams)
        elif self.offload_to_cpu and value.device.type != "cpu":
            value = value.cpu()
        elif not fresh:
            value = value.clone()
        owner = self.layout.owner if scope == "global" else self.layout.replica_owner
        here = self.store == "all" or self.layout.rank == owner
        if event is None and not self.pending:
            self._keep(name, value, scope, here)
        else:  # behind a pending copy: wait in line, so that output_dict keeps the firing order
            self.pending.append((name, value, scope, here, event))

    def _keep(self, name: str, value: torch.Tensor, scope: Scope, here: bool) -> None:
        if here:
            self.output_dict.setdefault(name, []).append(value)
        else:
            self.outbox.append((name, value, scope))

    def _copies_can_wait(self) -> bool:
        """Whether a sync is sure to run before user code sees this pass's captures: inside
        ``deferred_copies``, or in a backward pass (its end gets a ``sync``, queued here once)."""
        if self._windows:
            return True
        task_id = getattr(torch._C, "_current_graph_task_id", lambda: -1)()
        if task_id == -1:
            return False
        if self._sync_task != task_id:
            from torch.autograd import Variable

            def end_of_backward() -> None:
                self._sync_task = None
                self.sync()

            self._sync_task = task_id
            Variable._execution_engine.queue_callback(end_of_backward)
        return True

    def sync(self) -> None:
        """Wait for every pending host copy, then put each capture where it goes, in firing order (on
        CPU, or with nothing pending, this does nothing)."""
        if not self.pending:
            return
        pending, self.pending = self.pending, []
        for name, value, scope, here, event in pending:
            if event is not None:
                event.synchronize()
            self._keep(name, value, scope, here)

    @contextmanager
    def deferred_copies(self) -> Iterator[None]:
        """A block (a forward pass) at whose end every pending copy is waited for (``sync``), even if it
        raises: inside it, captures' host copies run asynchronously."""
        self._windows += 1
        try:
            yield
        finally:
            self._windows -= 1
            if not self._windows:
                self.sync()


ASYNC_DEVICES = ("cuda",)  # devices whose offloaded captures are copied asynchronously


def _host_copy(value: torch.Tensor, fresh: bool, streams: Dict[Any, Any]) -> Tuple[torch.Tensor, Any]:
    """Start copying the CUDA tensor ``value`` to pinned host memory; ``(host tensor, CUDA event)``.

    The copy runs on a side stream (one per device) that first waits for the work queued so far on
    the current stream, which produced ``value``; the event marks its end. A ``value`` that others
    hold (not ``fresh``: the module's own output, an edit's input) is first cloned on the current
    stream — a device-to-device copy, fast next to the transfer — so that a write to it queued later
    (an in-place activation, an edit) cannot race the transfer; ``record_stream`` keeps the source's
    memory from being reused before the side stream has read it."""
    device = value.device
    side = streams.get(device)
    if side is None:
        side = streams[device] = torch.cuda.Stream(device)
    src = value if fresh else value.clone()
    host = torch.empty_like(src, device="cpu", pin_memory=True)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        host.copy_(src, non_blocking=True)
        event = torch.cuda.Event()
        event.record(side)
    src.record_stream(side)
    return host, event


def attach(reg: Registration, rt: Runtime, target: Any, module: nn.Module, param_name: str = "") -> None:
    """Put ``reg``'s hook on ``target`` (a module, or a parameter of ``module``); keep target and handle."""
    kind = reg.kind

    def fire_here(mod: nn.Module, value: Any, args: Any) -> Any:
        return fire(reg, rt, mod, value, args, param_name)

    reg.target = target
    if kind.name == "full_backward":
        reg._prior_full_backward = target._is_full_backward_hook
    if kind.adapt is None:
        reg.handle = kind.register(target, lambda grad: fire_here(module, grad, None))
    else:
        reg.handle = kind.register(target, kind.adapt(fire_here))
    reg.hook_id = reg.handle.id


def fire(reg: Registration, rt: Runtime, module: nn.Module, value: Any, args: Any, param_name: str = "") -> Any:
    """One firing of ``reg`` on ``value``; returns the repacked value, or None for unchanged.

    A failure on this rank never raises between collectives its peers enter:
    before an exchange it travels in the exchange's header (every rank
    raises there); where no exchange follows (shardwise edits, captures
    nobody keeps) it is kept until the end of the pass (``Runtime.agree``)
    and the value is left unchanged, so the model's own collectives stay
    paired."""
    if rt.active is not None and reg not in rt.active:
        return None
    hook, kind = reg.hook, reg.kind
    rt.firings += 1
    if kind.is_grad and not tensor_leaves(value):  # e.g. grad_input of a module called with keyword args
        warnings.warn(f'hook "{hook.module_name}" ({kind.name}) got no gradient tensors (its inputs were '
                      "passed as keyword arguments or need no grad); nothing captured or edited", stacklevel=2)
        return None
    stage, everyone = reg.stage(rt.layout), rt.layout.stage  # where it gathers; where a failure must reach
    replica = reg.scope == "replica"
    if everyone is not None and kind.is_grad and reg.defers(rt) and not rt.backward_check_queued:
        _queue_backward_check(rt)
    shardwise = isinstance(hook.editing_function, ShardwiseEdit)
    error, local, placement, rewrap, new = None, None, None, None, None
    try:
        leaf = _pick_leaf(reg, value)
        local, dtensor_dim, rewrap = to_local(leaf)
        seen = LocalValue(hook.module_name, module, kind.side, local, is_grad=kind.is_grad, param_name=param_name,
                          from_dtensor=is_dtensor(leaf), dtensor_tp_dim=dtensor_dim,
                          hook_id=reg.hook_id, hooked=value, leaf_index=hook.unpack_idx)
        placement = infer_placement(seen, rt.layout, hook.expected_shape, dp=1 if replica else None)
        if shardwise:
            new = _edit_shardwise(reg, rt, module, local, placement, args)
        elif stage is None:
            new = _edit_here(reg, rt, module, local)
    except Exception as e:
        if everyone is None:
            raise
        error = e
    if stage is not None and not shardwise:
        if _nothing_moves(reg, rt):
            new = _edit_here(reg, rt, module, local) if stage.is_root and error is None else None
        else:
            try:
                new, error = _edit_across(reg, rt, stage, module, local, placement, error), None
            except Exception as e:  # raised on every rank of the replica; the other replicas are told at
                if not replica:     # the end of the pass (a global stage's exchange told every rank)
                    raise
                error, new = e, None
    if error is not None:
        rt.keep_failure(reg, error)
        return None
    if new is None:
        return None
    return replace_leaf(value, hook.unpack_idx, rewrap(new))


def _queue_backward_check(rt: Runtime) -> None:
    """Run the agreement once at the end of this backward pass (every rank of the stage fires the same
    gradient hooks, so every rank queues it)."""
    from torch.autograd import Variable

    def check() -> None:
        rt.backward_check_queued = False
        rt.agree("backward pass")

    rt.backward_check_queued = True
    Variable._execution_engine.queue_callback(check)


def _pick_leaf(reg: Registration, value: Any) -> torch.Tensor:
    leaves, idx = tensor_leaves(value), reg.hook.unpack_idx
    if not -len(leaves) <= idx < len(leaves):
        raise IndexError(f'unpack_idx {idx} is out of range on hook "{reg.name}" ({reg.hook_type}): the hooked '
                         f"value has {len(leaves)} tensor(s) {[tuple(t.shape) for t in leaves]}; pick an index "
                         f"below {len(leaves)}")
    return leaves[idx]


def _run_edit(reg: Registration, rt: Runtime, module: nn.Module, x: torch.Tensor) -> Optional[torch.Tensor]:
    """Call the user's editing function on the full tensor and validate its result."""
    name = reg.name
    rt.sync()  # the edit sees every capture made so far in output_dict, as with synchronous copies
    try:
        y = reg.hook.editing_function(module, x, rt.save_ctx, rt.modules)
    except Exception as e:
        e.add_note(f'raised in the editing function of hook "{name}" ({reg.hook_type}) on rank {rt.layout.rank}')
        raise
    if y is None:
        return None
    if not isinstance(y, torch.Tensor):
        raise TypeError(f'the editing function of hook "{name}" returned {type(y).__name__}; '
                        "return a tensor like its input, or None to leave the value unchanged")
    if y.shape != x.shape or y.dtype != x.dtype or y.device != x.device:
        raise ValueError(f'the editing function of hook "{name}" returned shape {tuple(y.shape)} '
                         f"{y.dtype} on {y.device}, but its input is shape {tuple(x.shape)} {x.dtype} on "
                         f"{x.device}; return a tensor of the input's shape, dtype and device")
    return y


def _edit_here(reg: Registration, rt: Runtime, module: nn.Module, local: torch.Tensor) -> Optional[torch.Tensor]:
    """The whole value is on this rank: store it, edit it in the autograd graph."""
    if rt.store != "none":
        rt.store_value(reg.name, local, scope=reg.scope)
    if reg.hook.editing_function is None:
        return None
    return _run_edit(reg, rt, module, local)


def _edit_shardwise(reg: Registration, rt: Runtime, module: nn.Module, local: torch.Tensor,
                    placement: Placement, args: Any) -> Optional[torch.Tensor]:
    shard = ShardInfo(tp_dim=placement.tp_dim, tp_rank=rt.layout.my["tp"], tp_size=rt.layout.tp,
                      dp_dim=placement.dp_dim, module_args=args)
    rt.sync()  # as in _run_edit: user code sees every capture made so far
    y = reg.hook.editing_function.edit_shard(module, local, shard, rt.modules)
    if y is not None and (y.shape != local.shape or y.dtype != local.dtype):
        raise ValueError(f'the shardwise edit of hook "{reg.name}" returned shape {tuple(y.shape)} '
                         f"{y.dtype} for a shard of shape {tuple(local.shape)} {local.dtype}")
    return y


# -- a firing across a stage: decide → exchange → store → edit on root → verdict → scatter ----------------
def _edit_across(reg: Registration, rt: Runtime, stage: Stage, module: nn.Module, local: Optional[torch.Tensor],
                 placement: Optional[Placement], error: Optional[BaseException]) -> Optional[torch.Tensor]:
    """The value is split over the stage: gather to the root, edit there once, scatter back."""
    shapes, full = _exchange(reg, rt, stage, local, placement, error)
    divisor = dp_grad_divisor(placement, stage.dp, rt.dp_grad_mean)
    value_divisor = divisor if reg.kind.is_grad else 1  # a gathered gradient is shown as the framework's
    if full is not None:
        full = _store(reg, rt, stage, full, local, value_divisor)
    if reg.hook.editing_function is None:
        return None
    leaf, edited = _edit_on_root(reg, rt, stage, module, full, local.device)
    status, tracked = _verdict(stage, edited, local.device, reg.name)
    if status == C.UNCHANGED:
        return None
    if edited is not None and value_divisor != 1:
        edited = edited * value_divisor  # back to the gradient the ranks hold
    return _scatter(stage, local, placement, shapes, leaf, edited, tracked, divisor)


def _nothing_moves(reg: Registration, rt: Runtime) -> bool:
    """Without dp (or in replica scope), a capture nobody keeps needs no collective. Decided without the
    value's placement, so every rank of the stage decides alike even when one failed to infer it."""
    return (rt.layout.dp == 1 or reg.scope == "replica") and reg.hook.editing_function is None and \
        rt.store == "none"


def _exchange(reg: Registration, rt: Runtime, stage: Stage, local: Optional[torch.Tensor],
              placement: Optional[Placement], error: Optional[BaseException],
              ) -> Tuple[List[Tuple[int, ...]], Optional[torch.Tensor]]:
    """Every rank's header to all, the pieces to the root (to all for ``store="all"``) when anything keeps
    or edits them; raises on every rank if any rank failed before it. ``(shapes, full or None)``."""
    needed = reg.hook.editing_function is not None or rt.store != "none"
    device = local.device if local is not None else C.comm_device(stage.group)
    shapes, full, reg.capacity = C.exchange(stage, local, placement, error, device, reg.name, send=needed,
                                            everyone=rt.store == "all", capacity=reg.capacity)
    return shapes, (full if needed else None)


def _store(reg: Registration, rt: Runtime, stage: Stage, full: torch.Tensor, local: torch.Tensor,
           divisor: int) -> torch.Tensor:
    """Keep the full value (before the edit) where ``store`` says; return it as the edit sees it."""
    if divisor != 1:
        full = full / divisor
    # A capture can skip its copy when the exchange made a new tensor that no edit will touch.
    fresh = full is not local and reg.hook.editing_function is None
    if rt.store == "all" or (rt.store == "root" and stage.is_root):
        rt.store_value(reg.name, full, fresh=fresh, scope=reg.scope)
    return full


def _edit_on_root(reg: Registration, rt: Runtime, stage: Stage, module: nn.Module, full: Optional[torch.Tensor],
                  device: torch.device) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """``(leaf, edit(leaf))`` on the root — in a graph of its own when the forward tracks gradients —
    and ``(None, None)`` elsewhere. A failure is broadcast to the stage, so every rank raises."""
    if not stage.is_root:
        return None, None
    # Only floating point values carry gradients (token ids are edited without a graph).
    track = torch.is_grad_enabled() and not reg.kind.is_grad and (full.is_floating_point() or full.is_complex())
    try:
        with torch.set_grad_enabled(track):
            leaf = full.detach().requires_grad_(track)
            x = leaf.clone() if track else leaf  # an edit may change its input in place, as on one process
            version = x._version
            edited = _run_edit(reg, rt, module, x)
            if edited is None and x._version != version:
                edited = x  # changed in place and returned None: on one process the module's value changed
            return leaf, edited
    except Exception as e:
        C.broadcast_status(stage, C.FAILED, e, device, reg.name)  # re-raises e here, HookFailure elsewhere
        raise


def _verdict(stage: Stage, edited: Optional[torch.Tensor], device: torch.device, name: str) -> Tuple[int, bool]:
    """The root's ``(status, tracked)`` on every rank: ``C.OK`` or ``C.UNCHANGED``, and whether the
    edited tensor carries a graph (so the scatter must be differentiable)."""
    tracked = int(edited is not None and edited.requires_grad)
    status, flag = C.broadcast_status(stage, C.UNCHANGED if edited is None else C.OK, None, device, name,
                                      flag=tracked)
    return status, bool(flag)


def _scatter(stage: Stage, local: torch.Tensor, placement: Placement, shapes: List[Tuple[int, ...]],
             leaf: Optional[torch.Tensor], edited: Optional[torch.Tensor], tracked: bool,
             divisor: int) -> torch.Tensor:
    """This rank's piece of the root's edited tensor; differentiable when the edit is tracked
    (trainable modules in the edit get their gradients divided by ``divisor``, see ``dp_grad_divisor``)."""
    if tracked:
        job = C.EditedOnRoot(stage, placement, shapes, leaf, edited, grad_scale=divisor)
        return C.ScatterEdit.apply(local, torch.empty(0, requires_grad=True), job)
    return C.scatter_from_root(stage, edited.detach() if edited is not None else None, placement, shapes, local)
