"""What flex_model costs on a sharded model: retrieving every block's output at DP=2 and TP=2.

    python benchmarks/sharded_overhead.py            # spawns 2 CPU ranks (gloo), prints a table
    python benchmarks/sharded_overhead.py --json     # one line: {"dp2": r, ..., "tp2_shardwise": r} (flex / hand)
                                                     # + the agreement's ms: per pass and in a tight loop
    python benchmarks/sharded_overhead.py --quick    # a smaller model, fewer repeats
    python benchmarks/sharded_overhead.py --quick --profile   # + each rank's cProfile of the flex forwards

Model: the LLaMA-style model of ``examples/megatron_fairscale.py``. Configs:

- ``dp2``: the plain-torch model under DDP, the batch split over 2 ranks; retrieve
  every block's output (each rank holds its batch slice).
- ``tp2``: the fairscale model at TP=2; retrieve every block's output (replicated
  over tp after the row-parallel all-reduce).
- ``tp2_split``: the same, retrieving every ``feed_forward.w1`` output (split over
  tp on the hidden dim: a real gather).
- ``dp2_shardwise`` / ``tp2_shardwise``: the DDP / fairscale model with an elementwise
  ``ShardwiseEdit`` (``x * 1.5`` on each rank's own shard) on every block's output: no
  gather, but one end-of-forward agreement (a small all-gather over the stage) per pass,
  so that a rank whose edit failed makes every rank raise. ``hand`` is a plain torch
  hook applying the same edit to the local output; an extra variant ``flex_noagree`` is
  FlexModel with that agreement switched off (a private hook of the benchmark), so
  ``flex - flex_noagree`` is what the agreement costs per pass.

Each config runs three variants, interleaved, one forward each per round:
``plain`` (the sharded forward, no hooks), ``hand`` (plain torch forward hooks
doing the least a hand-written hook must: ``dist.gather`` of the pieces to rank
0 and a concatenation, or rank 0's own copy of a replicated tensor) and
``flex`` (FlexModel capture hooks on the same modules). Times are rank 0's
wall clock from a barrier to a barrier; the variants' order rotates per round.
Reported: the median time of each variant, and the ratios flex / hand and
flex / plain as the median over rounds of the within-round ratio (paired, so a
slow phase of a shared machine cancels out). ``--json`` gives flex / hand, and for the shardwise
configs the agreement's median cost per pass (``*_agree_ms``) and per call in a tight loop
(``agree_loop_ms``; ``all_gather_loop_ms``: a plain all-gather of the same size).
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

from flex_model import FlexModel, HookFunction, ShardInfo, ShardwiseEdit  # noqa: E402
from flex_model import collectives  # noqa: E402
from flex_model.launch import launch  # noqa: E402


class Scale(ShardwiseEdit):
    """``x * 1.5`` on each rank's own shard (what the shardwise configs register on every block)."""

    def edit_shard(self, current_module: nn.Module, local: torch.Tensor, shard: ShardInfo,
                   modules: nn.ModuleDict) -> torch.Tensor:
        return local * 1.5


def scale_hook(module, args, out):
    """The hand-written twin of ``Scale``: the same edit on the local output, no communication."""
    return out * 1.5


@contextlib.contextmanager
def without_agreement(flex: FlexModel):
    """FlexModel with its end-of-pass agreement switched off (benchmark only: private attribute)."""
    runtime = flex._runtime
    runtime.agree = lambda when: None
    try:
        yield
    finally:
        del runtime.agree  # back to the class's method


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
                rounds: int, warmup: int, profiler: Optional[cProfile.Profile] = None,
                shardwise: bool = False) -> Dict[str, float]:
    """Median seconds per forward of the plain, hand and flex variants (interleaved rounds); with
    ``shardwise``, every hook is the ``Scale`` edit, and ``flex_noagree`` runs too."""
    inner = getattr(module, "module", module)  # hand hooks go on the model inside DDP
    times: Dict[str, List[float]] = {"plain": [], "hand": [], "flex": []}
    if shardwise:
        times["flex_noagree"] = []
    outputs: Dict[str, torch.Tensor] = {}
    for r in range(warmup + rounds):
        order = list(times)
        shift = r % len(order)
        for variant in order[shift:] + order[:shift]:  # rotate, so no variant always runs first
            store: List[torch.Tensor] = []
            is_flex = variant.startswith("flex")
            if variant == "hand":
                hook = scale_hook if shardwise else hand_hook(split_dim, store)
                handles = [inner.get_submodule(n).register_forward_hook(hook) for n in names]
            elif is_flex:
                handles = [flex.register_forward_hook(HookFunction(n, editing_function=Scale() if shardwise else None))
                           for n in names]
            else:
                handles = []
            quiet = without_agreement(flex) if variant == "flex_noagree" else contextlib.nullcontext()
            dist.barrier()
            start = time.perf_counter()
            profiling = profiler is not None and variant == "flex" and r >= warmup
            if profiling:
                profiler.enable()
            with torch.no_grad(), quiet:
                out = (flex if is_flex else module)(tokens)
            if profiling:
                profiler.disable()
            dist.barrier()
            elapsed = time.perf_counter() - start
            for h in handles:
                h.remove()
            if dist.get_rank() == 0 and variant != "plain" and not shardwise:
                got = sum(len(v) for v in flex.output_dict.values()) if variant == "flex" else len(store)
                assert got == len(names), f"{variant}: captured {got} tensors, expected {len(names)}"
            flex.clear_output_dict()
            if shardwise and variant != "plain":
                outputs.setdefault(variant, out)
            if r >= warmup:
                times[variant].append(elapsed)
    for variant, out in outputs.items():  # the same edit, hand-written or through flex
        torch.testing.assert_close(out, outputs["hand"], msg=lambda m, v=variant: f"{v}: {m}")
    medians = {k: statistics.median(v) for k, v in times.items()}
    if shardwise:
        medians["agree"] = statistics.median(f - q for f, q in zip(times["flex"], times["flex_noagree"]))
    # Paired: flex / hand within each round, so slow phases of a shared machine cancel out.
    medians["ratio"] = statistics.median(f / h for f, h in zip(times["flex"], times["hand"]))
    medians["ratio_plain"] = statistics.median(f / p for f, p in zip(times["flex"], times["plain"]))
    return medians


def time_agreement(flex: FlexModel, calls: int = 200, repeats: int = 5) -> Dict[str, float]:
    """Seconds per end-of-pass agreement (``collectives.agree`` over the stage, nobody failed) in a tight
    loop — the message cost alone, without the ranks' skew that a real pass adds — and per plain
    ``dist.all_gather`` of a header's size on the same group, for scale. Medians of ``repeats``."""
    stage = flex.layout.stage
    header = torch.zeros(collectives.FIXED_INTS + collectives.MAX_DIMS + collectives.MSG_INTS, dtype=torch.int64)
    slots = [torch.empty_like(header) for _ in stage.ranks]
    calls_of = {"agree": lambda: collectives.agree(stage, None, "benchmark"),
                "all_gather": lambda: dist.all_gather(slots, header, group=stage.group)}
    per_call: Dict[str, List[float]] = {k: [] for k in calls_of}
    for _ in range(repeats):
        for name, call in calls_of.items():
            dist.barrier()
            start = time.perf_counter()
            for _ in range(calls):
                call()
            per_call[name].append((time.perf_counter() - start) / calls)
    return {k: statistics.median(v) for k, v in per_call.items()}


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
    results["dp2_shardwise"] = time_config(ddp, flex, blocks, 0, tokens.chunk(world)[rank], rounds, warmup,
                                           profiler, shardwise=True)
    agree_loop = time_agreement(flex)
    flex.restore()

    # tp2 / tp2_split: the fairscale model, every rank the whole batch.
    with contextlib.redirect_stdout(sys.stderr):  # fairscale prints its initialisation
        sharded, _ = build_pair(world, n_layers=n_layers, dim=dim)
    flex = FlexModel(sharded, {}, tensor_parallel_size=world)
    results["tp2"] = time_config(sharded, flex, blocks, None, tokens, rounds, warmup, profiler)
    w1 = [f"layers.{i}.feed_forward.w1" for i in range(n_layers)]
    results["tp2_split"] = time_config(sharded, flex, w1, -1, tokens, rounds, warmup, profiler)
    results["tp2_shardwise"] = time_config(sharded, flex, blocks, None, tokens, rounds, warmup, profiler,
                                           shardwise=True)
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
    ratios.update({f"{k}_agree_ms": round(v["agree"] * 1e3, 3) for k, v in results.items() if "agree" in v})
    ratios["agree_loop_ms"] = round(agree_loop["agree"] * 1e3, 3)
    ratios["all_gather_loop_ms"] = round(agree_loop["all_gather"] * 1e3, 3)
    header_bytes = 8 * (collectives.FIXED_INTS + collectives.MAX_DIMS + collectives.MSG_INTS)
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
    print()
    print(f"Shardwise edits ({n_layers} blocks): what the end-of-forward agreement costs per pass (in a tight "
          f"loop, one agreement: {agree_loop['agree'] * 1e3:.3f} ms; a plain all_gather of its "
          f"{header_bytes} B header: {agree_loop['all_gather'] * 1e3:.3f} ms)")
    print("| config | hand ms | flex ms | flex without agreement ms | agreement ms / pass | flex - hand ms / pass |")
    print("|---|---:|---:|---:|---:|---:|")
    for k, v in results.items():
        if "agree" in v:
            print(f"| {k} | {v['hand'] * 1e3:.2f} | {v['flex'] * 1e3:.2f} | {v['flex_noagree'] * 1e3:.2f} | "
                  f"{v['agree'] * 1e3:.2f} | {(v['flex'] - v['hand']) * 1e3:.2f} |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON line of flex/hand ratios")
    parser.add_argument("--quick", action="store_true", help="smaller model, fewer rounds")
    parser.add_argument("--rounds", type=int, default=0, help="timed rounds (default 31; 7 with --quick)")
    parser.add_argument("--profile", action="store_true", help="cProfile the flex forwards on every rank (stderr)")
    a = parser.parse_args()
    launch(main, nprocs=2, args=(a.quick, a.json, a.rounds, a.profile))
