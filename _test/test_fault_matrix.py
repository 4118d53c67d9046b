"""Fault injection across hook kinds, firing kinds and layouts: every rank raises, none hangs, the next pass is right.

A *fault* breaks one hook on ONE rank of a real gloo job (every rank builds its own
``HookFunction``; only the failing rank's is wrong):

- ``hook``: the hook kind — forward, forward_pre, full_backward, full_backward_pre, tensor
  (tensor hooks are refused under FSDP: not tried there).
- ``firing``: what the hook does — ``edit`` (an editing function on the full value, run on
  the root), ``shardwise`` (a ``ShardwiseEdit`` subclass doubling its shard), ``route``
  (``RouteActivation`` with a ``Router``), ``stats`` (a ``RunningMean`` subclass), ``dump``
  (``flex_model.dump_activations``).
- ``where``: *before* the gather — ``shape`` (an ``expected_shape`` that fits no value, on
  that rank only) or ``unpack`` (an ``unpack_idx`` out of range there); or ``late``, after
  it — the editing function raising on the root, the shardwise edit / RunningMean raising on
  that rank, the router's ``mask_ids`` of the wrong shape on that rank.
- ``rank``: the failing rank (each in turn; a late ``edit`` fault runs where the edit runs:
  on the root of the hook's stage).

For each fault, one pass (forward and backward) must raise on every rank of the hook's
pipeline stage within ``LIMIT_S`` seconds: the failing rank its own exception, the others
``HookFailure`` naming the failing rank and the hook. The fault is then undone on the same
wrapper and the next pass — the hook, a capture on the same value and a capture of an
upstream gradient (``<block>.ln2``'s full_backward_pre, which a backward edit changes) —
must match one process with the same hooks (plain torch hooks). A dump is checked by
reading it back. The harness kills a rank that does not report, so a hang fails the test.

Layouts: DP=2 under FSDP1 and FSDP2 (``fully_shard``), TP=2 with fairscale and with
DTensor (``parallelize_module``, Colwise/Rowwise on a 1-D ("tp",) mesh), PP=2 (two stages,
one rank each), PP=2 × DP=2, and TP=2 × DP=2 (fairscale, 4 ranks).

Pipeline stages: flex_model's collectives run over one stage (its dp × tp ranks); nothing
of ours connects the stages — they talk only through the user's schedule (here the test's
own send/recv). So what is guaranteed, and tested, is that every rank of the failing stage
raises; the other stage learns of it only if the schedule tells it. The test's schedule
sends a status flag before each activation / gradient (``PeerStageFailed`` on the other
stage); a schedule that does not would leave the other stage in its receive until the
process group times out. With one rank per stage (pure PP=2) there is no stage collective
at all: the failing rank raises at once, like one process.

Cost: the default run has one ``multi_process`` body per layout looping over a covering
subset (every valid hook × firing pair, where and rank rotated), so few process starts.
The full cross product, and hypothesis-drawn sequences of faults at random passes, are
``@pytest.mark.slow``: ``FLEX_SLOW=1 python -m pytest -q _test/test_fault_matrix.py``
(see ``_test/conftest.py``).

Also here: a rank that dies (``os._exit(1)``) mid-pass, with a runner of our own that gives
the process group a timeout; a dump whose loader raises on one rank; a hung rank under
flex_model's own process groups (they take the job's timeout); a dump under pipeline stages
whose first stage fails in its backward; and the known gap as a strict xfail (a dump whose
``run`` raises on one rank before its forward).
"""
from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import pytest
import torch
import torch.distributed as dist
import torch.distributed.fsdp  # noqa: F401  (imported before the ranks fork: each would spend seconds on it)
import torch.distributed.tensor.parallel  # noqa: F401
from torch import nn

from _test.distributed import (HookSpec, _stop, check_capture_dict, free_port, multi_process, reference_hooks,
                               run_ranks, tokens)
from _test.models import Block, fairscale_tp_gpt, tiny_gpt
from flex_model import (FlexModel, HookFailure, HookFunction, RouteActivation, Router, RunningMean, ShardInfo,
                        ShardwiseEdit, dump_activations)
from flex_model.routing import scale_grad

LIMIT_S = 30.0  # every rank must have raised this soon after the faulty pass began
B, T, D, H, V = 4, 8, 32, 64, 61  # TinyGPT's batch, sequence, width, MLP hidden width, vocabulary

HOOKS = ("forward", "forward_pre", "full_backward", "full_backward_pre", "tensor")
GRAD_HOOKS = {"full_backward", "full_backward_pre", "tensor"}
FIRINGS = ("edit", "shardwise", "route", "stats", "dump")
WHERES = ("shape", "unpack", "late")
# What each hook kind hooks in a block: a value split over tp (on the hidden dim) and over dp (the batch).
TARGET = {"forward": "mlp.up", "forward_pre": "mlp.down", "full_backward": "mlp.down",
          "full_backward_pre": "mlp.up", "tensor": "mlp.up.weight"}
FULL_SHAPE = {"tensor": (H, D)}  # every other target: (B, T, H)
WITNESS = "ln2"  # its full_backward_pre gradient comes from the MLP: a backward edit there changes it

LAYOUTS = {"fsdp1": 2, "fsdp2": 2, "fairscale_tp2": 2, "dtensor_tp2": 2, "pp2": 2, "pp2_dp2": 4, "tp2_dp2": 4}
FSDP_LAYOUTS = {"fsdp1", "fsdp2"}


class Boom(RuntimeError):
    """The injected failure."""


class PeerStageFailed(RuntimeError):
    """Raised by the test's own pipeline schedule when the other stage said its step failed."""


@dataclass(frozen=True)
class Fault:
    hook: str
    firing: str
    where: str
    rank: int

    def __str__(self) -> str:
        return f"{self.hook}-{self.firing}-{self.where}-rank{self.rank}"


# -- which faults exist on a layout ---------------------------------------------------------------
def stage_of(layout: str, rank: int) -> int:
    """The pipeline stage of ``rank`` (fairscale's rank order: dp outermost, then pp, then tp)."""
    return rank % 2 if layout.startswith("pp") else 0


def stage_root(layout: str, stage: int) -> int:
    return stage if layout.startswith("pp") else 0


def valid(layout: str, f: Fault) -> bool:
    if f.hook == "tensor" and (layout in FSDP_LAYOUTS or f.firing in ("route", "dump")):
        return False  # refused under FSDP; routing needs [batch, seq, units]; a dump takes module hooks
    if f.firing == "dump" and f.where != "unpack":
        return False  # dump_activations takes no expected_shape (a loader failing on one rank: tested below)
    if f.firing == "dump" and layout.startswith("pp") and stage_of(layout, f.rank) == 0 and f.hook in GRAD_HOOKS:
        return False  # stage 1 is done when stage 0's backward fails: the dump's agreement after `run` tells
        # it (test_a_dump_whose_first_stage_fails_in_its_backward)
    if f.firing == "edit" and f.where == "late" and f.rank != stage_root(layout, stage_of(layout, f.rank)):
        return False  # an editing function runs on its stage's root only
    return True


def all_faults(layout: str) -> List[Fault]:
    return [f for hook in HOOKS for firing in FIRINGS for where in WHERES for rank in range(LAYOUTS[layout])
            if valid(layout, f := Fault(hook, firing, where, rank))]


def _family(firing: str) -> str:
    """The library path a firing's failure takes: in the exchange's header or the root's verdict
    (``edit``), the end-of-pass agreement (the ``ShardwiseEdit``s), a dump's own loop."""
    return {"edit": "edit", "dump": "dump"}.get(firing, "shardwise")


def _features(f: Fault) -> set:
    out = {("firing", f.firing), ("where", _family(f.firing), f.where), ("rank", f.rank),
           ("parity", f.hook, f.rank % 2)}  # each hook kind failing on an even and an odd rank: both pp stages
    if f.firing != "dump":
        out.add(("hook", f.hook, _family(f.firing)))
    return out


def covering_faults(layout: str) -> List[Fault]:
    """A small subset that still covers: every hook kind with an editing function and with a shardwise edit,
    every firing kind, every fault point of each library path, every failing rank, each hook kind failing
    on an even and an odd rank (both pipeline stages) — greedy, deterministic."""
    faults = all_faults(layout)
    missing = set().union(*(_features(f) for f in faults))
    chosen: List[Fault] = []
    while missing:
        def score(f: Fault) -> tuple:  # new features first, then balance the ranks and the fault points
            balance = sum(c.rank == f.rank for c in chosen) + sum(c.where == f.where for c in chosen)
            return len(_features(f) & missing), -balance, -faults.index(f)

        best = max(faults, key=score)
        chosen.append(best)
        missing -= _features(best)
    return chosen


# -- the hooks: right on every rank but the failing one, which can be armed and disarmed --------------
class Switch:
    def __init__(self) -> None:
        self.on = False


def _edit(switch: Switch) -> Callable:
    def edit(module, x, save_ctx, modules):
        if switch.on:
            raise Boom("the editing function broke")
        return x * 2 + x.flip(0)  # mixes the batch (split over dp) and, for 2-d values, the split rows
    return edit


class Doubler(ShardwiseEdit):
    def __init__(self, switch: Switch) -> None:
        self.switch = switch

    def edit_shard(self, current_module, local, shard: ShardInfo, modules):
        if self.switch.on:
            raise Boom("the shardwise edit broke")
        return local * 2


class FailingMean(RunningMean):
    def __init__(self, switch: Switch) -> None:
        super().__init__()
        self.switch = switch

    def edit_shard(self, current_module, local, shard: ShardInfo, modules):
        if self.switch.on:
            raise Boom("the running mean broke")
        return super().edit_shard(current_module, local, shard, modules)


def _router() -> Router:
    return Router(H, [(0, H // 2)], {0: [0.0], 1: [0.5]})  # class 0 detaches the first half, class 1 halves it


MASKS = tokens() % 2  # [B, T] class ids 0 / 1


@dataclass
class Armed:
    """One rank's hook of a fault, its one-process twin, and how to break / mend it on the failing rank."""

    hook: HookFunction
    spec: HookSpec  # the same hook as a plain torch hook, for the reference
    keeps: bool  # whether the hook itself stores captures (not a ShardwiseEdit)
    arm: Callable[[], None]
    disarm: Callable[[], None]


def make_hook(case: "Case", fault: Fault) -> Armed:
    name = case.name(fault)
    failing = case.rank == fault.rank
    switch = Switch()
    ref_fn: Optional[Callable] = None
    if fault.firing == "edit":
        edit, ref_fn = _edit(switch), (lambda x: x * 2 + x.flip(0))
    elif fault.firing == "shardwise":
        edit, ref_fn = Doubler(switch), (lambda x: x * 2)
    elif fault.firing == "stats":
        edit = FailingMean(switch)
    elif fault.firing == "route":
        router, ref_router = _router(), _router()
        good = MASKS[case.rows]
        router.mask_ids, ref_router.mask_ids = good, MASKS
        edit = RouteActivation(router)
        ref_fn = lambda x: scale_grad(x, ref_router.weights(x, torch.arange(x.shape[-1])))  # noqa: E731
    else:
        raise ValueError(fault.firing)
    hook = HookFunction(name, editing_function=edit)
    bad_shape = tuple(FULL_SHAPE.get(fault.hook, (B, T, H))) + (7,)  # one dim too many: fits no value

    def arm() -> None:
        if not failing:
            return
        if fault.where == "shape":
            hook.expected_shape = bad_shape
        elif fault.where == "unpack":
            hook.unpack_idx = 5
        elif fault.firing == "route":
            edit.router.mask_ids = torch.ones(MASKS[case.rows].shape[0] + 1, T, dtype=torch.long)
        else:
            switch.on = True

    def disarm() -> None:
        hook.expected_shape, hook.unpack_idx, switch.on = None, 0, False
        if fault.firing == "route":
            edit.router.mask_ids = MASKS[case.rows]

    return Armed(hook, HookSpec(fault.hook, name, ref_fn), fault.firing == "edit", arm, disarm)


def own_error(fault: Fault) -> type:
    if fault.where == "shape" or (fault.where == "late" and fault.firing == "route"):
        return ValueError
    return IndexError if fault.where == "unpack" else Boom


# -- the layouts: one rank's side -------------------------------------------------------------------
class Case:
    """One rank's wrapped model, its input rows, one pass, and the one-process reference."""

    pp = False

    def __init__(self, layout: str, rank: int, flex: FlexModel, output_dict: dict, dp_rank: int, dp: int) -> None:
        self.layout, self.rank, self.flex, self.out = layout, rank, flex, output_dict
        n = B // dp
        self.rows = slice(dp_rank * n, (dp_rank + 1) * n)
        self.idx = tokens()
        self.w = torch.randn(B, T, V, generator=torch.Generator().manual_seed(3))

    def prefix(self, fault: Fault) -> str:
        return "layers.0."

    def name(self, fault: Fault) -> str:
        return self.prefix(fault) + TARGET[fault.hook]

    def fires(self, fault: Fault) -> bool:
        """Whether the fault's hook fires on this rank (it lives on this rank's pipeline stage)."""
        return stage_of(self.layout, self.rank) == stage_of(self.layout, fault.rank)

    def loss(self, out: torch.Tensor) -> torch.Tensor:
        """This rank's loss: the full-batch loss is the mean over dp ranks (the DDP / FSDP convention)."""
        rows = self.w[self.rows]
        return (out * rows).sum() / rows.shape[0]

    def step(self, backward: bool = True) -> Optional[torch.Tensor]:
        """One pass on this rank's rows; returns the model's output."""
        out = self.flex(self.idx[self.rows])
        if backward:
            self.loss(out).backward()
        return out

    def reference(self, first: List[HookSpec], rest: List[HookSpec], keeps_first: bool
                  ) -> Tuple[torch.Tensor, Dict[str, List[torch.Tensor]]]:
        """One process, the full batch, plain torch hooks ``first`` then ``rest``: ``(output, captures)``;
        ``first`` stores nothing unless ``keeps_first``."""
        model = tiny_gpt()
        seen: Dict[str, List[torch.Tensor]] = {}
        with reference_hooks(model, first, seen if keeps_first else {}), reference_hooks(model, rest, seen):
            out = model(self.idx)
            ((out * self.w).sum() / B).backward()
        return out.detach(), seen

    def collect(self) -> None:
        """Bring every stage's captures to the owner (pipelines only)."""


class Stage0(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.wte, self.block0 = nn.Embedding(V, D), Block(D, 4, H)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.block0(self.wte(idx))


class Stage1(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block1, self.ln_f, self.head = Block(D, 4, H), nn.LayerNorm(D), nn.Linear(D, V)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.ln_f(self.block1(x)))


def stages() -> Tuple[Stage0, Stage1]:
    torch.manual_seed(0)
    return Stage0(), Stage1()


def _send_flag(ok: bool, dst: int) -> None:
    dist.send(torch.tensor([int(ok)]), dst=dst)


def _recv_flag(src: int) -> bool:
    flag = torch.zeros(1, dtype=torch.long)
    dist.recv(flag, src=src)
    return bool(flag.item())


class PipelineCase(Case):
    """Two stages (rank order dp, pp): stage 0 = embedding + block0, stage 1 = block1 + ln_f + head. The
    schedule is the test's own send/recv: stage 0 says whether its forward worked before sending the
    activation, stage 1 whether its forward (and backward) did before sending the gradient (also in a
    forward-only pass: a dump's next collective spans both stages)."""

    pp = True

    def __init__(self, layout: str, rank: int, flex: FlexModel, output_dict: dict, dp_rank: int, dp: int) -> None:
        super().__init__(layout, rank, flex, output_dict, dp_rank, dp)
        me = flex.layout.my
        self.me, self.other = me["pp"], flex.layout.global_rank(me["dp"], 1 - me["pp"], me["tp"])

    def prefix(self, fault: Fault) -> str:
        return f"block{stage_of(self.layout, fault.rank)}."

    def step(self, backward: bool = True) -> Optional[torch.Tensor]:
        n = self.rows.stop - self.rows.start
        if self.me == 0:
            try:
                h, error = self.flex(self.idx[self.rows]), None
            except Exception as e:  # noqa: BLE001  (tell stage 1, then raise)
                h, error = None, e
            _send_flag(error is None, self.other)
            if error is not None:
                raise error
            dist.send(h.detach().contiguous(), dst=self.other)
            if not _recv_flag(self.other):
                raise PeerStageFailed("stage 1 failed")
            if not backward:
                return None
            grad = torch.empty_like(h)
            dist.recv(grad, src=self.other)
            h.backward(grad)
            return None
        if not _recv_flag(self.other):
            raise PeerStageFailed("stage 0 failed")
        h = torch.empty(n, T, D)
        dist.recv(h, src=self.other)
        h.requires_grad_(backward)
        try:
            out, error = self.flex(h), None
            if backward:
                self.loss(out).backward()
        except Exception as e:  # noqa: BLE001
            out, error = None, e
        _send_flag(error is None, self.other)
        if error is not None:
            raise error
        if backward:
            dist.send(h.grad.contiguous(), dst=self.other)
        return out

    def reference(self, first, rest, keeps_first):
        ref0, ref1 = stages()
        seen: Dict[str, List[torch.Tensor]] = {}
        split = lambda specs, s: [x for x in specs if x.name.startswith(f"block{s}.")]  # noqa: E731
        with reference_hooks(ref0, split(first, 0), seen if keeps_first else {}), \
                reference_hooks(ref1, split(first, 1), seen if keeps_first else {}), \
                reference_hooks(ref0, split(rest, 0), seen), reference_hooks(ref1, split(rest, 1), seen):
            out = ref1(ref0(self.idx))
            ((out * self.w).sum() / B).backward()
        return out.detach(), seen

    def collect(self) -> None:
        self.flex.gather_pipeline_outputs()


def build(layout: str, rank: int, world_size: int) -> Case:
    """This rank's side of ``layout``."""
    out: Dict[str, List[torch.Tensor]] = {}
    torch.set_num_threads(1)
    if layout == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        model = FSDP(tiny_gpt(), device_id=torch.device("cpu"), auto_wrap_policy=ModuleWrapPolicy({Block}),
                     use_orig_params=True)
        return Case(layout, rank, FlexModel(model, out), out, rank, 2)
    if layout == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh, model = init_device_mesh("cpu", (world_size,)), tiny_gpt()
        for block in model.layers:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return Case(layout, rank, FlexModel(model, out), out, rank, 2)
    if layout in ("fairscale_tp2", "tp2_dp2"):
        from fairscale.nn.model_parallel import initialize as fs

        fs.initialize_model_parallel(2)
        model = fairscale_tp_gpt(tiny_gpt(), fs.get_model_parallel_rank())
        dp = world_size // 2
        flex = FlexModel(model, out, tensor_parallel_size=2, data_parallel_size=dp)
        assert (flex.layout.tp, flex.layout.dp) == (2, dp)
        return Case(layout, rank, flex, out, fs.get_data_parallel_rank(), dp)
    if layout == "dtensor_tp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

        mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("tp",))
        plan = {f"layers.{i}.mlp.{name}": style for i in range(2)
                for name, style in (("up", ColwiseParallel()), ("down", RowwiseParallel()))}
        model = parallelize_module(tiny_gpt(), mesh, plan)
        return Case(layout, rank, FlexModel(model, out, device_mesh=mesh), out, 0, 1)
    if layout in ("pp2", "pp2_dp2"):
        dp = world_size // 2
        mine = stages()[rank % 2]
        flex = FlexModel(mine, out, pipeline_parallel_size=2, data_parallel_size=dp)
        assert flex.layout.my["pp"] == rank % 2
        return PipelineCase(layout, rank, flex, out, flex.layout.my["dp"], dp)
    raise ValueError(layout)


# -- one fault, start to end ------------------------------------------------------------------------
def expect_failure(case: Case, fault: Fault, call: Callable[[], object]) -> None:
    """``call()`` raises on every rank of the fault's stage within LIMIT_S: the failing rank its own error,
    the others HookFailure naming it; elsewhere (another pipeline stage) at most the schedule's error."""
    start = time.monotonic()
    try:
        call()
        error: Optional[BaseException] = None
    except Exception as e:  # noqa: BLE001  (judged below)
        error = e
    elapsed = time.monotonic() - start
    what = f"{fault} on rank {case.rank}"
    assert elapsed < LIMIT_S, f"{what}: took {elapsed:.1f}s to return"
    if not case.fires(fault):
        if fault.firing == "dump":  # a dump agrees on every batch over the whole job: the other stage is told
            told = isinstance(error, RuntimeError) and f"failed on rank {fault.rank}" in str(error)
            assert told or isinstance(error, PeerStageFailed), f"{what}: {error!r}"
            return
        assert error is None or isinstance(error, PeerStageFailed), f"{what}: {error!r}"
        return
    if case.rank == fault.rank:
        assert isinstance(error, own_error(fault)), f"{what}: expected {own_error(fault).__name__}, got {error!r}"
    else:
        assert isinstance(error, HookFailure), f"{what}: expected HookFailure, got {error!r}"
        text = str(error)
        assert f"rank {fault.rank}" in text and case.name(fault) in text, f"{what}: {text}"


def check_next_pass(case: Case, fault: Fault, armed: Armed) -> None:
    """With the fault undone, a pass with the hook, a capture on the same value and an upstream gradient
    capture matches one process (the output on every rank that has it, the captures on the owner)."""
    capture = HookSpec(fault.hook, case.name(fault))
    witness = HookSpec("full_backward_pre", case.prefix(fault) + WITNESS)
    handles = [case.flex.register(HookFunction(s.name), s.kind) for s in (capture, witness)]
    try:
        case.flex.clear_output_dict()  # also what a failed pass left in a stage root's outbox
        out = case.step()
        case.collect()
        want_out, want = case.reference([armed.spec], [capture, witness], armed.keeps)
        if out is not None:
            torch.testing.assert_close(out, want_out[case.rows], msg=lambda m: f"{fault}: output: {m}")
        if case.rank == 0:
            check_capture_dict(case.out, want)
        else:
            assert case.out == {}, f"{fault}: rank {case.rank} kept {sorted(case.out)}"
    finally:
        for h in handles:
            h.remove()


def run_fault(case: Case, fault: Fault, passes_before: int = 0, tmp: Optional[str] = None) -> None:
    """Break ``fault`` after ``passes_before`` good passes; every rank raises; the next pass is right."""
    if fault.firing == "dump":
        return run_dump_fault(case, fault, tmp)
    armed = make_hook(case, fault)
    handle = case.flex.register(armed.hook, fault.hook)
    try:
        for _ in range(passes_before):
            case.step()
        case.flex.clear_output_dict()
        armed.arm()
        expect_failure(case, fault, case.step)
        armed.disarm()
        check_next_pass(case, fault, armed)
    finally:
        handle.remove()
        case.flex.clear_output_dict()


def run_dump_fault(case: Case, fault: Fault, tmp: Optional[str]) -> None:
    """A dump whose capture hook has a wrong unpack_idx on the failing rank; then a right dump, read back."""
    assert tmp is not None
    name, grad = case.name(fault), fault.hook in GRAD_HOOKS
    run = lambda flex, batch: case.step(backward=grad)  # noqa: E731  (each rank runs its own rows)
    loader = [0, 1]  # two batches; the rows are the case's own
    bad = 5 if case.rank == fault.rank else 0
    expect_failure(case, fault, lambda: dump_activations(case.flex, loader, os.path.join(tmp, f"{fault}-bad"),
                                                         [name], hook_type=fault.hook, unpack_idx=bad, run=run,
                                                         progress=False))
    case.flex.clear_output_dict()
    reader = dump_activations(case.flex, loader, os.path.join(tmp, f"{fault}-good"), [name], hook_type=fault.hook,
                              run=run, progress=False)
    _, want = case.reference([], [HookSpec(fault.hook, name)], False)
    if case.rank == case.flex.layout.owner:
        torch.testing.assert_close(reader.read(name), torch.cat(want[name] * 2), msg=lambda m: f"{fault}: {m}")
    else:
        assert reader is None
    case.flex.clear_output_dict()


def fault_body(rank: int, world_size: int, layout: str, faults: Sequence[Tuple[Fault, int]], tmp: str) -> None:
    case = build(layout, rank, world_size)
    for fault, passes_before in faults:
        run_fault(case, fault, passes_before, tmp)
    case.flex.restore()


def run_matrix(layout: str, faults: Sequence[Tuple[Fault, int]], timeout: float = 240) -> None:
    tmp = tempfile.mkdtemp(prefix="flex_fault_matrix_")
    try:
        run_ranks(fault_body, LAYOUTS[layout], layout, list(faults), tmp, timeout=timeout)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# -- the default run: a covering subset per layout; the slow run: everything ------------------------------
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_faults_on_one_rank(layout):
    """A covering subset of the faults (``covering_faults``), one after another on one wrapper."""
    run_matrix(layout, [(f, 0) for f in covering_faults(layout)])


def test_the_covering_subset_covers():
    for layout in LAYOUTS:
        chosen = covering_faults(layout)
        assert set().union(*map(_features, chosen)) == set().union(*map(_features, all_faults(layout))), layout
        assert {f.firing for f in chosen} == set(FIRINGS), layout
        assert {f.hook for f in chosen} == set(HOOKS) - ({"tensor"} if layout in FSDP_LAYOUTS else set()), layout
        assert {f.rank for f in chosen} == set(range(LAYOUTS[layout])), layout
        assert {f.where for f in chosen} == set(WHERES), layout
        if layout in FSDP_LAYOUTS:
            assert all(f.hook != "tensor" for f in chosen)


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_fault_on_every_rank(layout):
    """The full cross product: every hook kind × firing kind × where × failing rank that exists on the layout."""
    faults = all_faults(layout)
    run_matrix(layout, [(f, 0) for f in faults], timeout=60 + 6 * len(faults) * LAYOUTS[layout])


try:
    from hypothesis import HealthCheck, given, settings, strategies as st
except ImportError:  # pragma: no cover  (hypothesis is in the test extra)
    st = None

if st is not None:
    @st.composite
    def fault_sequences(draw):
        layout = draw(st.sampled_from(list(LAYOUTS)))
        faults = draw(st.lists(st.tuples(st.sampled_from(all_faults(layout)), st.integers(0, 2)),
                               min_size=1, max_size=6))
        return layout, faults

    @pytest.mark.slow
    @settings(max_examples=20, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(fault_sequences())
    def test_random_fault_sequences(drawn):
        """Faults one after another on one wrapper, each after 0-2 good passes (which rank, which pass, which
        hook drawn by hypothesis)."""
        layout, faults = drawn
        run_matrix(layout, faults)


# -- a dump's loader and run, a later stage's leftovers; known gaps as strict xfails ----------------------
@pytest.mark.parametrize("broken", [
    "loader",  # every batch is agreed on by every rank before any runs it (activations._agreed)
    pytest.param("run", marks=[pytest.mark.slow, pytest.mark.xfail(
        strict=True, reason="a `run` that raises on one rank before its forward leaves the others inside the "
        "forward's collectives (the model's, and the hooks' exchanges), waiting until the process group times "
        "out: nothing can agree with a rank that is not in the collective")]),
])
def test_a_dump_whose_loader_or_run_raises_on_one_rank(broken):
    # A strict xfail costs its whole timeout: 15 s is the ranks' start plus far more than a fixed dump needs.
    run_ranks(_dump_loader_body, 2, broken, timeout=15)


def _dump_loader_body(rank: int, world_size: int, broken: str) -> None:
    """DP=2; rank 1's loader (or run) raises at the second batch. Every rank should raise."""
    flex = FlexModel(tiny_gpt(), {}, data_parallel_size=2)
    mine = tokens()[rank * 2:(rank + 1) * 2]

    def loader() -> Iterator[torch.Tensor]:
        yield mine
        if broken == "loader" and rank == 1:
            raise Boom("the loader broke")
        yield mine

    calls = []

    def run(flex, batch):
        calls.append(1)
        if broken == "run" and rank == 1 and len(calls) == 2:
            raise Boom("run broke")
        return flex(batch)

    tmp = os.path.join(tempfile.gettempdir(), f"flex_dump_loader_{os.getppid()}")
    start = time.monotonic()
    try:
        with pytest.raises(Boom) if rank == 1 else pytest.raises(RuntimeError, match="rank 1 raised"):
            dump_activations(flex, loader(), tmp, ["layers.0.mlp.up"], run=run, progress=False)
        assert time.monotonic() - start < LIMIT_S
    finally:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)


def test_a_dump_whose_first_stage_fails_in_its_backward():
    """pp=2, a full_backward dump of block0.mlp.down with a wrong unpack_idx on rank 0 (stage 0): rank 0 raises
    IndexError in its backward; rank 1 should raise too. The fault the matrix leaves out (``valid``)."""
    tmp = tempfile.mkdtemp(prefix="flex_dump_pp_")
    try:
        run_ranks(fault_body, 2, "pp2", [(Fault("full_backward", "dump", "unpack", 0), 0)], tmp, timeout=15)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@multi_process(2, timeout=60)
def test_a_failed_pass_on_a_later_stage_leaves_no_capture_behind(rank, world_size):
    """pp=2: the editing function on stage 1's root (rank 1) raises after its capture was queued for the owner;
    after clear_output_dict() the next pass must give the owner that pass's capture only."""
    case = build("pp2", rank, world_size)
    fault = Fault("forward", "edit", "late", 1)
    armed = make_hook(case, fault)
    case.flex.register(armed.hook, "forward")
    armed.arm()
    with pytest.raises((Boom, PeerStageFailed)):
        case.step()
    armed.disarm()
    case.flex.clear_output_dict()
    case.step()
    case.collect()
    _, want = case.reference([armed.spec], [], True)
    if rank == 0:
        check_capture_dict(case.out, want)  # got 2 captures of block1.mlp.up: the failed pass's, then this one's


# -- a rank that dies mid-pass ---------------------------------------------------------------------------
def _timed_child(rank: int, world_size: int, conn, init_file: str, port: int, pg_timeout_s: float, fn: Callable,
                 args: tuple) -> None:
    """One rank: a process group WITH a timeout, then ``fn``; reports ``(status, detail, seconds in fn)``."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    start = time.monotonic()
    try:
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=pg_timeout_s))
        dist.barrier()
        start = time.monotonic()
        report = ("ok", repr(fn(rank, world_size, *args)), 0.0)
    except BaseException as e:  # noqa: BLE001
        report = ("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}", 0.0)
    report = (report[0], report[1], time.monotonic() - start)
    try:
        conn.send(report)
        conn.close()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)  # no destroy_process_group: a peer is gone


def run_with_pg_timeout(fn: Callable, world_size: int, *args, pg_timeout_s: float = 10.0, wall_s: float = 60.0,
                        wait_for: Optional[Sequence[int]] = None) -> Dict[int, Tuple[str, str, float]]:
    """Like ``run_ranks``, but the group has a timeout and a rank may die: ``{rank: (status, detail,
    seconds)}``, status ``ok`` / ``error`` / ``died`` (exited without a report) / ``timeout`` (killed after
    ``wall_s``, or once the ranks of ``wait_for`` have reported)."""
    ctx = multiprocessing.get_context("fork")
    tmp, port = tempfile.mkdtemp(prefix="flex_dying_rank_"), free_port()
    readers, processes = [], []
    start = time.monotonic()
    reports: Dict[int, Tuple[str, str, float]] = {}
    try:
        for rank in range(world_size):
            reader, writer = ctx.Pipe(duplex=False)
            process = ctx.Process(target=_timed_child, name=f"rank{rank}",
                                  args=(rank, world_size, writer, os.path.join(tmp, "rendezvous"), port,
                                        pg_timeout_s, fn, args))
            process.start()
            writer.close()
            readers.append(reader)
            processes.append(process)
        awaited = set(range(world_size) if wait_for is None else wait_for)
        while not awaited <= set(reports) and time.monotonic() - start < wall_s:
            pending = [r for r in range(world_size) if r not in reports]
            multiprocessing.connection.wait([readers[r] for r in pending] + [processes[r].sentinel for r in pending],
                                            timeout=1.0)
            for r in pending:
                got = None
                if readers[r].poll():
                    try:
                        got = readers[r].recv()
                    except EOFError:
                        got = None
                if got is not None:
                    reports[r] = got
                elif not processes[r].is_alive():
                    reports[r] = ("died", f"exit code {processes[r].exitcode}", time.monotonic() - start)
        for r in range(world_size):
            reports.setdefault(r, ("timeout", f"no report after {time.monotonic() - start:.0f}s, killed",
                                   time.monotonic() - start))
    finally:
        for process in processes:
            _stop(process)
        for reader in readers:
            reader.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return reports


class DieOn(ShardwiseEdit):
    def __init__(self, rank: int, dying: int) -> None:
        self.rank, self.dying = rank, dying

    def edit_shard(self, current_module, local, shard, modules):
        if self.rank == self.dying:
            os._exit(1)
        return None


def _dying_body(rank: int, world_size: int, layout: str, firing: str, dying: int) -> None:
    """Rank ``dying`` exits mid-pass: in a shardwise edit (the peers go on to the model's or our next
    collective), or in the root's editing function (the peers wait for its verdict)."""
    case = build(layout, rank, world_size)
    name = "layers.0.mlp.up"
    if firing == "shardwise":
        case.flex.register(HookFunction(name, editing_function=DieOn(rank, dying)), "forward")
    else:
        def die(module, x, save_ctx, modules):
            os._exit(1)
        case.flex.register(HookFunction(name, editing_function=die), "forward")
    case.step()


PEER_GONE = ("connection closed by peer", "connection reset by peer", "broken pipe")


@pytest.mark.parametrize("layout,firing,dying", [
    ("fsdp1", "shardwise", 1),  # the survivor is next in FSDP's all-gather
    ("fairscale_tp2", "shardwise", 0),  # in the row-parallel all-reduce
    ("fairscale_tp2", "edit", 0),  # the root dies in its editing function: the peer waits for the verdict
])
def test_a_rank_that_dies_mid_pass(layout, firing, dying):
    """The survivors fail within the process group's timeout (10 s), with gloo's error naming the lost peer."""
    reports = run_with_pg_timeout(_dying_body, LAYOUTS[layout], layout, firing, dying, pg_timeout_s=10)
    assert reports[dying][0] == "died", reports
    for rank, (status, detail, seconds) in reports.items():
        if rank == dying:
            continue
        assert status == "error", f"rank {rank}: {status} {detail}"
        assert seconds < LIMIT_S, f"rank {rank} took {seconds:.1f}s"
        first = detail.splitlines()[0]
        assert first.startswith("RuntimeError") and any(p in first.lower() for p in PEER_GONE), first


def _hung_body(rank: int, world_size: int, hang_s: float) -> str:
    """Rank 1 stalls (alive, sockets open) in a shardwise edit; rank 0 goes on to flex_model's end-of-forward
    agreement, a collective on a group flex_model created."""
    class Stall(ShardwiseEdit):
        def edit_shard(self, current_module, local, shard, modules):
            if rank == 1:
                time.sleep(hang_s)

    flex = FlexModel(tiny_gpt(), {}, data_parallel_size=2)  # (DDP's constructor waits out a short timeout)
    flex.register(HookFunction("layers.0.mlp.up", editing_function=Stall()), "forward")
    flex(tokens()[rank * 2:(rank + 1) * 2])
    return "returned"


def test_a_hung_rank_times_out_with_the_process_group_timeout():
    """Rank 1 stalls in its shardwise edit; rank 0, in flex_model's agreement on a group flex_model made, raises
    gloo's timeout after the job's 5 s (not torch's 30 min default for new groups)."""
    hang_s, pg_timeout_s = 12.0, 5.0
    reports = run_with_pg_timeout(_hung_body, 2, hang_s, pg_timeout_s=pg_timeout_s, wall_s=hang_s + 20,
                                  wait_for=[0])
    status, detail, seconds = reports[0]
    assert status == "error" and seconds < hang_s - 4, (
        f"rank 0 waited {seconds:.1f}s for a peer stalled {hang_s:g}s (group timeout {pg_timeout_s:g}s): "
        f"{status} {detail.splitlines()[0]}")
    assert "timed out" in detail.splitlines()[0].lower(), detail.splitlines()[0]
