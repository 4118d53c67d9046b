"""What flex_model costs on a sharded model: retrieving every block's output at DP=2 and TP=2.

    python benchmarks/sharded_overhead.py            # spawns 2 CPU ranks (gloo), prints a table
    python benchmarks/sharded_overhead.py --json     # one line: {"dp2": r, "tp2": r, "tp2_split": r}
    python benchmarks/sharded_overhead.py --quick    # a smaller model, fewer repeats
    python benchmarks/sharded_overhead.py --quick --profile   # + each rank's cProfile of the flex forwards

Model: the LLaMA-style model of ``examples/megatron_fairscale.py``. Configs:

- ``dp2``: the plain-torch model under DDP, the batch split over 2 ranks; retrieve
  every block's output (each rank holds its batch slice).
- ``tp2``: the fairscale model at TP=2; retrieve every block's output (replicated
  over tp after the row-parallel all-reduce).
- ``tp2_split``: the same, retrieving every ``feed_forward.w1`` output (split over
  tp on the hidden dim: a real gather).

Each config runs three variants, interleaved, one forward each per round:
``plain`` (the sharded forward, no hooks), ``hand`` (plain torch forward hooks
doing the least a hand-written hook must: ``dist.gather`` of the pieces to rank
0 and a concatenation, or rank 0's own copy of a replicated tensor) and
``flex`` (FlexModel capture hooks on the same modules). Times are rank 0's
wall clock from a barrier to a barrier; the variants' order rotates per round.
Reported: the median time of each variant, and the ratios flex / hand and
flex / plain as the median over rounds of the within-round ratio (paired, so a
slow phase of a shared machine cancels out). ``--json`` gives flex / hand.
"""
from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import pstats
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from megatron_fairscale import ParallelLlama, build_pair  # noqa: E402

from flex_model import FlexModel, HookFunction  # noqa: E402
from flex_model.launch import launch  # noqa: E402


def hand_hook(split_dim, store: List[torch.Tensor]) -> Callable:
    """A hand-written capture hook: the pieces to rank 0 (``split_dim`` None: replicated, rank 0's copy)."""
    rank, world = dist.get_rank(), dist.get_world_size()

    def hook(module, args, out):
        out = out.detach()
        if split_dim is None:
            if rank == 0:
                store.append(out.clone())
            return
        pieces = [torch.empty_like(out) for _ in range(world)] if rank == 0 else None
        dist.gather(out.contiguous(), pieces, dst=0)
        if rank == 0:
            store.append(torch.cat(pieces, split_dim))
    return hook


def time_config(module: nn.Module, flex: FlexModel, names: List[str], split_dim, tokens: torch.Tensor,
                rounds: int, warmup: int, profiler: Optional[cProfile.Profile] = None) -> Dict[str, float]:
    """Median seconds per forward of the plain, hand and flex variants (interleaved rounds)."""
    inner = getattr(module, "module", module)  # hand hooks go on the model inside DDP
    times: Dict[str, List[float]] = {"plain": [], "hand": [], "flex": []}
    for r in range(warmup + rounds):
        order = list(times)
        for variant in order[r % 3:] + order[:r % 3]:  # rotate, so no variant always runs first
            store: List[torch.Tensor] = []
            if variant == "hand":
                handles = [inner.get_submodule(n).register_forward_hook(hand_hook(split_dim, store)) for n in names]
            elif variant == "flex":
                handles = [flex.register_forward_hook(HookFunction(n)) for n in names]
            else:
                handles = []
            dist.barrier()
            start = time.perf_counter()
            profiling = profiler is not None and variant == "flex" and r >= warmup
            if profiling:
                profiler.enable()
            with torch.no_grad():
                (flex if variant == "flex" else module)(tokens)
            if profiling:
                profiler.disable()
            dist.barrier()
            elapsed = time.perf_counter() - start
            for h in handles:
                h.remove()
            if dist.get_rank() == 0 and variant != "plain":
                got = sum(len(v) for v in flex.output_dict.values()) if variant == "flex" else len(store)
                assert got == len(names), f"{variant}: captured {got} tensors, expected {len(names)}"
            flex.clear_output_dict()
            if r >= warmup:
                times[variant].append(elapsed)
    medians = {k: statistics.median(v) for k, v in times.items()}
    # Paired: flex / hand within each round, so slow phases of a shared machine cancel out.
    medians["ratio"] = statistics.median(f / h for f, h in zip(times["flex"], times["hand"]))
    medians["ratio_plain"] = statistics.median(f / p for f, p in zip(times["flex"], times["plain"]))
    return medians


def main(quick: bool, as_json: bool, rounds: int, profile: bool) -> None:
    torch.set_num_threads(1)
    rank, world = dist.get_rank(), dist.get_world_size()
    n_layers, dim, batch, seq = (2, 128, 4, 64) if quick else (4, 256, 8, 128)
    rounds, warmup = (rounds or (7 if quick else 31)), 3
    profiler = cProfile.Profile() if profile else None
    torch.manual_seed(1)
    tokens = torch.randint(0, 128, (batch, seq))
    results = {}

    # dp2: the plain model under DDP, each rank its batch slice.
    torch.manual_seed(0)
    plain = ParallelLlama(parallel=False, n_layers=n_layers, dim=dim, hidden=2 * dim)
    ddp = nn.parallel.DistributedDataParallel(plain)
    flex = FlexModel(ddp, {}, data_parallel_size=world)
    blocks = [f"layers.{i}" for i in range(n_layers)]
    results["dp2"] = time_config(ddp, flex, blocks, 0, tokens.chunk(world)[rank], rounds, warmup, profiler)
    flex.restore()

    # tp2 / tp2_split: the fairscale model, every rank the whole batch.
    with contextlib.redirect_stdout(sys.stderr):  # fairscale prints its initialisation
        sharded, _ = build_pair(world, n_layers=n_layers, dim=dim)
    flex = FlexModel(sharded, {}, tensor_parallel_size=world)
    results["tp2"] = time_config(sharded, flex, blocks, None, tokens, rounds, warmup, profiler)
    w1 = [f"layers.{i}.feed_forward.w1" for i in range(n_layers)]
    results["tp2_split"] = time_config(sharded, flex, w1, -1, tokens, rounds, warmup, profiler)
    flex.restore()

    if profiler is not None:
        for r in range(world):  # each rank's profile of its flex forwards, in turn
            if r == rank:
                text = io.StringIO()
                stats = pstats.Stats(profiler, stream=text).sort_stats("tottime")
                stats.print_stats(10)
                stats.print_callers("c10d.wait")  # whose collectives the waiting belongs to
                print(f"--- rank {rank}: cProfile of the flex forwards, by own time ---\n{text.getvalue()}",
                      file=sys.stderr, flush=True)
            dist.barrier()
    if rank != 0:
        return
    ratios = {k: round(v["ratio"], 4) for k, v in results.items()}
    if as_json:
        print(json.dumps(ratios))
        return
    print(f"{n_layers} layers, dim {dim}, batch {batch} x {seq} tokens, 2 CPU ranks (gloo), "
          f"median of {rounds} rounds")
    print("| config | plain ms | hand ms | flex ms | flex / hand | flex / plain | flex - hand per hook (ms) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for k, v in results.items():
        print(f"| {k} | {v['plain'] * 1e3:.2f} | {v['hand'] * 1e3:.2f} | {v['flex'] * 1e3:.2f} | "
              f"{v['ratio']:.3f} | {v['ratio_plain']:.3f} | "
              f"{(v['flex'] - v['hand']) * 1e3 / n_layers:.2f} |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON line of flex/hand ratios")
    parser.add_argument("--quick", action="store_true", help="smaller model, fewer rounds")
    parser.add_argument("--rounds", type=int, default=0, help="timed rounds (default 31; 7 with --quick)")
    parser.add_argument("--profile", action="store_true", help="cProfile the flex forwards on every rank (stderr)")
    a = parser.parse_args()
    launch(main, nprocs=2, args=(a.quick, a.json, a.rounds, a.profile))
