"""``FlexModel``: wraps a module, leaves it untouched, owns the hooks put on it.

Registration resolves a name (``names``), keeps one ``Registration`` record
per registered hook (``firing.attach`` puts the torch hook on) and tags it
``"all"`` (``groups``). ``forward(..., groups=, complement=)`` chooses which
hooks fire in that pass (and in its backward). ``restore()`` removes every
hook the wrapper added, releases its process groups and returns the module
exactly as it was.

The public surface extensions build on (``activations``, ``expansion``,
``cache``, ``patching``, ``generation`` and a user's own):
``register(hook_function, hook_type)``, ``remove_hook``, ``storing(store)``,
``get_module(name)``, ``registrations()``, ``select_groups``,
``comm_stats()`` and ``copy_without_hooks()``. Hook points inside modules
and standard aliases are ``flex_model.hook_points``' (``add_hook_points``,
``hook_point``, ``hook_points``, ``aliases``).
"""
from __future__ import annotations

import copy
import re
from contextlib import contextmanager
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Union

import torch
import torch.distributed as dist
from torch import nn

from flex_model import collectives as C
from flex_model.firing import HOOK_KINDS, Registration, Runtime, Store, attach
from flex_model.frameworks import choose_layout, uses_fsdp
from flex_model.groups import ALL, HookGroups
from flex_model.hook_function import SCOPES, EditingFunction, ExpectedShape, HookFunction, HookType, Scope
from flex_model.layout import ParallelLayout
from flex_model.names import NameResolver, unknown_name
from flex_model.parameters import full_parameter
from flex_model.pipeline import ship_to_owner

HookSpec = Union[HookFunction, Sequence[HookFunction], str]
HOOK_TYPE_ALIASES = {"backward": "full_backward", "backward_pre": "full_backward_pre"}  # flex-model 0.1.0 names
STORES = ("root", "all", "none")


class HookHandle:
    """Returned by every ``register_*`` call; ``remove()`` removes that registration alone (idempotent)."""

    def __init__(self, owner: "FlexModel", registration: Registration) -> None:
        self._owner, self.registration = owner, registration

    @property
    def hook(self) -> HookFunction:
        return self.registration.hook

    def remove(self) -> None:
        self._owner._remove(self.registration)


class FlexModel(nn.Module):
    """Wrap ``module``; hooks registered through this wrapper see full, unsharded values.

    Sizes describe how the wrapped group (``process_group``, default: the
    world) splits into data, pipeline and tensor parallel axes, in
    ``parallel_order`` (outermost first; None: the framework's when one is
    set up, else fairscale's ``("dp", "pp", "tp")``; Megatron-LM uses
    ``("pp", "dp", "tp")``). Alternatively pass any ``device_mesh`` (its
    data-parallel dims — dp, fsdp, dp_replicate, dp_shard, ... — merge into
    dp; ``mesh_axes={"name": "dp"}`` places a dim of another name), or a
    ready ``layout`` (the wrapper builds its process groups on a copy of it).
    With nothing given on a multi-rank job, the layout is read off the model
    and the framework state (FSDP2 and DTensor meshes, megatron-core,
    fairscale, DDP / FSDP1), in ``flex_model.frameworks``; what was given is
    checked against that state, on every rank. ``layout.source`` says where
    the layout came from. ``dp_grad_mean`` None follows the framework's
    gradient convention (mean, or sum for FSDP2 with a divide factor of 1).

    ``scope``: where a firing gathers (a HookFunction's own ``scope`` wins).
    ``"global"``: over the whole pipeline stage, every data-parallel replica's
    batch slice — the edit runs once, on the global batch. ``"replica"``: over
    the tensor-parallel ranks of one data-parallel replica — the edit runs once
    per replica, on that replica's (TP-unsharded) batch slice, on the
    replica's root, and captures land in the ``output_dict`` of the replica's
    owner (its rank pp 0, tp 0); no firing collective spans data-parallel
    ranks (a failure still reaches every rank, by one small all-gather at the
    end of the pass). Gradients in replica scope are those of the replica's
    own loss (no division by dp); trainable modules get per-replica gradients
    (all-reduce them before the optimizer step).

    ``store``: where ``output_dict`` entries are kept — ``"root"`` (the owner,
    global rank of dp 0 / pp 0 / tp 0), ``"all"`` ranks, or ``"none"``.
    ``output_dict[name]`` is a list with one full, detached tensor per
    firing, captured before the edit, on CPU unless ``offload_to_cpu=False``.

    A HookFunction may be registered on several wrappers and, on one wrapper,
    once per hook type (each registration is its own record, with its own
    handle and groups); registering it twice as the same type on the same
    wrapper is an error.
    """

    def __init__(self, module: nn.Module, output_dict: Dict[str, List[torch.Tensor]],
                 tensor_parallel_size: int = 1, pipeline_parallel_size: int = 1, data_parallel_size: int = 1,
                 process_group: Optional[dist.ProcessGroup] = None, *, device_mesh: Any = None,
                 layout: Optional[ParallelLayout] = None, parallel_order: Optional[Sequence[str]] = None,
                 batch_dim: int = 0, store: Store = "root", offload_to_cpu: bool = True,
                 dp_grad_mean: Optional[bool] = None, mesh_axes: Optional[Dict[str, str]] = None,
                 scope: Scope = "global") -> None:
        super().__init__()
        if not isinstance(module, nn.Module):
            raise TypeError(f"FlexModel wraps an nn.Module, got {type(module).__name__}")
        if not isinstance(output_dict, dict):
            raise TypeError(f"output_dict must be a dict (it receives the captured tensors), got {type(output_dict).__name__}")
        _check_store(store)
        if scope not in SCOPES:
            raise ValueError(f'scope must be "global" or "replica", got {scope!r}')
        self.scope = scope
        self.module = module
        self.trainable_modules = nn.ModuleDict()
        self.output_dict = output_dict
        self.save_ctx = SimpleNamespace()
        self.process_group = process_group
        layout, grad_mean = choose_layout(module, tp=tensor_parallel_size, pp=pipeline_parallel_size,
                                          dp=data_parallel_size, group=process_group, mesh=device_mesh,
                                          mesh_axes=mesh_axes, order=parallel_order, batch_dim=batch_dim,
                                          layout=layout, dp_grad_mean=dp_grad_mean)
        self.layout = layout.build_groups()
        if scope == "replica":
            self.layout.build_replica_groups()
        self._runtime = Runtime(self.layout, output_dict, self.save_ctx, self.trainable_modules,
                                store=store, offload_to_cpu=offload_to_cpu, dp_grad_mean=grad_mean)
        self._groups = HookGroups()  # members: Registration records, in registration order
        self._names = NameResolver(module)
        self._restored = False
        # The end-of-forward agreement (see firing.fire): a hook on the root, so that it also runs when the
        # wrapped module is called directly.
        self._pass_end = module.register_forward_hook(self._end_of_forward) if self.layout.stage else None

    def _end_of_forward(self, module: nn.Module, args: Any, output: Any) -> None:
        active = self._runtime.active
        if any(r.handle is not None and r.defers(self._runtime) and (active is None or r in active)
               for r in self._groups.members()):  # the same on every rank of the stage
            self._runtime.agree("forward pass")

    # -- registration ------------------------------------------------------------
    def register(self, hook_function: HookFunction, hook_type: HookType = "forward", *,
                 store_as: Optional[str] = None) -> HookHandle:
        """Register ``hook_function`` as ``hook_type`` ("forward", "forward_pre", "full_backward",
        "full_backward_pre" or "tensor"; also the 0.1.0 names "backward", "backward_pre").

        ``store_as``: the ``output_dict`` key of this registration's captures (default: the module name),
        e.g. to keep a tool's captures apart from the user's hooks on the same module."""
        return self._register(hook_function, _hook_type(hook_type), store_as=store_as)

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

    def _register(self, hook: HookFunction, hook_type: str, *, somewhere: bool = False,
                  store_as: Optional[str] = None) -> HookHandle:
        """``somewhere``: the name is known to exist on some pipeline stage (no collective to find out)."""
        self._check_alive()
        if not isinstance(hook, HookFunction):
            raise TypeError(f"expected a HookFunction, got {type(hook).__name__}")
        hook_type = self._hook_point_state().prepare(hook.module_name, hook_type)  # aliases, hook points
        if any(r.hook is hook and r.hook_type == hook_type for r in self._groups.members()):
            raise ValueError(f"{hook!r} is already registered here as a {hook_type} hook; remove the first "
                             "registration's handle, or create a new HookFunction")
        target = self._resolve(hook.module_name, hook_type, somewhere)
        if hook_type == "tensor" and uses_fsdp(self.module):
            raise ValueError(_FSDP_TENSOR_HOOK.format(name=hook.module_name))
        if store_as is None:
            reg = Registration(hook, HOOK_KINDS[hook_type], scope=hook.scope or self.scope)
        elif isinstance(store_as, str) and store_as:
            reg = _StoredAs(hook, HOOK_KINDS[hook_type], scope=hook.scope or self.scope, key=store_as)
        else:
            raise TypeError(f"store_as must be a non-empty string (an output_dict key), got {store_as!r}")
        if reg.scope == "replica":
            self.layout.build_replica_groups()  # collective, once: every rank registers the same hooks
        if target is not None:
            if hook_type == "tensor":
                _, owner, param = target
                attach(reg, self._runtime, param, owner, hook.module_name.rsplit(".", 1)[-1])
            else:
                attach(reg, self._runtime, target[1], target[1])
        self._groups.add(reg)
        return HookHandle(self, reg)

    def _resolve(self, name: str, hook_type: str, somewhere: bool = False) -> Any:
        """The module (or parameter) a hook goes on; None if it lives on another pipeline stage. Under
        pipeline parallelism, whether it exists anywhere is one all-reduce over the wrapped group (every
        rank registers the same hooks, so every rank runs it) unless ``somewhere`` already says so."""
        lookup = self._names.parameter if hook_type == "tensor" else self._names.module
        try:
            target, error = lookup(name), None
        except ValueError as e:
            target, error = None, e
        if self.layout.pp == 1 or somewhere:
            if error is not None and not somewhere:
                raise error
            return target
        if not C.any_rank(target is not None, self.process_group):
            raise error
        return target

    def _remove(self, reg: Registration) -> None:
        reg.detach()
        self._groups.discard(reg)
        if self._runtime.active is not None:
            self._runtime.active.discard(reg)

    def remove_hook(self, hook_function: HookFunction) -> None:
        """Remove every registration of ``hook_function`` on this wrapper (e.g. one that
        ``create_hook_group`` made); nothing happens if there is none."""
        for reg in self.registrations(hook_function):
            self._remove(reg)

    def registrations(self, hook_function: Optional[HookFunction] = None) -> List[Registration]:
        """The registration records (hook, hook type, torch handle), in registration order; only those
        of ``hook_function`` if given."""
        return [r for r in self._groups.members() if hook_function is None or r.hook is hook_function]

    def get_module(self, name: str) -> nn.Module:
        """The module named ``name`` as in the unwrapped model (wrapper prefixes optional); a ValueError
        with the closest names if there is none. Hook points and aliases resolve too (an alias to the module
        its value belongs to)."""
        self._hook_point_state().prepare(name, "forward")
        return self._names.module(name)[1]

    # -- hook points and standard names (flex_model.hook_points, docs/hook_points.md) --------------
    def _hook_point_state(self) -> Any:
        """This wrapper's ``hook_points.HookPoints`` (made on first use: it adds the aliases to the names)."""
        state = self.__dict__.get("_hook_points_state")
        if state is None:
            from flex_model.hook_points import HookPoints

            state = self._hook_points_state = HookPoints(self.module, self._names)
        return state

    def add_hook_points(self, eager: bool = False) -> List[str]:
        """Install the attention hook points (``<attention>.q``, ``.k``, ``.v``, ``.scores``, ``.pattern``,
        ``.z``) on every HuggingFace attention module now, so that group patterns match them too (a hook
        on one by name installs them by itself); ``eager``: compute eager attention math in every pass,
        hooked or not. ``restore()`` removes them. Returns their names."""
        self._check_alive()
        return self._hook_point_state().install(eager=eager)

    def hook_point(self, module_name: str, name: str, fn: Any, index: int = 0, *,
                   tp_dim: Optional[int] = None) -> str:
        """A hook point ``f"{module_name}.{name}"`` on the result of the ``index``-th call (from 0) of the
        torch function ``fn`` (or its name: ``"softmax"``, ``"matmul"`` also for ``@``, ``"add"`` also for
        ``+``) in that module's own forward code (calls inside its submodules do not count; see
        ``function_calls``). Every hook kind then works on that name. ``tp_dim``: the dim of the value
        split over tensor parallel ranks, if any. Returns the name."""
        self._check_alive()
        return self._hook_point_state().add_intermediate(module_name, name, fn, index, tp_dim)

    def function_calls(self, module_name: str, *example_args: Any, **example_kwargs: Any) -> Any:
        """The torch function calls of ``module_name``'s own forward when the model runs on the example
        input once (no hook fires, no gradients): name, index and shape of each, for ``hook_point``."""
        self._check_alive()
        return self._hook_point_state().function_calls(module_name, lambda: self._dry_run(example_args,
                                                                                          example_kwargs))

    def hook_points(self, *example_args: Any, **example_kwargs: Any) -> Any:
        """Every name a hook can go on (modules, hook points, aliases) -> the full shape of its value's
        first tensor for this input, from one dry run (no registered hook fires, no gradients; attention
        hook points are installed for it if they were not). ``print()`` it for a tree."""
        self._check_alive()
        from flex_model.hook_points import full_shape

        return self._hook_point_state().shapes(lambda: self._dry_run(example_args, example_kwargs),
                                               lambda *a: full_shape(self.layout, *a))

    def _dry_run(self, args: Any, kwargs: Any) -> Any:
        previous, self._runtime.active = self._runtime.active, set()  # none of the registered hooks fires
        try:
            with torch.no_grad():
                return self.module(*args, **kwargs)
        finally:
            self._runtime.active = previous

    def aliases(self) -> Dict[str, str]:
        """The standard names of this model (``blocks.0.resid_pre``, ...) -> what each stands for."""
        state = self._hook_point_state()
        return {n: self._names.display(n).split(" -> ", 1)[1] for n in state.resolver.alias_names()}

    @property
    def store(self) -> Store:
        """Where captures are kept: "root", "all" or "none" (see ``storing``)."""
        return self._runtime.store

    @contextmanager
    def storing(self, store: Store) -> Iterator["FlexModel"]:
        """``with flex.storing("all"): ...`` keeps captures as ``store`` says inside the block (call it on
        every rank alike: it changes which ranks receive the pieces)."""
        _check_store(store)
        previous, self._runtime.store = self._runtime.store, store
        try:
            yield self
        finally:
            self._runtime.store = previous

    # -- hook groups --------------------------------------------------------------
    def create_hook_group(self, group_name: str, group_constructor: str, expected_shape: ExpectedShape = None,
                          editing_function: Optional[EditingFunction] = None, unpack_idx: int = 0,
                          hook_type: HookType = "forward", *, regex: bool = False) -> List[HookFunction]:
        """One HookFunction per module whose name contains ``group_constructor`` (or matches it, with
        ``regex=True``: ``re.search``), each registered as ``hook_type`` and tagged ``group_name``.

        A substring matches anywhere: ``"layers.1"`` also catches ``layers.10`` and every submodule of
        both; for exactly some blocks use a regex, e.g. ``r"^layers\\.(1|2)$"`` with ``regex=True``."""
        hook_type = _hook_type(hook_type)
        names = self._names.parameter_names() if hook_type == "tensor" else self._names.module_names()
        matches = [n for n in names if n and _matches(n, group_constructor, regex)]
        if not matches and hook_type != "tensor":  # then aliases, and attention hook points not installed yet
            matches = self._hook_point_state().fallback_matches(lambda n: _matches(n, group_constructor, regex))
        if self.layout.pp > 1:  # the stages hold different modules: one collective for the union of matches
            matches = C.union_of_names(matches, self.process_group)
        if not matches:
            how = "matches the regex" if regex else "contains"
            where = " on any pipeline stage" if self.layout.pp > 1 else ""
            raise ValueError(unknown_name(f'no {"parameter" if hook_type == "tensor" else "module"} name {how} '
                                          f'"{group_constructor}"{where}', group_constructor, names))
        hooks = [HookFunction(n, expected_shape, editing_function, unpack_idx) for n in matches]
        regs = [self._register(h, hook_type, somewhere=True).registration for h in hooks]
        self._groups.tag(regs, group_name)
        return hooks

    def update_hook_groups(self, hook_functions: HookSpec, group_name: str) -> None:
        """Tag the given HookFunction(s) (every registration of each), or every hook whose module name
        contains a string."""
        self._groups.tag(self._select(hook_functions), group_name)

    def remove_hook_groups(self, hook_functions: HookSpec, group_name: str) -> None:
        """Untag as ``update_hook_groups`` tags; removing ``"all"`` is an error."""
        self._groups.untag(self._select(hook_functions), group_name)

    def get_hook_function_groups(self, hook_function: Optional[HookFunction] = None) -> Any:
        """The groups of ``hook_function`` (a set, over its registrations), or of every hook (a dict)."""
        if hook_function is not None:
            return set().union(*(self._groups.tags(r) for r in self._registered(hook_function)))
        out: Dict[HookFunction, set] = {}
        for reg in self._groups.members():
            out.setdefault(reg.hook, set()).update(self._groups.tags(reg))
        return out

    def get_group_hook_functions(self, group_name: Optional[str] = None) -> Any:
        """The hooks of ``group_name`` (a list), or of every group (a dict group -> list)."""
        groups = {g: _unique(r.hook for r in regs) for g, regs in self._groups.groups().items()}
        if group_name is None:
            return groups
        if group_name not in groups:
            raise ValueError(f"unknown hook group {group_name!r}; known groups: {sorted(groups)}")
        return groups[group_name]

    def _registered(self, hook: HookFunction) -> List[Registration]:
        regs = self.registrations(hook)
        if not regs:
            raise ValueError(f"{hook!r} is not registered with this model")
        return regs

    def _select(self, spec: HookSpec) -> List[Registration]:
        if isinstance(spec, HookFunction):
            return self._registered(spec)
        if isinstance(spec, str):
            regs = [r for r in self._groups.members() if spec in r.name]
            if not regs:
                raise ValueError(f'no registered hook has a module name containing "{spec}"; registered: '
                                 f"{sorted({r.name for r in self._groups.members()})}")
            return regs
        hooks = list(spec)
        bad = [h for h in hooks if not isinstance(h, HookFunction)]
        if bad:
            raise TypeError(f"expected HookFunctions, a HookFunction or a name substring; got {bad[:3]}")
        return [r for h in hooks for r in self._registered(h)]

    # -- running ---------------------------------------------------------------------
    def select_groups(self, groups: Union[str, Iterable[str]] = ALL, complement: bool = False) -> None:
        """Choose the hooks that fire from now on, as ``forward(groups=, complement=)`` does, for passes that
        call the wrapped module directly (e.g. HuggingFace ``generate``); hooks registered later fire only
        once chosen again. The next ``forward`` chooses anew."""
        self._check_alive()
        everything = groups == ALL and not complement
        self._runtime.active = None if everything else self._groups.select(groups, complement)

    def forward(self, *args: Any, groups: Union[str, Iterable[str]] = ALL, complement: bool = False,
                **kwargs: Any) -> Any:
        """Run the wrapped module with the hooks of ``groups`` (or all others, with ``complement``).

        The selection also governs this pass's backward hooks, so it stays in force until the
        next ``forward``: calling the wrapped module directly afterwards fires the same hooks.

        On CUDA, captures offloaded to CPU are copied on a side stream while the pass runs; every copy
        has finished, and its tensor is in ``output_dict``, when this returns (``Runtime.store_value``)."""
        self._check_alive()
        everything = groups == ALL and not complement
        self._runtime.active = None if everything else self._groups.select(groups, complement)
        with self._runtime.deferred_copies():  # waits for every capture's host copy before returning
            return self.module(*args, **kwargs)

    def gather_pipeline_outputs(self) -> None:
        """Move what pipeline stages captured into the owner's ``output_dict`` (each replica's owner's, for
        replica-scope hooks); call on every rank after the pipeline's forward (a collective over the
        stages' roots)."""
        outbox = self._runtime.outbox
        for scope, group in (("global", self.layout.roots), ("replica", self.layout.replica_roots)):
            if group is not None:
                ship_to_owner(self.layout, [(n, t) for n, t, s in outbox if s == scope], self.output_dict, scope)
        outbox.clear()

    # -- research tools: flex_model.cache, flex_model.generation ----------------------------
    def run_with_cache(self, *args: Any, names_filter: Any = None, groups: Union[str, Iterable[str]] = ALL,
                       **kwargs: Any) -> Any:
        """``(output, cache)``: one pass ``self(*args, groups=groups, **kwargs)`` with a capture hook, for
        that call only, on every name ``names_filter`` selects (None: every module); ``cache[name]`` is the
        full value. See ``flex_model.cache.run_with_cache`` for the other options."""
        from flex_model.cache import run_with_cache

        return run_with_cache(self, *args, names_filter=names_filter, groups=groups, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """HuggingFace ``generate`` on the wrapped model with per-step hooks and captures (``hooks=``,
        ``capture=``, ``steps=``); editing functions read ``save_ctx.generation``. See
        ``flex_model.generation.generate``."""
        from flex_model.generation import generate

        return generate(self, *args, **kwargs)

    def comm_stats(self, reset: bool = True) -> Dict[str, int]:
        """What this rank's firings communicated since the last call: ``firings``, ``collectives`` (those of
        flex_model's firings and end-of-pass checks, not the model's own), ``sent_bytes``, ``recv_bytes``,
        and how many of the collectives ran over the whole stage (``stage_collectives``: spanning
        data-parallel ranks when dp > 1) or over one replica (``replica_collectives``)."""
        stages = {"stage": self.layout.stage, "replica": self.layout.replica}
        out = {"firings": self._runtime.firings, "collectives": 0, "sent_bytes": 0, "recv_bytes": 0}
        for key, stage in stages.items():
            stats = stage.stats if stage is not None else None
            out[f"{key}_collectives"] = stats.collectives if stats else 0
            if stats:
                out["collectives"] += stats.collectives
                out["sent_bytes"] += stats.sent_bytes
                out["recv_bytes"] += stats.recv_bytes
                if reset:
                    stats.collectives = stats.sent_bytes = stats.recv_bytes = 0
        if reset:
            self._runtime.firings = 0
        return out

    def clear_output_dict(self) -> None:
        """Drop every capture: those in ``output_dict``, and those a pipeline stage root still holds for
        the owner (e.g. from a pass that failed before ``gather_pipeline_outputs``)."""
        self._runtime.sync()  # host copies in flight land first, then go with the rest
        self.output_dict.clear()
        self._runtime.outbox.clear()

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
        full = full_parameter(self.module, self._names, parameter_name, self.layout)
        if expected_shape is not None and (len(expected_shape) != full.ndim or any(
                e is not None and e != n for e, n in zip(expected_shape, full.shape))):
            raise ValueError(f'parameter "{parameter_name}" has full shape {tuple(full.shape)}, '
                             f"not expected_shape {tuple(expected_shape)}")
        return full

    def copy_without_hooks(self) -> nn.Module:
        """A deep copy of the wrapped module with none of this wrapper's hooks (the user's own stay)."""
        memo: Dict[int, Any] = {}
        model = copy.deepcopy(self.module, memo)
        if self.__dict__.get("_hook_points_state") is not None:  # attention implementation back, no points
            self._hook_points_state.strip_copy(memo)
        for reg in self._groups.members():
            if reg.target is not None and id(reg.target) in memo:
                reg.strip_from(memo[id(reg.target)])
        if self._pass_end is not None:
            model._forward_hooks.pop(self._pass_end.id, None)
        return model

    # -- leaving --------------------------------------------------------------------------
    def restore(self) -> nn.Module:
        """Remove every hook this wrapper added, release its process groups, return the module."""
        for reg in self._groups.members():
            self._remove(reg)
        if self.__dict__.get("_hook_points_state") is not None:  # hook points gone, attention as it was
            self._hook_points_state.uninstall()
        if self._pass_end is not None:
            self._pass_end.remove()
        self.layout.release_groups()
        self._restored = True
        return self.module

    def _check_alive(self) -> None:
        if self._restored:
            raise RuntimeError("this FlexModel was restored; wrap the module again to add hooks or run it")

    def describe(self) -> str:
        """The layout, where every hook sits, and which groups it carries."""
        lines = [f"FlexModel({type(self.module).__name__}, layout {self.layout.describe()}, "
                 f"{len(self._groups.members())} hooks)"]
        for reg in self._groups.members():
            tags = sorted(self._groups.tags(reg))
            edit = "edit" if reg.hook.editing_function is not None else "capture"
            lines.append(f"  {self._names.display(reg.name):<40} {reg.hook_type:<18} {edit:<8} groups={tags}")
        if self.__dict__.get("_hook_points_state") is not None and self._hook_points_state.summary():
            lines.append(f"  hook points: {self._hook_points_state.summary()}")
        if self.trainable_modules:
            lines.append(f"  trainable modules: {self.trainable_modules_names}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return self.describe()


@dataclass(eq=False)
class _StoredAs(Registration):
    """A registration whose captures go to ``output_dict[key]`` (``register(..., store_as=key)``)."""

    key: str = ""

    @property
    def name(self) -> str:
        return self.key


# FSDP1 and FSDP2 run forward on unsharded copies of the parameters and set the registered parameter's
# ``.grad`` outside autograd: a tensor hook on it would silently never fire.
_FSDP_TENSOR_HOOK = (
    'tensor hook on "{name}": under FSDP the registered parameter is not the tensor used in forward, so its '
    "hook would never fire; hook the owning module's gradient (register_full_backward_hook / "
    "register_full_backward_pre_hook), or read the reduced gradient after backward "
    "(FSDP.summon_full_params(model, with_grads=True), or param.grad.full_tensor() under fully_shard)")


def _hook_type(hook_type: str) -> str:
    hook_type = HOOK_TYPE_ALIASES.get(hook_type, hook_type)
    if hook_type not in HOOK_KINDS:
        raise ValueError(f"unknown hook_type {hook_type!r}; choose one of {sorted(HOOK_KINDS)}")
    return hook_type


def _check_store(store: str) -> None:
    if store not in STORES:
        raise ValueError(f'store must be "root", "all" or "none", got {store!r}')


def _matches(name: str, pattern: str, regex: bool) -> bool:
    return re.search(pattern, name) is not None if regex else pattern in name


def _unique(items: Iterable[Any]) -> List[Any]:
    seen: Dict[int, Any] = {}
    for item in items:
        seen.setdefault(id(item), item)
    return list(seen.values())
