"""``FlexModel``: wraps a module, leaves it untouched, owns the hooks put on it.

Registration resolves a name (``names``), attaches one torch hook per
HookFunction (``firing.attach``) and tags it ``"all"`` (``groups``).
``forward(..., groups=, complement=)`` chooses which hooks fire in that pass
(and in its backward). ``restore()`` removes every hook the wrapper added,
releases its process groups and returns the original module.
"""
from __future__ import annotations

import re
from types import SimpleNamespace
from typing import Any, Dict, Iterable, List, Optional, Sequence, Union

import torch
import torch.distributed as dist
from torch import nn

from flex_model import collectives as C
from flex_model.firing import HOOK_KINDS, Runtime, attach
from flex_model.groups import ALL, HookGroups
from flex_model.hook_function import EditingFunction, ExpectedShape, HookFunction
from flex_model.layout import FAIRSCALE_ORDER, ParallelLayout, StageGroups, check_against_frameworks
from flex_model.names import NameResolver
from flex_model.parameters import full_parameter
from flex_model.pipeline import ship_to_owner

HookSpec = Union[HookFunction, Sequence[HookFunction], str]
HOOK_TYPE_ALIASES = {"backward": "full_backward", "backward_pre": "full_backward_pre"}  # flex-model 0.1.0 names


class HookHandle:
    """Returned by every ``register_*`` call; ``remove()`` removes that hook alone (idempotent)."""

    def __init__(self, owner: "FlexModel", hook: HookFunction) -> None:
        self._owner, self.hook = owner, hook

    def remove(self) -> None:
        self._owner._remove(self.hook)


class FlexModel(nn.Module):
    """Wrap ``module``; hooks registered through this wrapper see full, unsharded values.

    Sizes describe how the wrapped group (``process_group``, default: the
    world) splits into data, pipeline and tensor parallel axes, in
    ``parallel_order`` (fairscale's ``("dp", "pp", "tp")`` by default;
    Megatron-LM uses ``("pp", "dp", "tp")``). Alternatively pass a
    ``device_mesh`` with dims named dp/pp/tp, or a ready ``layout``. With all
    sizes 1 on a multi-rank job, the layout is read off the model (fairscale
    state, a DTensor mesh, DDP/FSDP = data parallel over the world).

    ``store``: where ``output_dict`` entries are kept — ``"root"`` (the owner,
    global rank of dp 0 / pp 0 / tp 0), ``"all"`` ranks, or ``"none"``.
    ``output_dict[name]`` is a list with one full, detached tensor per
    firing, captured before the edit, on CPU unless ``offload_to_cpu=False``.
    """

    def __init__(self, module: nn.Module, output_dict: Dict[str, List[torch.Tensor]],
                 tensor_parallel_size: int = 1, pipeline_parallel_size: int = 1, data_parallel_size: int = 1,
                 process_group: Optional[dist.ProcessGroup] = None, *, device_mesh: Any = None,
                 layout: Optional[ParallelLayout] = None, parallel_order: Sequence[str] = FAIRSCALE_ORDER,
                 batch_dim: int = 0, store: str = "root", offload_to_cpu: bool = True,
                 dp_grad_mean: bool = True) -> None:
        super().__init__()
        if not isinstance(module, nn.Module):
            raise TypeError(f"FlexModel wraps an nn.Module, got {type(module).__name__}")
        if not isinstance(output_dict, dict):
            raise TypeError(f"output_dict must be a dict (it receives the captured tensors), got {type(output_dict).__name__}")
        if store not in ("root", "all", "none"):
            raise ValueError(f'store must be "root", "all" or "none", got {store!r}')
        self.module = module
        self.trainable_modules = nn.ModuleDict()
        self.output_dict = output_dict
        self.save_ctx = SimpleNamespace()
        self.process_group = process_group
        self.layout = layout or _choose_layout(module, tensor_parallel_size, pipeline_parallel_size,
                                               data_parallel_size, process_group, device_mesh, parallel_order,
                                               batch_dim)
        if not self.layout.is_single:
            check_against_frameworks(self.layout)
        self._stage_groups = None if self.layout.is_single else StageGroups(self.layout)
        peers = None
        if self._stage_groups is not None and self._stage_groups.stage is not None:
            ranks = tuple(self._stage_groups.stage_ranks)
            peers = C.StagePeers(self._stage_groups.stage, ranks, self.layout.dp, self.layout.tp,
                                 ranks.index(self.layout.rank))
        self._runtime = Runtime(self.layout, peers, output_dict, self.save_ctx, self.trainable_modules,
                                store=store, offload_to_cpu=offload_to_cpu, dp_grad_mean=dp_grad_mean)
        self._groups = HookGroups()
        self._names = NameResolver(module)
        self._restored = False

    # -- registration ------------------------------------------------------------
    def register_forward_hook(self, hook_function: HookFunction) -> HookHandle:
        return self._register(hook_function, "forward")

    def register_forward_pre_hook(self, hook_function: HookFunction) -> HookHandle:
        return self._register(hook_function, "forward_pre")

    def register_full_backward_hook(self, hook_function: HookFunction) -> HookHandle:
        return self._register(hook_function, "full_backward")

    def register_full_backward_pre_hook(self, hook_function: HookFunction) -> HookHandle:
        return self._register(hook_function, "full_backward_pre")

    def register_hook(self, hook_function: HookFunction) -> HookHandle:
        """A tensor hook on the gradient of the parameter named ``hook_function.module_name``."""
        return self._register(hook_function, "tensor")

    def _register(self, hook: HookFunction, hook_type: str) -> HookHandle:
        self._check_alive()
        if not isinstance(hook, HookFunction):
            raise TypeError(f"expected a HookFunction, got {type(hook).__name__}")
        if hook in self._groups or hook._handle is not None:
            raise ValueError(f"{hook!r} is already registered; create a new HookFunction, or remove the "
                             "first registration's handle")
        target = self._resolve(hook.module_name, hook_type)
        if hook_type == "tensor":
            _refuse_fsdp_tensor_hook(self.module, hook.module_name)
        hook.hook_type = hook_type
        if target is not None:
            if hook_type == "tensor":
                _, owner, param = target
                hook._handle = attach(hook, self._runtime, param, owner, hook.module_name.rsplit(".", 1)[-1])
            else:
                hook._handle = attach(hook, self._runtime, target[1], target[1])
        self._groups.add(hook)
        return HookHandle(self, hook)

    def _resolve(self, name: str, hook_type: str) -> Any:
        """The module (or parameter) a hook goes on; None if it lives on another pipeline stage."""
        lookup = self._names.parameter if hook_type == "tensor" else self._names.module
        try:
            target, error = lookup(name), None
        except ValueError as e:
            target, error = None, e
        if self.layout.pp == 1:
            if error is not None:
                raise error
            return target
        found = torch.tensor([int(target is not None)])
        dist.all_reduce(found, op=dist.ReduceOp.MAX, group=self.process_group)
        if not found.item():
            raise error
        return target

    def _remove(self, hook: HookFunction) -> None:
        if hook._handle is not None:
            hook._handle.remove()
            hook._handle = None
        self._groups.discard(hook)
        if self._runtime.active is not None:
            self._runtime.active.discard(hook)

    # -- hook groups --------------------------------------------------------------
    def create_hook_group(self, group_name: str, group_constructor: str, expected_shape: ExpectedShape = None,
                          editing_function: Optional[EditingFunction] = None, unpack_idx: int = 0,
                          hook_type: str = "forward", *, regex: bool = False) -> List[HookFunction]:
        """One HookFunction per module whose name contains ``group_constructor`` (or matches it, with
        ``regex=True``), each registered as ``hook_type`` and tagged ``group_name``."""
        hook_type = HOOK_TYPE_ALIASES.get(hook_type, hook_type)
        if hook_type not in HOOK_KINDS:
            raise ValueError(f"unknown hook_type {hook_type!r}; choose one of {sorted(HOOK_KINDS)}")
        names = self._names.parameter_names() if hook_type == "tensor" else self._names.module_names()
        matches = [n for n in names if n and _matches(n, group_constructor, regex)]
        if not matches:
            raise ValueError(NameResolver._unknown(group_constructor, "module matching", names))
        hooks = [HookFunction(n, expected_shape, editing_function, unpack_idx) for n in matches]
        for h in hooks:
            self._register(h, hook_type)
        self._groups.tag(hooks, group_name)
        return hooks

    def update_hook_groups(self, hook_functions: HookSpec, group_name: str) -> None:
        """Tag the given HookFunction(s), or every hook whose module name contains a string."""
        self._groups.tag(self._select(hook_functions), group_name)

    def remove_hook_groups(self, hook_functions: HookSpec, group_name: str) -> None:
        """Untag as ``update_hook_groups`` tags; removing ``"all"`` is an error."""
        self._groups.untag(self._select(hook_functions), group_name)

    def get_hook_function_groups(self, hook_function: Optional[HookFunction] = None) -> Any:
        """The groups of ``hook_function`` (a set), or of every hook (a dict hook -> set)."""
        if hook_function is not None:
            return set(self._groups.tags(hook_function))
        return {h: set(self._groups.tags(h)) for h in self._groups.members()}

    def get_group_hook_functions(self, group_name: Optional[str] = None) -> Any:
        """The hooks of ``group_name`` (a list), or of every group (a dict group -> list)."""
        groups = self._groups.groups()
        if group_name is None:
            return groups
        if group_name not in groups:
            raise ValueError(f"unknown hook group {group_name!r}; known groups: {sorted(groups)}")
        return groups[group_name]

    def _select(self, spec: HookSpec) -> List[HookFunction]:
        if isinstance(spec, HookFunction):
            return [spec]
        if isinstance(spec, str):
            hooks = [h for h in self._groups.members() if spec in h.module_name]
            if not hooks:
                raise ValueError(f'no registered hook has a module name containing "{spec}"; registered: '
                                 f"{sorted({h.module_name for h in self._groups.members()})}")
            return hooks
        hooks = list(spec)
        bad = [h for h in hooks if not isinstance(h, HookFunction)]
        if bad:
            raise TypeError(f"expected HookFunctions, a HookFunction or a name substring; got {bad[:3]}")
        return hooks

    # -- running ---------------------------------------------------------------------
    def forward(self, *args: Any, groups: Union[str, Iterable[str]] = ALL, complement: bool = False,
                **kwargs: Any) -> Any:
        """Run the wrapped module with the hooks of ``groups`` (or all others, with ``complement``).

        The selection also governs this pass's backward hooks, so it stays in force until the
        next ``forward``: calling the wrapped module directly afterwards fires the same hooks."""
        self._check_alive()
        everything = groups == ALL and not complement
        self._runtime.active = None if everything else self._groups.select(groups, complement)
        return self.module(*args, **kwargs)

    def gather_pipeline_outputs(self) -> None:
        """Move what pipeline stages captured into the owner's ``output_dict``; call on every rank
        after the pipeline's forward (a collective over the stages' roots)."""
        roots = self._stage_groups.roots if self._stage_groups is not None else None
        if roots is None:
            return
        ship_to_owner(roots, self._stage_groups.root_ranks, self.layout.owner, self._runtime.outbox,
                      self.output_dict)
        self._runtime.outbox.clear()

    def clear_output_dict(self) -> None:
        self.output_dict.clear()

    # -- modules and parameters ---------------------------------------------------
    def register_trainable_module(self, name: str, module: nn.Module) -> None:
        """Make ``module`` available to every editing function as ``modules[name]``."""
        if name in self.trainable_modules:
            raise ValueError(f'a trainable module named "{name}" is already registered')
        self.trainable_modules[name] = module

    @property
    def trainable_modules_names(self) -> List[str]:
        return list(self.trainable_modules.keys())

    @property
    def wrapped_module_names(self) -> List[str]:
        return [n for n in self._names.module_names() if n]

    @property
    def all_modules_names(self) -> List[str]:
        return self.wrapped_module_names + [f"trainable_modules.{n}" for n in self.trainable_modules_names]

    def get_module_parameter(self, parameter_name: str, expected_shape: ExpectedShape = None) -> torch.Tensor:
        """The full, unsharded value of a parameter (collective under TP/FSDP: call on every rank).

        ``expected_shape`` (optional, as in the original API) is checked against the result."""
        full = full_parameter(self.module, self._names, parameter_name, self._runtime.peers, self.layout)
        if expected_shape is not None and (len(expected_shape) != full.ndim or any(
                e is not None and e != n for e, n in zip(expected_shape, full.shape))):
            raise ValueError(f'parameter "{parameter_name}" has full shape {tuple(full.shape)}, '
                             f"not expected_shape {tuple(expected_shape)}")
        return full

    # -- leaving --------------------------------------------------------------------------
    def restore(self) -> nn.Module:
        """Remove every hook this wrapper added, release its process groups, return the module."""
        for hook in self._groups.members():
            self._remove(hook)
        if self._stage_groups is not None:
            self._stage_groups.release()
        self._restored = True
        return self.module

    def _check_alive(self) -> None:
        if self._restored:
            raise RuntimeError("this FlexModel was restored; wrap the module again to add hooks or run it")

    def describe(self) -> str:
        """Where every hook sits and which groups it carries."""
        lines = [f"FlexModel({type(self.module).__name__}, layout dp={self.layout.dp} pp={self.layout.pp} "
                 f"tp={self.layout.tp}, {len(self._groups.members())} hooks)"]
        for hook in self._groups.members():
            tags = sorted(self._groups.tags(hook))
            edit = "edit" if hook.editing_function is not None else "capture"
            lines.append(f"  {hook.module_name:<40} {hook.hook_type:<18} {edit:<8} groups={tags}")
        if self.trainable_modules:
            lines.append(f"  trainable modules: {self.trainable_modules_names}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return self.describe()


def _refuse_fsdp_tensor_hook(module: nn.Module, name: str) -> None:
    """FSDP1 and FSDP2 run forward on unsharded copies of the parameters and set the registered
    parameter's ``.grad`` outside autograd: a tensor hook on it would silently never fire."""
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    if any(isinstance(m, (FullyShardedDataParallel, FSDPModule)) for m in module.modules()):
        raise ValueError(f'tensor hook on "{name}": under FSDP the registered parameter is not the tensor '
                         "used in forward, so its hook would never fire; hook the owning module's gradient "
                         "(register_full_backward_hook / register_full_backward_pre_hook), or read the reduced "
                         "gradient after backward (FSDP.summon_full_params(model, with_grads=True), or "
                         "param.grad.full_tensor() under fully_shard)")


def _matches(name: str, pattern: str, regex: bool) -> bool:
    return re.search(pattern, name) is not None if regex else pattern in name


def _choose_layout(module: nn.Module, tp: int, pp: int, dp: int, group: Optional[dist.ProcessGroup],
                   mesh: Any, order: Sequence[str], batch_dim: int) -> ParallelLayout:
    if mesh is not None:
        return ParallelLayout.from_device_mesh(mesh, batch_dim=batch_dim)
    defaults = tp == pp == dp == 1
    if defaults and dist.is_available() and dist.is_initialized() and \
            dist.get_world_size(group) > 1:
        return _read_layout(module, group, batch_dim)
    return ParallelLayout.from_sizes(tp=tp, pp=pp, dp=dp, group=group, order=order, batch_dim=batch_dim)


def _read_layout(module: nn.Module, group: Optional[dist.ProcessGroup], batch_dim: int) -> ParallelLayout:
    """The layout a framework already set up, when the user gave no sizes."""
    try:
        from fairscale.nn.model_parallel import initialize as fs

        if fs.model_parallel_is_initialized():
            return ParallelLayout.from_fairscale(batch_dim=batch_dim)
    except ImportError:
        pass
    from torch.distributed.tensor import DTensor

    for p in module.parameters():
        if isinstance(p, DTensor) and p.device_mesh.mesh_dim_names:
            return ParallelLayout.from_device_mesh(p.device_mesh, batch_dim=batch_dim)
    kinds = {type(m).__name__ for m in module.modules()}
    if kinds & {"DistributedDataParallel", "FullyShardedDataParallel"} or any(
            type(m).__name__.startswith("FSDP") for m in module.modules()):
        return ParallelLayout.from_sizes(dp=dist.get_world_size(group), group=group, batch_dim=batch_dim)
    raise ValueError(f"the job has {dist.get_world_size(group)} ranks but no parallel sizes were given and none "
                     "could be read off the model; pass tensor_parallel_size / pipeline_parallel_size / "
                     "data_parallel_size (their product must be the group size) or device_mesh=")
