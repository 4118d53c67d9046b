"""Does a long run leak? Resident memory over many passes with captures and edits, one process and DP=2.

    python benchmarks/long_run_memory.py                  # 10,000 passes per config, a table (markdown)
    python benchmarks/long_run_memory.py --passes 2000     # shorter
    python benchmarks/long_run_memory.py --json           # one JSON line per (config, rank)
    python benchmarks/long_run_memory.py --configs dp2    # only some configs (single, dp2)

Each pass is a forward and a backward of a small pre-LN transformer (2 blocks, width
64, batch 8 × 32 tokens) wrapped by ``FlexModel`` with, on every pass:

- a capture of ``blocks.0`` (forward) and of ``ln_f``'s output gradient (full_backward_pre);
- an editing function on ``blocks.1.mlp`` (forward: ``0.5 * x + 0.5 * x.flip(0)``, run once on
  the full value; under DP gathered, edited on the root, scattered back with autograd);
- a ``ShardwiseEdit`` on ``blocks.0.mlp.act`` (each rank its own shard; under DP the
  end-of-forward agreement runs every pass);
- a tensor hook capture on ``blocks.1.mlp.up.weight``.

``output_dict`` is cleared and gradients are dropped after every pass (what a training or
analysis loop does with them), so anything that grows is kept by flex_model or torch.
Configs: ``single`` (this process, no process group) and ``dp2`` (2 spawned gloo ranks,
``flex_model.launch.launch``, the model under DDP, each rank half the batch).

Every ``--every`` passes each rank records its resident set size (``/proc/self/statm``); at
the middle and at the end, the number of Python objects the garbage collector tracks. Reported per rank: RSS at the
start, after 10 % of the passes, at the middle and at the end, and the least-squares slope of RSS against the pass
number over the second half (the first half is warm-up: allocator pools, autograd caches,
gloo buffers), in bytes per pass; the target is below 1 KB/pass on every rank. A leak of one
small tensor per pass (a 8 × 32 × 64 fp32 capture is 64 KB) would show as a slope of tens of
KB per pass; allocator noise averages out over thousands of passes.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from flex_model import FlexModel, HookFunction, ShardInfo, ShardwiseEdit  # noqa: E402
from flex_model.launch import launch  # noqa: E402

VOCAB, DIM, HIDDEN, BLOCKS, BATCH, SEQ = 97, 64, 128, 2, 8, 32
TARGET_BYTES_PER_PASS = 1024


class Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up, self.act, self.down = nn.Linear(DIM, HIDDEN), nn.GELU(), nn.Linear(HIDDEN, DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.act(self.up(x)))


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln, self.mlp = nn.LayerNorm(DIM), Mlp()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.ln(x))


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, DIM)
        self.blocks = nn.ModuleList(Block() for _ in range(BLOCKS))
        self.ln_f, self.head = nn.LayerNorm(DIM), nn.Linear(DIM, VOCAB)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.emb(idx)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


class Halve(ShardwiseEdit):
    """An elementwise edit each rank applies to its own shard (no communication)."""

    def edit_shard(self, current_module: nn.Module, local: torch.Tensor, shard: ShardInfo,
                   modules: nn.ModuleDict) -> torch.Tensor:
        return local * 0.5


def mix(current_module, x, save_ctx, modules):
    return 0.5 * x + 0.5 * x.flip(0)  # mixes batch rows: under DP, rows of both ranks


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def wrap(model: nn.Module, output_dict: Dict[str, List[torch.Tensor]], dp: int) -> FlexModel:
    module = nn.parallel.DistributedDataParallel(model) if dp > 1 else model
    flex = FlexModel(module, output_dict, data_parallel_size=dp)
    flex.register_forward_hook(HookFunction("blocks.0"))
    flex.register_full_backward_pre_hook(HookFunction("ln_f"))
    flex.register_forward_hook(HookFunction("blocks.1.mlp", editing_function=mix))
    flex.register_forward_hook(HookFunction("blocks.0.mlp.act", editing_function=Halve()))
    flex.register_hook(HookFunction("blocks.1.mlp.up.weight"))
    return flex


def measure(passes: int, every: int, rank: int = 0, dp: int = 1) -> Dict[str, object]:
    """Run ``passes`` passes on this rank; RSS and tracked objects every ``every`` passes."""
    torch.manual_seed(0)
    model = Model()
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    mine = tokens.chunk(dp)[rank]
    output_dict: Dict[str, List[torch.Tensor]] = {}
    flex = wrap(model, output_dict, dp)
    samples, objects = [], []
    start = time.perf_counter()
    for i in range(passes + 1):
        if i % every == 0:
            samples.append((i, rss_bytes()))
        if i in (passes // 2, passes):
            gc.collect()
            objects.append(len(gc.get_objects()))
        if i == passes:
            break
        out = flex(mine)
        (out.float().square().mean()).backward()
        want = 4 if rank == 0 else 0  # kept on the owner: blocks.0, blocks.1.mlp (before its edit), ln_f, the grad
        got = sum(len(v) for v in output_dict.values())
        assert got == want, f"rank {rank}, pass {i}: {got} captures, expected {want}"
        output_dict.clear()
        model.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - start
    flex.restore()
    return {"rank": rank, "passes": passes, "seconds": round(seconds, 1), "samples": samples,
            "objects_mid": objects[0], "objects_end": objects[-1]}


def summarize(config: str, run: Dict[str, object]) -> Dict[str, object]:
    samples = run["samples"]
    half = [(i, r) for i, r in samples if i >= run["passes"] / 2]
    xs, ys = [i for i, _ in half], [r for _, r in half]
    slope = statistics.linear_regression(xs, ys).slope if len(half) > 1 else float("nan")
    mid = half[0][1]
    early = next(r for i, r in samples if i >= run["passes"] / 10)
    return {"config": config, "rank": run["rank"], "passes": run["passes"], "seconds": run["seconds"],
            "ms_per_pass": round(1e3 * run["seconds"] / max(run["passes"], 1), 2),
            "rss_start_mb": round(samples[0][1] / 2**20, 1), "rss_10pct_mb": round(early / 2**20, 1),
            "rss_mid_mb": round(mid / 2**20, 1),
            "rss_end_mb": round(samples[-1][1] / 2**20, 1), "slope_bytes_per_pass": round(slope, 1),
            "objects_mid": run["objects_mid"], "objects_end": run["objects_end"],
            "ok": slope < TARGET_BYTES_PER_PASS}


def dp_main(passes: int, every: int, out_path: str) -> None:
    torch.set_num_threads(1)
    rank, world = dist.get_rank(), dist.get_world_size()
    run = measure(passes, every, rank, world)
    runs: List[Optional[Dict[str, object]]] = [None] * world
    dist.all_gather_object(runs, run)
    if rank == 0:
        Path(out_path).write_text(json.dumps(runs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--passes", type=int, default=10_000, help="passes per config (default 10,000)")
    parser.add_argument("--every", type=int, default=0, help="record RSS every N passes (default passes / 100)")
    parser.add_argument("--configs", default="single,dp2", help="comma-separated: single, dp2")
    parser.add_argument("--json", action="store_true", help="one JSON line per (config, rank) instead of a table")
    a = parser.parse_args()
    if a.passes < 2:
        parser.error("--passes must be at least 2")
    every = a.every or max(1, a.passes // 100)
    rows = []
    for config in a.configs.split(","):
        if config == "single":
            torch.set_num_threads(1)
            rows.append(summarize(config, measure(a.passes, every)))
        elif config == "dp2":
            with tempfile.TemporaryDirectory() as tmp:
                path = os.path.join(tmp, "runs.json")
                launch(dp_main, nprocs=2, backend="gloo", args=(a.passes, every, path))
                rows += [summarize(config, run) for run in json.loads(Path(path).read_text())]
        else:
            parser.error(f"unknown config {config!r}; use single, dp2")
    if a.json:
        for row in rows:
            print(json.dumps(row))
        return
    print(f"{a.passes} passes per config (forward + backward, captures and edits on every pass), RSS every "
          f"{every} passes, slope fitted over the second half; target < {TARGET_BYTES_PER_PASS} B/pass")
    print("| config | rank | ms / pass | RSS MB: start | 10 % | 50 % | end | slope B/pass (2nd half) | "
          "Python objects 50 % → end | < 1 KB/pass |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|:---:|")
    for r in rows:
        print(f"| {r['config']} | {r['rank']} | {r['ms_per_pass']} | {r['rss_start_mb']} | {r['rss_10pct_mb']} | "
              f"{r['rss_mid_mb']} | {r['rss_end_mb']} | {r['slope_bytes_per_pass']} | {r['objects_mid']} → "
              f"{r['objects_end']} | {'yes' if r['ok'] else 'NO'} |")


if __name__ == "__main__":
    main()
