"""Data parallel (DDP) under FlexModel, on real gloo ranks, against one process.

The DDP cases: five hook types at 2 and 4 ranks, an uneven batch split, a
seq-first layout (``batch_dim=1``), ``store="all"``, and failures (on the
root's edit, on one rank only). Every rank builds the same seeded model, runs
the single-process reference with plain torch hooks on the FULL batch, then
the sharded model under FlexModel on its batch slice, and compares outputs,
captures (the full tensor, on rank 0), edited outputs and every gradient.
The machinery they share with the FSDP and accelerate cases (``HookSpec``,
``reference_run``, ``register``, the checks) is in ``_test/distributed.py``.
"""
from __future__ import annotations

import time
from typing import Callable, Dict, List, Sequence

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from _test.distributed import (HookSpec, Result, check_captures, check_grads, ddp_grads, five_hook_types, fixed,
                               flex_backward, flex_step, multi_process, reference_run, register, row_slices, tokens)
from _test.models import tiny_gpt
from flex_model import FlexModel, HookFailure, HookFunction

T, D = 8, 32  # the default tokens' length, TinyGPT width
A = fixed(D, D, seed=7)


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


def _raises_on_every_rank(rank: int, failing_rank: int, error: type, call: Callable[[], object],
                          *named: str) -> None:
    """``call()`` raises ``error`` on ``failing_rank`` and ``HookFailure`` on every other rank, within 10 s
    (no rank hangs); the other ranks' message names each of ``named``."""
    start = time.monotonic()
    with pytest.raises(error if rank == failing_rank else HookFailure) as info:
        call()
    assert time.monotonic() - start < 10
    if rank != failing_rank:
        for word in named:
            assert word in str(info.value), str(info.value)


def _ddp_tiny_gpt(rank: int, world_size: int):
    """The default batch, this rank's 2 rows of it, and a DDP TinyGPT under FlexModel."""
    idx = tokens()
    mine = idx[rank * 2:(rank + 1) * 2]
    return idx, mine, FlexModel(DDP(tiny_gpt()), {}, data_parallel_size=world_size)


@multi_process(world_size=2, timeout=60)
def test_edit_raising_on_root_errors_every_rank(rank, world_size):
    idx, mine, flex = _ddp_tiny_gpt(rank, world_size)
    hook = HookFunction("layers.0.mlp", editing_function=lambda m, x, ctx, mods: _fail(x))
    handle = flex.register_forward_hook(hook)
    _raises_on_every_rank(rank, 0, EditFailed, lambda: flex(mine), "layers.0.mlp", "EditFailed")
    handle.remove()
    _next_step_still_works(rank, world_size, flex, idx, mine,
                           [HookSpec("forward", "layers.1.mlp", lambda x: x @ A)], tiny_gpt)


@multi_process(world_size=2, timeout=60)
def test_gradient_edit_raising_on_root_errors_every_rank_in_backward(rank, world_size):
    """The same inside backward (a full_backward_pre edit). DDP cannot start another backward after an
    aborted one, so the next step checked is a no-grad forward."""
    idx, mine, flex = _ddp_tiny_gpt(rank, world_size)
    hook = HookFunction("layers.0.mlp", editing_function=lambda m, g, ctx, mods: _fail(g))
    handle = flex.register_full_backward_pre_hook(hook)
    out = flex(mine)
    _raises_on_every_rank(rank, 0, EditFailed,
                          lambda: flex_backward(out, mine, idx.numel() - idx.shape[0], world_size))
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
    _raises_on_every_rank(rank, 1, IndexError, lambda: flex(mine), "rank 1", "IndexError")
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
    probe = _probe()
    ref = reference_run(tiny_gpt(), idx, [HookSpec("forward", "layers.0.mlp", lambda x: x + probe(x).flip(0))])
    model = DDP(tiny_gpt())
    output_dict: Dict[str, List[torch.Tensor]] = {}
    flex = FlexModel(model, output_dict, data_parallel_size=world_size)
    flex.register_trainable_module("probe", _probe())
    flex.register_forward_hook(HookFunction(
        "layers.0.mlp", editing_function=lambda m, x, ctx, mods: x + mods["probe"](x).flip(0)))
    flex_step(flex, idx, row_slices(sizes)[rank], ref, world_size)
    check_grads(ddp_grads(model), ref)
    got = {n: p.grad for n, p in flex.trainable_modules["probe"].named_parameters()}
    if rank == 0:
        check_grads(got, Result(ref.out, {}, {n: p.grad for n, p in probe.named_parameters()}))
    else:
        assert all(g is None for g in got.values()), "the edit runs on the root only"

