"""Data parallel (DDP) under FlexModel, on real gloo ranks, against one process.

Owns the shared machinery of the data-parallel tests (``HookSpec``,
``reference_run``, ``flex_run``, ``check_against_reference``) and the DDP
cases: five hook types at 2 and 4 ranks, an uneven batch split, a seq-first
layout (``batch_dim=1``), ``store="all"``, and failures (on the root's edit,
on one rank only). Every rank builds the same seeded model, runs the
single-process reference with plain torch hooks on the FULL batch, then the
sharded model under FlexModel on its batch slice, and compares outputs,
captures (the full tensor, on rank 0), edited outputs and every gradient.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from _test.distributed import multi_process
from _test.models import TinyGPT
from flex_model import FlexModel, HookFailure, HookFunction

Fn = Callable[[torch.Tensor], torch.Tensor]
B, T, D = 4, 8, 32  # batch, sequence, TinyGPT width


@dataclass
class HookSpec:
    """One hook: its type, the dotted name in the unwrapped model, and an optional edit of the full value."""

    kind: str  # forward | forward_pre | full_backward | full_backward_pre | tensor
    name: str
    fn: Optional[Fn] = None
    expected_shape: Optional[tuple] = None


def fixed(*shape: int, seed: int = 7) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) / shape[-1] ** 0.5


def tokens(n: int = B, t: int = T, vocab: int = 61, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (n, t), generator=torch.Generator().manual_seed(seed))


def tiny_gpt(seed: int = 0) -> TinyGPT:
    torch.manual_seed(seed)
    return TinyGPT()


def row_slices(sizes: Sequence[int]) -> List[slice]:
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return [slice(s, s + n) for s, n in zip(starts, sizes)]


# -- the single-process reference: plain torch hooks -----------------------------------------------------
def _apply(fn: Optional[Fn], x: torch.Tensor) -> torch.Tensor:
    return x if fn is None else fn(x)


def reference_hooks(model: nn.Module, specs: Sequence[HookSpec], seen: Dict[str, List[torch.Tensor]]) -> list:
    """Register plain torch hooks doing what each spec asks; captures go to ``seen`` (before the edit)."""
    handles = []
    for s in specs:
        def keep(x: torch.Tensor, s: HookSpec = s) -> torch.Tensor:
            seen.setdefault(s.name, []).append(x.detach().clone())
            return _apply(s.fn, x)
        if s.kind == "tensor":
            handles.append(model.get_parameter(s.name).register_hook(keep))
            continue
        m = model.get_submodule(s.name)
        if s.kind == "forward":
            handles.append(m.register_forward_hook(lambda mod, a, out, keep=keep: (keep(out[0]),) + out[1:]
                                                   if isinstance(out, tuple) else keep(out)))
        elif s.kind == "forward_pre":
            handles.append(m.register_forward_pre_hook(lambda mod, a, keep=keep: (keep(a[0]),) + a[1:]))
        elif s.kind == "full_backward":
            handles.append(m.register_full_backward_hook(lambda mod, gi, go, keep=keep: (keep(gi[0]),) + gi[1:]))
        elif s.kind == "full_backward_pre":
            handles.append(m.register_full_backward_pre_hook(lambda mod, go, keep=keep: (keep(go[0]),) + go[1:]))
        else:
            raise ValueError(f"unknown hook kind {s.kind!r}")
    return handles


def lm_loss_sum(logits: torch.Tensor, idx: torch.Tensor, batch_dim: int = 0) -> torch.Tensor:
    """Next-token cross-entropy summed over the tokens (``idx`` is batch-first)."""
    if batch_dim == 1:
        logits = logits.transpose(0, 1)
    return nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), idx[:, 1:].reshape(-1),
                                       reduction="sum")


@dataclass
class Result:
    out: torch.Tensor
    seen: Dict[str, List[torch.Tensor]]
    grads: Dict[str, torch.Tensor]


def reference_run(model: nn.Module, idx: torch.Tensor, specs: Sequence[HookSpec], *, batch_dim: int = 0,
                  forward: Optional[Callable[[nn.Module, torch.Tensor], torch.Tensor]] = None,
                  backward: bool = True) -> Result:
    """One process, full batch, plain torch hooks; loss = mean token loss over the full batch."""
    seen: Dict[str, List[torch.Tensor]] = {}
    handles = reference_hooks(model, specs, seen)
    forward = forward or (lambda m, x: m(x))
    out = forward(model, idx)
    if backward:
        (lm_loss_sum(out, idx, batch_dim) / (idx.numel() - idx.shape[0])).backward()
    for h in handles:
        h.remove()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return Result(out.detach(), seen, grads)


def register(flex: FlexModel, specs: Sequence[HookSpec]) -> None:
    for s in specs:
        fn = None if s.fn is None else (lambda module, x, ctx, mods, f=s.fn: f(x))
        hook = HookFunction(s.name, expected_shape=s.expected_shape, editing_function=fn)
        getattr(flex, {"forward": "register_forward_hook", "forward_pre": "register_forward_pre_hook",
                       "full_backward": "register_full_backward_hook",
                       "full_backward_pre": "register_full_backward_pre_hook",
                       "tensor": "register_hook"}[s.kind])(hook)


def flex_backward(out: torch.Tensor, idx_local: torch.Tensor, n_tokens_total: int, world_size: int,
                  batch_dim: int = 0) -> None:
    """Backward of this rank's share of the global mean loss, scaled by the world size because DDP and
    FSDP average gradients over ranks: mean over ranks of the local losses = the full-batch mean loss,
    also for uneven slices."""
    (lm_loss_sum(out, idx_local, batch_dim) * world_size / n_tokens_total).backward()


def check_captures(rank: int, output_dict: Dict[str, List[torch.Tensor]], ref: Result, specs: Sequence[HookSpec],
                   store: str = "root") -> None:
    """The owner (rank 0) — every rank with ``store="all"``, none with "none" — holds each full capture."""
    if store == "none" or (rank != 0 and store == "root"):
        assert output_dict == {}, f"rank {rank} stored {sorted(output_dict)} with store={store!r}"
        return
    assert sorted(output_dict) == sorted({s.name for s in specs})
    for s in specs:
        got, want = output_dict[s.name], ref.seen[s.name]
        assert len(got) == len(want), f"{s.name}: {len(got)} captures, expected {len(want)}"
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, msg=lambda m, n=s.name: f"capture of {n}: {m}")


def check_grads(got: Dict[str, torch.Tensor], ref: Result) -> None:
    assert sorted(got) == sorted(ref.grads)
    for name, g in got.items():
        torch.testing.assert_close(g, ref.grads[name], msg=lambda m, n=name: f"grad of {n}: {m}")


def ddp_grads(model: DDP) -> Dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.module.named_parameters() if p.grad is not None}


# -- DDP ---------------------------------------------------------------------------------------------------------
A, A2 = fixed(D, D, seed=7), fixed(D, D, seed=8)


def five_hook_types() -> List[HookSpec]:
    """Edits that are not elementwise (x @ A, rows mixed across the batch) on every hook type."""
    return [
        HookSpec("forward", "layers.0.mlp", lambda x: x @ A + x.flip(0)),
        HookSpec("forward", "layers.1.attn", lambda x: x * 2),
        HookSpec("forward_pre", "layers.1.mlp", lambda x: x @ A2),
        HookSpec("full_backward", "layers.0.attn", lambda g: g @ A + g.roll(1, 0)),
        HookSpec("full_backward_pre", "ln_f", lambda g: g * 3 - g.mean(0, keepdim=True)),
        HookSpec("tensor", "layers.1.mlp.up.weight", lambda g: g * 2 + g.flip(1)),
        HookSpec("forward", "layers.1.ln2"),  # capture only
    ]


def run_ddp_case(rank: int, world_size: int, specs: Sequence[HookSpec], sizes: Sequence[int], *,
                 make: Callable[[], nn.Module] = tiny_gpt, batch_dim: int = 0, store: str = "root") -> None:
    """``sizes[r]`` rows of the batch on rank r; with ``batch_dim=1`` the model takes (seq, batch) tokens."""
    idx = tokens(sum(sizes))
    mine = idx[row_slices(sizes)[rank]]
    layout = (lambda x: x) if batch_dim == 0 else (lambda x: x.t())
    ref = reference_run(make(), idx, specs, batch_dim=batch_dim, forward=lambda m, x: m(layout(x)))
    model = DDP(make())
    output_dict: Dict[str, List[torch.Tensor]] = {}
    flex = FlexModel(model, output_dict, data_parallel_size=world_size, batch_dim=batch_dim, store=store)
    register(flex, specs)
    out = flex(layout(mine))
    torch.testing.assert_close(out.detach(), ref.out.narrow(batch_dim, sum(sizes[:rank]), sizes[rank]))
    flex_backward(out, mine, idx.numel() - idx.shape[0], world_size, batch_dim)
    check_captures(rank, output_dict, ref, specs, store)
    check_grads(ddp_grads(model), ref)
    flex.restore()


@multi_process(world_size=2)
def test_ddp_five_hook_types_2_ranks(rank, world_size):
    run_ddp_case(rank, world_size, five_hook_types(), [2, 2])


@multi_process(world_size=4)
def test_ddp_five_hook_types_4_ranks(rank, world_size):
    run_ddp_case(rank, world_size, five_hook_types(), [1, 1, 1, 1])


@multi_process(world_size=2)
def test_ddp_value_without_batch_dim_is_not_split(rank, world_size):
    """Position embeddings (T, D) are the same on every dp rank: expected_shape gives dim 0 its local
    size, so the capture is (T, D), the edit is applied once, and gradients through it (per-rank parts,
    averaged) equal one process's."""
    run_ddp_case(rank, world_size, [HookSpec("forward", "wpe", lambda x: x @ A + 1, expected_shape=(T, D)),
                                    HookSpec("forward", "layers.0.mlp", lambda x: x.flip(0))], [2, 2])
    run_ddp_case(rank, world_size, [HookSpec("full_backward_pre", "wpe", lambda g: g * 2 + g.flip(0),
                                             expected_shape=(T, D))], [2, 2])


@multi_process(world_size=2)
def test_ddp_uneven_batch(rank, world_size):
    """Rank 0 holds 3 rows, rank 1 holds 2: captures, edits and gradients still match one process."""
    run_ddp_case(rank, world_size, five_hook_types(), [3, 2])


@multi_process(world_size=2)
def test_ddp_store_all_puts_full_tensor_on_every_rank(rank, world_size):
    specs = [HookSpec("forward", "layers.0.mlp", lambda x: x @ A), HookSpec("full_backward_pre", "ln_f"),
             HookSpec("tensor", "layers.0.mlp.down.weight")]
    run_ddp_case(rank, world_size, specs, [2, 2], store="all")


@multi_process(world_size=2)
def test_ddp_store_none_keeps_nothing_and_still_edits(rank, world_size):
    run_ddp_case(rank, world_size, five_hook_types(), [2, 2], store="none")


class SeqFirstLM(nn.Module):
    """A language model on (seq, batch) tokens: torch's seq-first transformer layer (batch_first=False)."""

    def __init__(self, vocab: int = 61, d: int = D) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.layer = nn.TransformerEncoderLayer(d, nhead=4, dim_feedforward=2 * d, dropout=0.0)
        self.head = nn.Linear(d, vocab)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head(self.layer(self.emb(idx)))


def seq_first_lm(seed: int = 0) -> SeqFirstLM:
    torch.manual_seed(seed)
    return SeqFirstLM()


@multi_process(world_size=2)
def test_ddp_batch_dim_1_seq_first(rank, world_size):
    """Activations are (seq, batch, ...): data parallel splits dim 1; edits mix the batch (flip(1))."""
    specs = [
        HookSpec("forward", "layer.linear1", lambda x: x @ fixed(2 * D, 2 * D) + x.flip(1)),
        HookSpec("forward", "layer.self_attn"),  # a tuple (out, None): leaf 0
        HookSpec("forward_pre", "head", lambda x: x * 2 - x.mean(1, keepdim=True)),
        HookSpec("full_backward", "layer.norm2", lambda g: g @ A + g.roll(1, 1)),
        HookSpec("full_backward_pre", "layer.linear2", lambda g: g * 3),
        HookSpec("tensor", "layer.linear1.weight", lambda g: g.flip(0)),
    ]
    run_ddp_case(rank, world_size, specs, [2, 2], make=seq_first_lm, batch_dim=1)


# -- failures -------------------------------------------------------------------------------------------------------
class EditFailed(Exception):
    pass


def _fail(x: torch.Tensor) -> torch.Tensor:
    raise EditFailed("the editing function gave up")


def _next_step_still_works(rank: int, world_size: int, flex: FlexModel, idx: torch.Tensor,
                           mine: torch.Tensor, specs: Sequence[HookSpec], make: Callable[[], nn.Module]) -> None:
    """The group is not wedged: a collective completes and a fresh hook matches one process again."""
    t = torch.tensor([float(rank)])
    dist.all_reduce(t)
    assert t.item() == sum(range(world_size))
    ref = reference_run(make(), idx, specs, backward=False)
    flex.output_dict.clear()
    register(flex, specs)
    with torch.no_grad():
        out = flex(mine)
    torch.testing.assert_close(out, ref.out[rank * len(mine):(rank + 1) * len(mine)])
    if rank == 0:
        torch.testing.assert_close(flex.output_dict[specs[0].name][0], ref.seen[specs[0].name][0])


@multi_process(world_size=2, timeout=60)
def test_edit_raising_on_root_errors_every_rank(rank, world_size):
    idx = tokens()
    mine = idx[rank * 2:(rank + 1) * 2]
    model = DDP(tiny_gpt())
    flex = FlexModel(model, {}, data_parallel_size=world_size)
    hook = HookFunction("layers.0.mlp", editing_function=lambda m, x, ctx, mods: _fail(x))
    handle = flex.register_forward_hook(hook)
    start = time.monotonic()
    with pytest.raises(EditFailed if rank == 0 else HookFailure) as info:
        flex(mine)
    assert time.monotonic() - start < 10
    if rank != 0:
        assert "layers.0.mlp" in str(info.value) and "EditFailed" in str(info.value), str(info.value)
    handle.remove()
    _next_step_still_works(rank, world_size, flex, idx, mine,
                           [HookSpec("forward", "layers.1.mlp", lambda x: x @ A)], tiny_gpt)


@multi_process(world_size=2, timeout=60)
def test_gradient_edit_raising_on_root_errors_every_rank_in_backward(rank, world_size):
    """The same inside backward (a full_backward_pre edit). DDP cannot start another backward after an
    aborted one, so the next step checked is a no-grad forward."""
    idx = tokens()
    mine = idx[rank * 2:(rank + 1) * 2]
    model = DDP(tiny_gpt())
    flex = FlexModel(model, {}, data_parallel_size=world_size)
    hook = HookFunction("layers.0.mlp", editing_function=lambda m, g, ctx, mods: _fail(g))
    handle = flex.register_full_backward_pre_hook(hook)
    out = flex(mine)
    start = time.monotonic()
    with pytest.raises(EditFailed if rank == 0 else HookFailure):
        flex_backward(out, mine, idx.numel() - idx.shape[0], world_size)
    assert time.monotonic() - start < 10
    handle.remove()
    _next_step_still_works(rank, world_size, flex, idx, mine,
                           [HookSpec("forward", "layers.1.mlp", lambda x: x @ A)], tiny_gpt)


class RankDependentLeaves(nn.Module):
    """Returns (x,) on rank 1 but (x, x + 1) elsewhere: ``unpack_idx=1`` is out of range on rank 1 only."""

    def forward(self, x: torch.Tensor):
        return (x,) if dist.get_rank() == 1 else (x, x + 1)


class ForkedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up, self.fork, self.down = nn.Linear(D, D), RankDependentLeaves(), nn.Linear(D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.fork(self.up(x))[0])


def forked_net(seed: int = 0) -> ForkedNet:
    torch.manual_seed(seed)
    return ForkedNet()


def _failure_on_rank_1_only(rank: int, world_size: int) -> None:
    x = fixed(2 * world_size, D, seed=3)
    mine = x[rank * 2:(rank + 1) * 2]
    model = DDP(forked_net())
    flex = FlexModel(model, {}, data_parallel_size=world_size)
    handle = flex.register_forward_hook(HookFunction("fork", editing_function=lambda m, v, ctx, mods: v * 2,
                                                     unpack_idx=1))
    start = time.monotonic()
    with pytest.raises(IndexError if rank == 1 else HookFailure) as info:
        flex(mine)
    assert time.monotonic() - start < 10
    if rank != 1:
        assert "rank 1" in str(info.value) and "IndexError" in str(info.value), str(info.value)
    handle.remove()
    _next_step_still_works(rank, world_size, flex, x, mine, [HookSpec("forward", "up", lambda v: v @ A)],
                           forked_net)


@multi_process(world_size=2, timeout=60)
def test_failure_on_one_rank_only_errors_every_rank_2(rank, world_size):
    _failure_on_rank_1_only(rank, world_size)


@multi_process(world_size=4, timeout=60)
def test_failure_on_one_rank_only_errors_every_rank_4(rank, world_size):
    _failure_on_rank_1_only(rank, world_size)


# -- trainable modules -------------------------------------------------------------------------------------------
def _probe(seed: int = 3) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(D, D)


@multi_process(world_size=2)
def test_ddp_trainable_module_gets_the_global_mean_loss_gradient(rank, world_size):
    """A trainable module used by the root's edit gets the single-process gradient (the DDP convention:
    the mean of the ranks' losses), not the sum over ranks; uneven slices (3 rows, 2 rows)."""
    sizes = [3, 2]
    idx = tokens(sum(sizes))
    mine = idx[row_slices(sizes)[rank]]
    probe = _probe()
    ref = reference_run(tiny_gpt(), idx, [HookSpec("forward", "layers.0.mlp", lambda x: x + probe(x).flip(0))])
    model = DDP(tiny_gpt())
    output_dict: Dict[str, List[torch.Tensor]] = {}
    flex = FlexModel(model, output_dict, data_parallel_size=world_size)
    flex.register_trainable_module("probe", _probe())
    flex.register_forward_hook(HookFunction(
        "layers.0.mlp", editing_function=lambda m, x, ctx, mods: x + mods["probe"](x).flip(0)))
    out = flex(mine)
    torch.testing.assert_close(out.detach(), ref.out[row_slices(sizes)[rank]])
    flex_backward(out, mine, idx.numel() - idx.shape[0], world_size)
    check_grads(ddp_grads(model), ref)
    got = {n: p.grad for n, p in flex.trainable_modules["probe"].named_parameters()}
    if rank == 0:
        check_grads(got, Result(ref.out, {}, {n: p.grad for n, p in probe.named_parameters()}))
    else:
        assert all(g is None for g in got.values()), "the edit runs on the root only"

