"""flex_model next to its peers: retrieve every block's output of a GPT-2-small-sized model, one CPU process.

    python benchmarks/peers.py                 # GPT-2 small (12 x 768), random weights, batch 8 x 128
    python benchmarks/peers.py --batch 2       # faster
    python benchmarks/peers.py --json          # one line: {"hooks": r, ..., "flex_model_vs_hooks": r}

Variants (each forward under ``torch.no_grad``, one thread):

- ``plain``: the HuggingFace ``GPT2LMHeadModel`` forward, no hooks.
- ``hooks``: plain torch forward hooks on ``transformer.h.{i}`` that keep a copy
  (``out.detach().clone()``) -- the baseline flex_model is held to (<= 1.05x).
- ``flex_model``: ``FlexModel`` capture hooks on the same blocks (it keeps a copy too).
- ``tl_plain`` / ``tl_cache``: TransformerLens ``HookedTransformer`` built from the
  same config (its own implementation, other random weights): forward, and
  ``run_with_cache`` caching only ``blocks.{i}.hook_resid_post`` (kept by reference).
- ``nnsight``: ``NNsight(model).trace(tokens)`` saving every ``transformer.h[i].output``
  (kept by reference).

Time: the process's CPU time per forward (robust to other jobs on a shared machine;
wall-clock is printed too), median over interleaved rounds (every variant once per
round); ratios use CPU time. Memory: the
peak growth of the C heap in use (glibc ``mallinfo2``, sampled every 0.5 ms) during
one forward, captures included -- tracemalloc does not see torch's allocations, and
the resident set size hides reuse of freed memory. A peer that is not installed is
reported as skipped (TransformerLens 4.x removed ``HookedTransformer``: use 3.x).
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import statistics
import sys
import threading
import time
import warnings
from typing import Callable, Dict, List, Optional

import torch

from flex_model import FlexModel, HookFunction

class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                "fsmblks", "uordblks", "fordblks", "keepcost")]


def heap_in_use() -> int:
    """Bytes malloc has handed out and not taken back (glibc ``mallinfo2``: arena + mmapped blocks)."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _MallInfo2
    info = libc.mallinfo2()
    return info.uordblks + info.hblkhd


def peak_heap_growth(fn: Callable[[], object]) -> float:
    """MB by which the heap in use grows, at its peak, while ``fn`` runs (its result kept until the end)."""
    gc.collect()
    base, peak, done = heap_in_use(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], heap_in_use())
            time.sleep(0.0005)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    result = fn()
    peak[0] = max(peak[0], heap_in_use())
    done.set()
    thread.join()
    del result
    return (peak[0] - base) / 2**20


def build_variants(n_layers: int, tokens: torch.Tensor) -> Dict[str, Optional[Callable[[], List[torch.Tensor]]]]:
    """name -> a function running one forward and returning the captured block outputs (None: skipped)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=n_layers, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(cfg).eval()
    blocks = [f"transformer.h.{i}" for i in range(n_layers)]
    variants: Dict[str, Optional[Callable]] = {}

    def plain():
        model(tokens)
        return []
    variants["plain"] = plain

    def hooks():
        kept: List[torch.Tensor] = []
        handles = [model.get_submodule(b).register_forward_hook(lambda m, a, out: kept.append(out.detach().clone()))
                   for b in blocks]
        model(tokens)
        for h in handles:
            h.remove()
        return kept
    variants["hooks"] = hooks

    output_dict: Dict[str, List[torch.Tensor]] = {}
    flex = FlexModel(model, output_dict)

    def flex_model():
        handles = [flex.register_forward_hook(HookFunction(b)) for b in blocks]
        flex(tokens)
        for h in handles:
            h.remove()
        kept = [output_dict[b][0] for b in blocks]
        output_dict.clear()
        return kept
    variants["flex_model"] = flex_model

    try:
        warnings.filterwarnings("ignore", message="HookedTransformer is deprecated")
        from transformer_lens import HookedTransformer, HookedTransformerConfig
    except ImportError as e:  # not installed, or TransformerLens >= 4 (no HookedTransformer)
        print(f"TransformerLens skipped: {e}", file=sys.stderr)
        variants["tl_plain"] = variants["tl_cache"] = None
    else:
        tl = HookedTransformer(HookedTransformerConfig(
            n_layers=n_layers, d_model=cfg.n_embd, n_ctx=cfg.n_positions, d_head=cfg.n_embd // cfg.n_head,
            n_heads=cfg.n_head, d_mlp=4 * cfg.n_embd, d_vocab=cfg.vocab_size, act_fn="gelu_new",
            normalization_type="LN", device="cpu", seed=0)).eval()
        names = [f"blocks.{i}.hook_resid_post" for i in range(n_layers)]
        variants["tl_plain"] = lambda: (tl(tokens), [])[1]

        def tl_cache():
            _, cache = tl.run_with_cache(tokens, names_filter=lambda n: n in names)
            return [cache[n] for n in names]
        variants["tl_cache"] = tl_cache

    try:
        from nnsight import NNsight
    except ImportError as e:
        print(f"nnsight skipped: {e}", file=sys.stderr)
        variants["nnsight"] = None
    else:
        traced = NNsight(model)

        def nnsight_trace():
            with traced.trace(tokens):
                saved = list().save()  # nnsight: save the container, append inside the trace
                for i in range(n_layers):
                    saved.append(traced.transformer.h[i].output)
            return list(saved)
        variants["nnsight"] = nnsight_trace
    return variants


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", action="store_true", help="print one JSON line of ratios to plain")
    a = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(1)
    tokens = torch.randint(0, 50257, (a.batch, a.seq))
    variants = build_variants(a.layers, tokens)
    live = {k: v for k, v in variants.items() if v is not None}
    times: Dict[str, List[float]] = {k: [] for k in live}  # process CPU seconds
    walls: Dict[str, List[float]] = {k: [] for k in live}
    memory: Dict[str, float] = {}
    with torch.no_grad():
        reference = None
        for name, fn in live.items():  # warm-up and a correctness check
            kept = fn()
            if name in ("hooks", "flex_model", "nnsight"):
                reference = reference if reference is not None else kept
                assert len(kept) == a.layers, f"{name} captured {len(kept)} tensors, expected {a.layers}"
                for got, want in zip(kept, reference):
                    torch.testing.assert_close(got, want)
        for name, fn in live.items():
            memory[name] = peak_heap_growth(fn)
        for _ in range(a.rounds):
            for name, fn in live.items():
                start, cpu = time.perf_counter(), time.process_time()
                fn()
                times[name].append(time.process_time() - cpu)
                walls[name].append(time.perf_counter() - start)
    median = {k: statistics.median(v) for k, v in times.items()}
    wall = {k: statistics.median(v) for k, v in walls.items()}
    ratios = {k: round(v / median["plain"], 4) for k, v in median.items() if k != "plain"}
    ratios["flex_model_vs_hooks"] = round(median["flex_model"] / median["hooks"], 4)
    if a.json:
        print(json.dumps(ratios))
        return
    print(f"GPT-2 small-sized ({a.layers} x 768, random weights), batch {a.batch} x {a.seq} tokens, 1 thread, "
          f"median of {a.rounds} rounds; torch {torch.__version__}")
    print("| variant | CPU ms / forward | x plain | x hooks | wall ms / forward | peak heap growth (MB) |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in variants:
        if name not in live:
            print(f"| {name} | skipped (import failed, see stderr) | | | | |")
            continue
        print(f"| {name} | {median[name] * 1e3:.1f} | {median[name] / median['plain']:.3f} | "
              f"{median[name] / median['hooks']:.3f} | {wall[name] * 1e3:.1f} | {memory[name]:.0f} |")

if __name__ == "__main__":
    main()
