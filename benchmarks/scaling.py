"""What one capture firing moves as data parallelism grows, in both scopes (counts, from ``comm_stats()``).

    python benchmarks/scaling.py            # spawns 1, 2, 4 and 8 CPU ranks (gloo) in turn, prints the tables
    python benchmarks/scaling.py --json     # one JSON line per configuration (and per dump)
    python benchmarks/scaling.py --quick    # a smaller model, fewer rounds

Model: the LLaMA-style model of ``examples/megatron_fairscale.py`` (4 layers, dim 256, hidden 512;
micro-batch 4 x 64 tokens per data-parallel replica). Configurations: TP=1 at DP = 1, 2, 4 (the
plain-torch model, under DDP when DP > 1) and TP=2 (fairscale) at DP = 1, 2, 4, each in
``scope="global"`` and ``scope="replica"``, each with two hook sets, measured apart:

- ``blocks``: every block's output (``layers.{i}``): split over dp by the batch, replicated over tp
  (after the row-parallel all-reduce);
- ``w1``: every ``layers.{i}.feed_forward.w1`` output: split over dp and over tp (hidden units).

Per configuration every rank's ``FlexModel.comm_stats()`` is gathered to rank 0. Reported:

- ``busiest_rank_recv_bytes_per_firing``: the most bytes any rank received, over the measured forwards,
  divided by its firings; ``busiest_rank_needed_bytes_per_firing`` is what that rank must receive at
  least (the other source ranks' pieces: ``tensor x (S - 1) / S`` for S source ranks), and the rest is
  split into ``header_bytes_per_firing`` (every rank's fixed header to every other rank of the firing's
  group, plus the end-of-pass check of replica scope, amortised) and ``padding_bytes_per_firing``
  (what is left: chunk bytes that carry nothing; 0, since ``collectives.exchange`` sizes each rank's
  chunk by that rank's own piece and a rank with no distinct piece sends its header alone);
- ``payload_bytes_per_replica``: the bytes of one replica's full captured tensor per firing (from rank
  0's ``output_dict``), and ``tensor_bytes_per_firing``, the full tensor a firing assembles (the global
  batch in global scope, one replica's in replica scope);
- ``collectives_per_firing``: all of flex_model's collectives over the firings (the end-of-pass check
  included); ``firing_collectives_per_firing``: those of the firings themselves;
- time: the flex forward and a forward with no hook selected (``groups="all", complement=True``:
  the same wrapper, nothing fires), medians over interleaved rounds on rank 0, and
  ``firing_time_rel_plain`` = (flex - plain) / firings per forward / plain;
- dumps (``dump_activations`` of the last block's output and its w1 output, 8 batches): rows per
  second, the bytes of shards each rank wrote (``max_rank_dump_bytes``, ``total_dump_bytes``; a rank's
  are those under its ``replica-D/tp-K/`` folder, the rest the owner's). Replica-scope dumps run only
  if ``dump_activations`` takes ``scope=``.

Times come from a shared 2-core machine with up to 8 ranks on it: treat them as an order of magnitude.
The counts do not depend on the machine.
"""
from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from megatron_fairscale import ParallelLlama  # noqa: E402

from flex_model import FlexModel, HookFunction, dump_activations  # noqa: E402
from flex_model import collectives as C  # noqa: E402
from flex_model.launch import launch  # noqa: E402

WORLDS = {1: [(1, 1)], 2: [(1, 2), (2, 1)], 4: [(1, 4), (2, 2)], 8: [(2, 4)]}  # world -> [(tp, dp)]
SCOPES = ("global", "replica")
HEADER_BYTES = C._header(C.OK, (), "", torch.device("cpu")).numel() * 8  # one rank's header in an exchange
DUMP_HAS_SCOPE = "scope" in inspect.signature(dump_activations).parameters


def sizes(quick: bool) -> Dict[str, int]:
    return dict(n_layers=2, dim=128, batch=2, seq=32, rounds=3, dump_batches=4) if quick else \
        dict(n_layers=4, dim=256, batch=4, seq=64, rounds=7, dump_batches=8)


def hook_names(kind: str, n_layers: int) -> List[str]:
    return [f"layers.{i}" if kind == "blocks" else f"layers.{i}.feed_forward.w1" for i in range(n_layers)]


def source_ranks(kind: str, scope: str, tp: int, dp: int) -> int:
    """How many ranks hold distinct pieces of one firing's tensor (its root among them)."""
    dp_sources = dp if scope == "global" else 1
    return dp_sources * (tp if kind == "w1" else 1)


def build(tp: int, dp: int, s: Dict[str, int]) -> nn.Module:
    """The model on this rank: plain torch (DDP over dp > 1) at tp 1, fairscale's TP layers at tp 2."""
    torch.manual_seed(0)
    if tp == 1:
        model = ParallelLlama(parallel=False, n_layers=s["n_layers"], dim=s["dim"], hidden=2 * s["dim"])
        return nn.parallel.DistributedDataParallel(model) if dp > 1 else model
    from fairscale.nn.model_parallel import initialize as fs

    with contextlib.redirect_stdout(sys.stderr):  # fairscale prints its initialisation
        fs.initialize_model_parallel(tp)
    return ParallelLlama(tp=tp, parallel=True, n_layers=s["n_layers"], dim=s["dim"], hidden=2 * s["dim"])


def wrap(model: nn.Module, tp: int, dp: int, scope: str, out: Dict[str, List[torch.Tensor]]) -> FlexModel:
    return FlexModel(model, out, tensor_parallel_size=tp, data_parallel_size=dp, scope=scope)


def measure(model: nn.Module, tp: int, dp: int, scope: str, kind: str, tokens: torch.Tensor,
            s: Dict[str, int]) -> Optional[Dict[str, Any]]:
    """One configuration: counts from every rank's comm_stats(), times from rank 0 (None elsewhere)."""
    out: Dict[str, List[torch.Tensor]] = {}
    flex = wrap(model, tp, dp, scope, out)
    names = hook_names(kind, s["n_layers"])
    for n in names:
        flex.register_forward_hook(HookFunction(n))
    with torch.no_grad():
        flex(tokens)  # warm-up: each hook's exchange learns its chunk size (the first firing may take two)
        flex(tokens, groups="all", complement=True)
    flex.clear_output_dict()
    flex.comm_stats()  # reset
    times: Dict[str, List[float]] = {"plain": [], "flex": []}
    for r in range(s["rounds"]):
        for variant in (("plain", "flex") if r % 2 == 0 else ("flex", "plain")):
            dist.barrier()
            start = time.perf_counter()
            with torch.no_grad():
                if variant == "flex":
                    flex(tokens)
                else:
                    flex(tokens, groups="all", complement=True)  # nothing fires
            dist.barrier()
            times[variant].append(time.perf_counter() - start)
    stats = flex.comm_stats()
    everyone: List[Optional[Dict[str, int]]] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, stats)
    captured = [t for v in out.values() for t in v]
    flex.restore()
    if dist.get_rank() != 0:
        return None
    forwards = s["rounds"]
    firings = stats["firings"]
    assert firings == forwards * len(names) and len(captured) == firings, (firings, len(captured))
    full_bytes = sum(t.numel() * t.element_size() for t in captured) / firings  # rank 0's full tensor
    payload = full_bytes / dp if scope == "global" else full_bytes
    tensor_bytes = full_bytes
    busiest = max(everyone, key=lambda st: st["recv_bytes"])
    per_firing = busiest["recv_bytes"] / firings
    sources = source_ranks(kind, scope, tp, dp)
    needed = tensor_bytes * (sources - 1) / sources
    group = dp * tp if scope == "global" else tp  # the ranks one firing's exchange spans
    moves = group > 1  # store="root": a firing over more than one rank exchanges
    headers = (group - 1) * HEADER_BYTES if moves else 0
    checks = busiest["stage_collectives"] if scope == "replica" else 0  # end-of-pass agreements
    headers += checks * (dp * tp - 1) * HEADER_BYTES / firings
    firing_collectives = (busiest["replica_collectives"] if scope == "replica" else busiest["stage_collectives"])
    plain, fl = statistics.median(times["plain"]), statistics.median(times["flex"])
    return {
        "row": "capture", "scope": scope, "dp": dp, "tp": tp, "hooks": kind, "world": dp * tp,
        "firings": firings, "forwards": forwards,
        "busiest_rank_recv_bytes_per_firing": per_firing,
        "busiest_rank_needed_bytes_per_firing": needed,
        "header_bytes_per_firing": headers,
        "padding_bytes_per_firing": per_firing - needed - headers,
        "payload_bytes_per_replica": payload,
        "tensor_bytes_per_firing": tensor_bytes,
        "recv_over_tensor": per_firing / tensor_bytes,
        "collectives_per_firing": busiest["collectives"] / firings,
        "firing_collectives_per_firing": firing_collectives / firings,
        "pass_collectives_per_forward": checks / forwards,
        "plain_ms": plain * 1e3, "flex_ms": fl * 1e3,
        "flex_over_plain": fl / plain,
        "firing_time_rel_plain": (fl - plain) / len(names) / plain,
    }


def _rank_dirs(out: Path) -> Dict[Tuple[int, int], int]:
    """Shard bytes under each ``replica-D/tp-K`` directory; everything else counts as the owner's (0, 0)."""
    written: Dict[Tuple[int, int], int] = {}
    for path in out.rglob("*.safetensors"):
        parts = path.relative_to(out).parts
        d = next((int(p.split("-")[1]) for p in parts if p.startswith("replica-")), 0)
        t = next((int(p.split("-")[1]) for p in parts if p.startswith("tp-")), 0)
        written[(d, t)] = written.get((d, t), 0) + path.stat().st_size
    return written


def measure_dump(model: nn.Module, tp: int, dp: int, scope: str, tokens: List[torch.Tensor], base: str,
                 s: Dict[str, int]) -> Optional[Dict[str, Any]]:
    out_dir = Path(base) / f"dump-tp{tp}-dp{dp}-{scope}"
    flex = wrap(model, tp, dp, scope, {})
    kwargs = {"scope": scope} if DUMP_HAS_SCOPE else {}
    dist.barrier()
    start = time.perf_counter()
    last = s["n_layers"] - 1  # a value replicated over tp and one split over it
    dump_activations(flex, tokens, out_dir, [f"layers.{last}", f"layers.{last}.feed_forward.w1"],
                     batches_per_shard=len(tokens) // 2, progress=False, **kwargs)
    dist.barrier()
    elapsed = time.perf_counter() - start
    flex.restore()
    if dist.get_rank() != 0:
        return None
    written = _rank_dirs(out_dir)
    total = sum(written.values())
    rows = len(tokens) * tokens[0].shape[0] * dp
    shutil.rmtree(out_dir, ignore_errors=True)
    return {"row": "dump", "scope": scope, "dp": dp, "tp": tp, "hooks": "last block + w1", "world": dp * tp,
            "rows": rows, "rows_per_s": rows / elapsed, "writers": len(written),
            "max_rank_dump_bytes": max(written.values()), "total_dump_bytes": total,
            "max_over_even_share": max(written.values()) / (total / (dp * tp))}


def rank_main(quick: bool, results: str, base: str, dump_scopes: Tuple[str, ...]) -> None:
    torch.set_num_threads(1)
    s = sizes(quick)
    rank, world = dist.get_rank(), dist.get_world_size()
    records = []
    for tp, dp in WORLDS[world]:
        model = build(tp, dp, s)
        dp_rank = rank // tp  # fairscale's order: tp innermost
        g = torch.Generator().manual_seed(100 + dp_rank)
        tokens = torch.randint(0, 128, (s["batch"], s["seq"]), generator=g)
        for scope in SCOPES:
            for kind in ("blocks", "w1"):
                records.append(measure(model, tp, dp, scope, kind, tokens, s))
        loader = [torch.randint(0, 128, (s["batch"], s["seq"]), generator=g) for _ in range(s["dump_batches"])]
        for scope in dump_scopes:
            records.append(measure_dump(model, tp, dp, scope, loader, base, s))
        if tp > 1:
            from fairscale.nn.model_parallel import initialize as fs

            fs.destroy_model_parallel()
    if rank == 0:
        with open(results, "a") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")


# -- the parent: tables and targets -------------------------------------------------------------------------------
def kib(b: float) -> str:
    return f"{b / 1024:.1f}"


def targets(rows: List[Dict[str, Any]]) -> List[Tuple[str, bool, str]]:
    caps = [r for r in rows if r["row"] == "capture"]
    out = []
    for tp in sorted({r["tp"] for r in caps}):
        for kind in ("blocks", "w1"):
            rep = {r["dp"]: r for r in caps if r["scope"] == "replica" and r["tp"] == tp and r["hooks"] == kind}
            if 1 in rep and 4 in rep:
                a, b = rep[1]["busiest_rank_recv_bytes_per_firing"], rep[4]["busiest_rank_recv_bytes_per_firing"]
                # "constant": within 5% of the DP=1 value; where that is under 5% of one replica's payload
                # (nothing to gather: only headers move) within 5% of that payload
                payload = rep[1]["payload_bytes_per_replica"]
                ok = abs(b - a) <= 0.05 * (a if a >= 0.05 * payload else payload)
                out.append((f"replica, tp={tp}, {kind}: busiest rank's bytes per firing DP 1 -> 4 constant (5%)",
                            ok, f"{a:.0f} -> {b:.0f} B"))
    for r in caps:
        if r["scope"] == "global" and r["dp"] * r["tp"] > 1:
            ok = r["busiest_rank_recv_bytes_per_firing"] <= 1.05 * r["tensor_bytes_per_firing"]
            t = r["tensor_bytes_per_firing"]
            out.append((f"global, tp={r['tp']} dp={r['dp']}, {r['hooks']}: busiest rank's bytes <= 1.05 x tensor",
                        ok, f"{r['recv_over_tensor']:.3f} x (needed "
                            f"{r['busiest_rank_needed_bytes_per_firing'] / t:.3f}, headers "
                            f"{r['header_bytes_per_firing'] / t:.4f}, padding "
                            f"{r['padding_bytes_per_firing'] / t:.3f})"))
    worst = max(r["firing_collectives_per_firing"] for r in caps)
    out.append(("one collective per firing for captures (at most)", worst <= 1.0 + 1e-9, f"max {worst:.3f}"))
    dumps = [r for r in rows if r["row"] == "dump" and r["scope"] == "replica"]
    if dumps:
        worst = max(r["max_over_even_share"] for r in dumps)
        out.append(("replica dumps: busiest rank writes <= 1.05 x total / (DP x TP)", worst <= 1.05,
                    f"max {worst:.3f} x"))
    else:
        out.append(("replica dumps: busiest rank writes <= 1.05 x total / (DP x TP)", False,
                    "not measured (global dumps only)"))
    return out


def print_tables(rows: List[Dict[str, Any]], s: Dict[str, int], dump_scopes: Tuple[str, ...]) -> None:
    print(f"{s['n_layers']} layers, dim {s['dim']}, hidden {2 * s['dim']}, micro-batch {s['batch']} x {s['seq']} "
          f"tokens per replica, fp32, gloo on CPU; {s['rounds']} measured forwards per configuration\n")
    print("| scope | tp | dp | hooks | payload / replica KiB | tensor KiB | busiest recv / firing KiB | needed KiB | "
          "headers KiB | padding KiB | recv / tensor | collectives / firing (firing + pass) | flex / plain | "
          "firing / plain |")
    print("|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in sorted((r for r in rows if r["row"] == "capture"),
                    key=lambda r: (r["scope"], r["tp"], r["dp"], r["hooks"])):
        print(f"| {r['scope']} | {r['tp']} | {r['dp']} | {r['hooks']} | {kib(r['payload_bytes_per_replica'])} | "
              f"{kib(r['tensor_bytes_per_firing'])} | {kib(r['busiest_rank_recv_bytes_per_firing'])} | "
              f"{kib(r['busiest_rank_needed_bytes_per_firing'])} | {kib(r['header_bytes_per_firing'])} | "
              f"{kib(r['padding_bytes_per_firing'])} | {r['recv_over_tensor']:.3f} | "
              f"{r['collectives_per_firing']:.3f} ({r['firing_collectives_per_firing']:.2f} + "
              f"{r['pass_collectives_per_forward']:.0f}/pass) | {r['flex_over_plain']:.2f} | "
              f"{r['firing_time_rel_plain']:.3f} |")
    dumps = [r for r in rows if r["row"] == "dump"]
    if dumps:
        print("\n| dump scope | tp | dp | rows | rows / s | writers | busiest rank KiB | total KiB | "
              "busiest / (total / (dp x tp)) |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in sorted(dumps, key=lambda r: (r["scope"], r["tp"], r["dp"])):
            print(f"| {r['scope']} | {r['tp']} | {r['dp']} | {r['rows']} | {r['rows_per_s']:.0f} | {r['writers']} | "
                  f"{kib(r['max_rank_dump_bytes'])} | {kib(r['total_dump_bytes'])} | {r['max_over_even_share']:.2f} |")
    if "replica" not in dump_scopes:
        why = "not asked for" if DUMP_HAS_SCOPE else "dump_activations takes no scope="
        print(f"\n(global dumps only: replica-scope dumps {why})")
    print("\nTargets:")
    for name, ok, detail in targets(rows):
        print(f"- {'HOLDS' if ok else 'FAILS'}: {name} — {detail}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="one JSON line per configuration")
    parser.add_argument("--quick", action="store_true", help="smaller model, fewer rounds")
    parser.add_argument("--worlds", default="1,2,4,8", help="world sizes to spawn (default 1,2,4,8)")
    parser.add_argument("--save", default="", help="also write the JSON lines to this file")
    parser.add_argument("--dump-scopes", default="global,replica" if DUMP_HAS_SCOPE else "global",
                        help="scopes of the dumps (default: both if dump_activations takes scope=, else global)")
    a = parser.parse_args()
    dump_scopes = tuple(x for x in a.dump_scopes.split(",") if x)
    if "replica" in dump_scopes and not DUMP_HAS_SCOPE:
        parser.error("dump_activations takes no scope= here: replica-scope dumps cannot run")
    joined = "RANK" in os.environ and "WORLD_SIZE" in os.environ  # under torchrun: this world only
    if joined:  # one folder for every rank of the job (replica-scope dumps write from every rank)
        run_id = os.environ.get("TORCHELASTIC_RUN_ID", os.environ.get("MASTER_PORT", "0"))
        base = os.path.join(tempfile.gettempdir(), f"flex_scaling_{run_id}")
        os.makedirs(base, exist_ok=True)
    else:
        base = tempfile.mkdtemp(prefix="flex_scaling_")
    results = os.path.join(base, "results.jsonl")
    if joined:
        launch(rank_main, args=(a.quick, results, base, dump_scopes))
        if int(os.environ["RANK"]) != 0:
            return
    try:
        if not joined:
            for world in (int(w) for w in a.worlds.split(",")):
                launch(rank_main, nprocs=world, backend="gloo", args=(a.quick, results, base, dump_scopes))
        with open(results) as f:
            rows = [json.loads(line) for line in f]
        if a.save:
            Path(a.save).write_text("".join(json.dumps(r) + "\n" for r in rows))
        if a.json:
            for r in rows:
                print(json.dumps(r))
        else:
            print_tables(rows, sizes(a.quick), dump_scopes)
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
