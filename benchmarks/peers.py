"""flex_model next to its peers (nnsight, TransformerLens): six research tasks, each checked, then timed.

    pip install -e ".[benchmarks]"                 # pins the peers (requirements/benchmarks.txt)
    python benchmarks/peers.py                      # markdown table (GPT-2 config 6 x 384, see below)
    python benchmarks/peers.py --gpt2-small         # the GPT-2-small shape (12 x 768, vocab 50257): slow on CPU
    python benchmarks/peers.py --quick              # a fast check (tiny model, 3 rounds)
    python benchmarks/peers.py --json               # one JSON line per (tool, task, layout)
    python benchmarks/peers.py --plot docs/peers.png

Honesty rules this script follows:

- Every tool gets its **own copy** of one HuggingFace ``GPT2LMHeadModel`` (identical weights; eager
  attention everywhere). TransformerLens gets the same weights through its GPT-2 weight conversion
  (no LayerNorm folding, no centring), nnsight wraps its own ``deepcopy``: nobody's baseline runs on a
  model another tool has patched.
- Every tool's result is **checked against plain torch hooks** on the plain model before it is timed.
  A result that differs is reported in the row (``check``), with no ratio.
- The user code each task needs is one small function per (tool, task); its source lines are counted
  with ``inspect`` (``lines``, without blank lines and comments).
- Timings are **interleaved** (every tool once per round, the order rotated each round). The ratio is the
  median over rounds of (tool / plain hooks) within one round; ``spread`` is max / min of that per-round
  ratio. A ratio whose distance from 1 is inside the spread is printed as "~" (no difference claimed).
  One process: the process's CPU time (1 thread; robust to other jobs on a shared machine). Sharded:
  wall-clock time on rank 0 between barriers.
- A peer that cannot be imported **fails, it is not skipped**: its rows carry the import error and the
  script exits non-zero at the end. A task a tool cannot do says why in its row.

Layouts: ``single`` -- every tool on one process. ``dp2`` -- flex_model on the model under DDP on 2 gloo
ranks (spawned with ``flex_model.launch.launch``; each rank gets half the rows) against plain hooks,
TransformerLens and nnsight on one process (rank 0) with the whole global batch, interleaved in the same job.
"""
from __future__ import annotations

import argparse
import copy
import inspect
import json
import os
import statistics
import sys
import time
import warnings
from types import SimpleNamespace
from typing import Any, Callable, Dict, List, Optional

import torch

from flex_model import FlexModel, HookFunction

TOOLS = ("plain", "flex_model", "transformer_lens", "nnsight")
TASKS = ("cache_blocks", "cache_patterns", "ablate_head", "patch_position", "generate", "fwd_bwd")
L, H, P = 1, 1, 3  # the layer, head and position the ablate / patch / backward tasks use


# ----------------------------------------------------------------------------------------------------------
# The user code: one function per (tool, task). ``m`` is the tool's model object, ``x`` the inputs
# (tokens, corrupted, prompt, direction, new, dh). Counted in lines by ``inspect``.
# ----------------------------------------------------------------------------------------------------------

def plain_cache_blocks(m, x):
    kept = []
    hs = [b.register_forward_hook(lambda mod, a, out: kept.append(out.detach().clone())) for b in m.transformer.h]
    m(x.tokens)
    [h.remove() for h in hs]
    return torch.stack(kept)


def plain_cache_patterns(m, x):
    return torch.stack(m(x.tokens, output_attentions=True).attentions)


def plain_ablate_head(m, x):
    def zero(mod, args):
        z = args[0].clone()
        z[..., H * x.dh:(H + 1) * x.dh] = 0
        return (z,)
    h = m.transformer.h[L].attn.c_proj.register_forward_pre_hook(zero)
    logits = m(x.tokens).logits
    h.remove()
    return logits


def plain_patch_position(m, x):
    clean = []
    h = m.transformer.h[L].register_forward_hook(lambda mod, a, out: clean.append(out.detach()))
    m(x.tokens)
    h.remove()
    def patch(mod, a, out):
        out = out.clone()
        out[:, P] = clean[0][:, P]
        return out
    h = m.transformer.h[L].register_forward_hook(patch)
    logits = m(x.corrupted).logits
    h.remove()
    return logits


def plain_generate(m, x):
    h = m.transformer.h[0].register_forward_hook(lambda mod, a, out: out + x.direction)
    ids = m.generate(x.prompt, attention_mask=torch.ones_like(x.prompt), max_new_tokens=x.new,
                     min_new_tokens=x.new, do_sample=False, pad_token_id=0)
    h.remove()
    return ids


def plain_fwd_bwd(m, x):
    grads = []
    def keep_grad(mod, a, out):
        out.register_hook(grads.append)
    h = m.transformer.h[L].register_forward_hook(keep_grad)
    m(x.tokens).logits.logsumexp(-1).sum().backward()
    h.remove()
    return grads[0]


def flex_model_cache_blocks(flex, x):
    _, cache = flex.run_with_cache(x.tokens, names_filter="blocks.{i}.resid_post")
    return cache.stack("resid_post") if cache.here else None


def flex_model_cache_patterns(flex, x):
    _, cache = flex.run_with_cache(x.tokens, names_filter="blocks.{i}.attn.pattern")
    return cache.stack("attn.pattern") if cache.here else None


def flex_model_ablate_head(flex, x):
    def zero(module, z, save_ctx, modules):  # z: (batch, query, heads, head dim)
        z = z.clone()
        z[:, :, H] = 0
        return z
    h = flex.register(HookFunction(f"blocks.{L}.attn.z", editing_function=zero))
    logits = flex(x.tokens).logits
    h.remove()
    flex.output_dict.clear()  # an editing hook keeps what it saw too
    return logits


def flex_model_patch_position(flex, x):
    _, clean = flex.run_with_cache(x.tokens, names_filter=f"blocks.{L}.resid_post")
    def patch(module, out, save_ctx, modules):
        out = out.clone()
        out[:, P] = clean[f"blocks.{L}.resid_post"][:, P]
        return out
    h = flex.register(HookFunction(f"blocks.{L}.resid_post", editing_function=patch))
    logits = flex(x.corrupted).logits
    h.remove()
    flex.output_dict.clear()
    return logits


def flex_model_generate(flex, x):
    steer = HookFunction("blocks.0.resid_post", editing_function=lambda mod, out, ctx, mods: out + x.direction)
    ids, _ = flex.generate(x.prompt, attention_mask=torch.ones_like(x.prompt), hooks=steer,
                           max_new_tokens=x.new, min_new_tokens=x.new, do_sample=False, pad_token_id=0)
    flex.output_dict.clear()
    return ids


def flex_model_fwd_bwd(flex, x):
    h = flex.register(HookFunction(f"blocks.{L}.resid_post"), "full_backward_pre", store_as="grad")
    flex(x.tokens).logits.logsumexp(-1).sum().backward()
    h.remove()
    return flex.output_dict.pop("grad")[0] if flex.output_dict else None  # on the owner rank


def transformer_lens_cache_blocks(tl, x):
    _, cache = tl.run_with_cache(x.tokens, names_filter=lambda n: n.endswith("hook_resid_post"))
    return cache.stack_activation("resid_post")


def transformer_lens_cache_patterns(tl, x):
    _, cache = tl.run_with_cache(x.tokens, names_filter=lambda n: n.endswith("hook_pattern"))
    return cache.stack_activation("pattern")


def transformer_lens_ablate_head(tl, x):
    def zero(z, hook):  # z: (batch, pos, heads, head dim)
        z[:, :, H] = 0
        return z
    return tl.run_with_hooks(x.tokens, fwd_hooks=[(f"blocks.{L}.attn.hook_z", zero)])


def transformer_lens_patch_position(tl, x):
    name = f"blocks.{L}.hook_resid_post"
    _, clean = tl.run_with_cache(x.tokens, names_filter=name)
    def patch(v, hook):
        v[:, P] = clean[name][:, P]
        return v
    return tl.run_with_hooks(x.corrupted, fwd_hooks=[(name, patch)])


def transformer_lens_generate(tl, x):
    with tl.hooks(fwd_hooks=[("blocks.0.hook_resid_post", lambda v, hook: v + x.direction)]):
        return tl.generate(x.prompt, max_new_tokens=x.new, do_sample=False, stop_at_eos=False,
                           use_past_kv_cache=True, verbose=False)


def transformer_lens_fwd_bwd(tl, x):
    grads = []
    with tl.hooks(bwd_hooks=[(f"blocks.{L}.hook_resid_post", lambda g, hook: grads.append(g.detach()))]):
        tl(x.tokens).logsumexp(-1).sum().backward()
    return grads[0]


def nnsight_cache_blocks(nn, x):
    with nn.trace(x.tokens):
        saved = list().save()
        for block in nn.transformer.h:
            saved.append(block.output)
    return torch.stack(saved)


def nnsight_cache_patterns(nn, x):
    with nn.trace(x.tokens, output_attentions=True):
        saved = list().save()
        for block in nn.transformer.h:
            saved.append(block.attn.output[1])
    return torch.stack(saved)


def nnsight_ablate_head(nn, x):
    with nn.trace(x.tokens):
        nn.transformer.h[L].attn.c_proj.input[..., H * x.dh:(H + 1) * x.dh] = 0
        logits = nn.output.logits.save()
    return logits


def nnsight_patch_position(nn, x):
    with nn.trace(x.tokens):
        clean = nn.transformer.h[L].output[:, P].save()
    with nn.trace(x.corrupted):
        nn.transformer.h[L].output[:, P] = clean
        logits = nn.output.logits.save()
    return logits


def nnsight_generate(nn, x):
    raise NotImplementedError("nnsight's generate (with per-step `tracer.iter`) is on nnsight.LanguageModel, "
                              "which needs a tokenizer (none without downloads here); a plain NNsight(model) "
                              "only traces forward: not done in the time")


def nnsight_fwd_bwd(nn, x):
    with nn.trace(x.tokens):
        out = nn.transformer.h[L].output
        loss = nn.output.logits.logsumexp(-1).sum()
        with loss.backward():
            grad = out.grad.save()
    return grad


def task_fn(tool: str, task: str) -> Callable:
    return globals()[f"{tool}_{task}"]


def code_lines(fn: Callable) -> int:
    """Source lines of ``fn``, blank lines and comments left out (the def line counted)."""
    src = inspect.getsource(fn).splitlines()
    return sum(1 for line in src if line.strip() and not line.strip().startswith("#"))


# ----------------------------------------------------------------------------------------------------------
# Models and inputs
# ----------------------------------------------------------------------------------------------------------

def config(a) -> Dict[str, int]:
    if a.quick:
        return dict(n_layer=2, n_embd=64, n_head=4, vocab_size=256, batch=2, seq=8, new=4)
    if a.gpt2_small:
        return dict(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, batch=a.batch or 8, seq=a.seq or 128,
                    new=a.new_tokens)
    return dict(n_layer=6, n_embd=384, n_head=6, vocab_size=8192, batch=a.batch or 4, seq=a.seq or 64,
                new=a.new_tokens)


def hf_model(cfg: Dict[str, int]):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    c = GPT2Config(n_layer=cfg["n_layer"], n_embd=cfg["n_embd"], n_head=cfg["n_head"],
                   vocab_size=cfg["vocab_size"], n_positions=256, resid_pdrop=0.0, embd_pdrop=0.0,
                   attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, attn_implementation="eager")
    return GPT2LMHeadModel(c).eval()


def inputs(cfg: Dict[str, int], rows: Optional[slice] = None) -> SimpleNamespace:
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(1, cfg["vocab_size"], (cfg["batch"], cfg["seq"]), generator=g)
    corrupted = tokens.clone()
    corrupted[:, :P + 1] = torch.randint(1, cfg["vocab_size"], (cfg["batch"], P + 1), generator=g)
    prompt = tokens[:, : max(4, cfg["seq"] // 4)]
    direction = 2 * torch.randn(cfg["n_embd"], generator=g)
    r = rows or slice(None)
    return SimpleNamespace(tokens=tokens[r], corrupted=corrupted[r], prompt=prompt[r], direction=direction,
                           new=cfg["new"], dh=cfg["n_embd"] // cfg["n_head"])


def build_tool(tool: str, base) -> Any:
    """The tool's own model object from a deep copy of ``base`` (raises when the peer cannot be imported)."""
    model = copy.deepcopy(base)
    if tool == "plain":
        return model
    if tool == "flex_model":
        return FlexModel(model, {})
    if tool == "nnsight":
        from nnsight import NNsight
        return NNsight(model)
    warnings.filterwarnings("ignore", message=".*HookedTransformer is deprecated.*")
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions.gpt2 import convert_gpt2_weights

    c = model.config
    tl_cfg = HookedTransformerConfig(
        n_layers=c.n_layer, d_model=c.n_embd, n_ctx=c.n_positions, d_head=c.n_embd // c.n_head, n_heads=c.n_head,
        d_mlp=4 * c.n_embd, d_vocab=c.vocab_size, act_fn="gelu_new", normalization_type="LN", device="cpu",
        default_prepend_bos=False, eps=c.layer_norm_epsilon)
    tl = HookedTransformer(tl_cfg)
    tl.load_and_process_state_dict(convert_gpt2_weights(model, tl_cfg), fold_ln=False, center_writing_weights=False,
                                   center_unembed=False, fold_value_biases=False)
    return tl.eval()


def run_task(tool: str, task: str, obj: Any, x: SimpleNamespace) -> Any:
    fn = task_fn(tool, task)
    if task == "fwd_bwd":
        with torch.enable_grad():
            obj.zero_grad(set_to_none=True)
            return fn(obj, x)
    with torch.no_grad():
        return fn(obj, x)


def compare(got: Any, want: torch.Tensor, task: str) -> Optional[str]:
    """None when ``got`` matches the plain-hook result, else what differs."""
    if got is None:
        return "no result"
    if not isinstance(got, torch.Tensor):
        return f"returned {type(got).__name__}"
    if got.shape != want.shape:
        return f"shape {tuple(got.shape)} != plain {tuple(want.shape)}"
    if task == "generate":
        same = (got == want).all(dim=-1)
        return None if bool(same.all()) else (
            f"other tokens than HF generate: {int((~same).sum())}/{len(same)} sequences differ, first at "
            f"position {int((got != want).any(0).nonzero()[0])}")
    err = (got.float() - want.float()).abs().max().item()
    scale = want.float().abs().max().item()
    return None if err <= 1e-4 + 1e-3 * scale else f"max |diff| {err:.2e} (scale {scale:.2e})"


# ----------------------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------------------

def summarise(times: Dict[str, List[float]], ref: str = "plain") -> Dict[str, Dict[str, float]]:
    """Per tool: median time, median of the per-round ratio to ``ref`` and its spread (max/min)."""
    out = {}
    for tool, ts in times.items():
        ratios = [t / r for t, r in zip(ts, times[ref])]
        out[tool] = dict(ms=statistics.median(ts) * 1e3, ratio=statistics.median(ratios),
                         spread=max(ratios) / min(ratios), rounds=len(ts))
    return out


def single_process(a, cfg) -> List[Dict[str, Any]]:
    torch.set_num_threads(1)
    base = hf_model(cfg)
    x = inputs(cfg)
    objs, errors = {}, {}
    for tool in TOOLS:
        try:
            objs[tool] = build_tool(tool, base)
        except Exception as e:  # fail, do not skip
            errors[tool] = f"cannot load: {type(e).__name__}: {e}"
    rows = []
    for task in TASKS:
        want = run_task("plain", task, objs["plain"], x)
        live, status = [], {}
        for tool in TOOLS:
            if tool in errors:
                status[tool] = ("error", errors[tool])
                continue
            try:
                diff = compare(run_task(tool, task, objs[tool], x), want, task)
            except NotImplementedError as e:
                status[tool] = ("not done", str(e))
                continue
            except Exception as e:
                status[tool] = ("error", f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
                continue
            status[tool] = ("ok", "") if diff is None else ("differs", diff)
            if diff is None:
                live.append(tool)
        times = {t: [] for t in live}
        for r in range(a.rounds):
            order = live[r % len(live):] + live[: r % len(live)]
            for tool in order:
                cpu = time.process_time()
                run_task(tool, task, objs[tool], x)
                times[tool].append(time.process_time() - cpu)
        stats = summarise(times)
        for tool in TOOLS:
            check, why = status[tool]
            s = stats.get(tool, {})
            rows.append(dict(tool=tool, task=task, layout="single", check=check, note=why,
                             lines=code_lines(task_fn(tool, task)), ms=s.get("ms"),
                             ratio_vs_plain=s.get("ratio"), spread=s.get("spread"), rounds=s.get("rounds"),
                             clock="process CPU time, 1 thread"))
        print(f"# single: {task} done", file=sys.stderr, flush=True)
    return rows


DP_TASKS = TASKS


def _dp_rank(cfg: Dict[str, int], rounds: int, out_path: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    rank, world = dist.get_rank(), dist.get_world_size()
    n = cfg["batch"] // world
    base = hf_model(cfg)
    x_all, x_mine = inputs(cfg), inputs(cfg, slice(rank * n, (rank + 1) * n))
    flex = FlexModel(DDP(copy.deepcopy(base)), {})
    peers, errors = {}, {}
    if rank == 0:
        for tool in ("plain", "transformer_lens", "nnsight"):
            try:
                peers[tool] = build_tool(tool, base)
            except Exception as e:
                errors[tool] = f"cannot load: {type(e).__name__}: {e}"
    ref = build_tool("plain", base)  # every rank: the one-process result, for the check
    rows = []
    for task in DP_TASKS:
        want = run_task("plain", task, ref, x_all)
        status = {}
        try:
            got = run_task("flex_model", task, flex, x_mine)
            rows_local = task in ("ablate_head", "patch_position", "generate")  # each rank returns its rows
            if rows_local:
                diff = compare(got, want[rank * n:(rank + 1) * n], task)
            else:  # the cache / captured gradient lives on the owner (rank 0)
                # DDP averages over ranks: the one-process loss it stands for is the sum of the ranks' / world
                scaled = want / world if task == "fwd_bwd" else want
                diff = compare(got, scaled, task) if rank == 0 else None
            bad = torch.tensor([0 if diff is None else 1])
            dist.all_reduce(bad)
            status["flex_model"] = ("ok", "") if int(bad) == 0 else ("differs", diff or "differs on rank 1")
        except Exception as e:
            status["flex_model"] = ("error", f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
        live = []
        if rank == 0:
            for tool in ("plain", "transformer_lens", "nnsight"):
                if tool in errors:
                    status[tool] = ("error", errors[tool])
                    continue
                try:
                    diff = compare(run_task(tool, task, peers[tool], x_all), want, task)
                    status[tool] = ("ok", "") if diff is None else ("differs", diff)
                    live += [tool] if diff is None else []
                except NotImplementedError as e:
                    status[tool] = ("not done", str(e))
                except Exception as e:
                    status[tool] = ("error", f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
        flags = [live, status["flex_model"][0] == "ok"]
        dist.broadcast_object_list(flags, src=0)
        live, flex_ok = flags
        times: Dict[str, List[float]] = {t: [] for t in live + (["flex_model"] if flex_ok else [])}
        for r in range(rounds):
            order = list(times)
            order = order[r % len(order):] + order[: r % len(order)]
            for tool in order:
                dist.barrier()
                start = time.perf_counter()
                if tool == "flex_model":
                    run_task("flex_model", task, flex, x_mine)
                elif rank == 0:
                    run_task(tool, task, peers[tool], x_all)
                dist.barrier()
                times[tool].append(time.perf_counter() - start)
        if rank == 0:
            stats = summarise(times) if "plain" in times else {}
            for tool in ("plain", "transformer_lens", "nnsight", "flex_model"):
                check, why = status[tool]
                s = stats.get(tool, {})
                row = dict(tool=tool, task=task, layout="dp2" if tool == "flex_model" else "single (dp2 job)",
                           check=check, note=why, lines=code_lines(task_fn(tool, task)), ms=s.get("ms"),
                           ratio_vs_plain=s.get("ratio"), spread=s.get("spread"), rounds=s.get("rounds"),
                           clock="wall-clock on rank 0 between barriers", global_batch=cfg["batch"])
                if tool == "flex_model" and s:
                    for peer in ("transformer_lens", "nnsight"):
                        if peer in times:
                            rs = [f / p for f, p in zip(times["flex_model"], times[peer])]
                            row[f"vs_{peer}"] = statistics.median(rs)
                            row[f"vs_{peer}_spread"] = max(rs) / min(rs)
                rows.append(row)
            print(f"# dp2: {task} done", file=sys.stderr, flush=True)
    flex.restore()
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(rows, f)


def data_parallel(a, cfg) -> List[Dict[str, Any]]:
    import tempfile

    from flex_model.launch import launch

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "rows.json")
        try:
            launch(_dp_rank, nprocs=2, backend="gloo", args=(cfg, a.rounds, path))
            with open(path) as f:
                return json.load(f)
        except Exception as e:
            msg = f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:300]}"
            return [dict(tool="flex_model", task=t, layout="dp2", check="error", note=msg, lines=None, ms=None,
                         ratio_vs_plain=None, spread=None) for t in DP_TASKS]


# ----------------------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------------------

def verdict(row: Dict[str, Any]) -> str:
    if row["check"] != "ok":
        return f"**{row['check']}**: {row['note']}"
    r, s = row["ratio_vs_plain"], row["spread"]
    if r is None:
        return "not timed"
    if row["tool"] == "plain":
        return "baseline"
    within = abs(r - 1) <= (s - 1)
    return "~ plain (inside the spread)" if within else ("slower" if r > 1 else "faster")


def table(rows: List[Dict[str, Any]]) -> str:
    out = ["| task | tool | layout | check | lines | ms | × plain hooks | spread | verdict |",
           "|---|---|---|---|---:|---:|---:|---:|---|"]
    for r in rows:
        f = lambda v, p: "" if v is None else f"{v:.{p}f}"
        extra = ""
        for peer in ("transformer_lens", "nnsight"):
            if r.get(f"vs_{peer}") is not None:
                extra += f"; {r[f'vs_{peer}']:.2f}× {peer} (spread {r[f'vs_{peer}_spread']:.2f})"
        out.append(f"| {r['task']} | {r['tool']} | {r['layout']} | {r['check']} | {r['lines'] or ''} | "
                   f"{f(r['ms'], 1)} | {f(r['ratio_vs_plain'], 3)} | {f(r['spread'], 3)} | {verdict(r)}{extra} |")
    return "\n".join(out)


def plot(rows: List[Dict[str, Any]], path: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = [("flex_model", "single"), ("transformer_lens", "single"), ("nnsight", "single"), ("flex_model", "dp2")]
    fig, ax = plt.subplots(figsize=(11, 4.5))
    width = 0.8 / len(series)
    for k, (tool, layout) in enumerate(series):
        for i, task in enumerate(TASKS):
            row = next((r for r in rows if r["tool"] == tool and r["task"] == task and r["layout"] == layout), None)
            xpos = i + (k - (len(series) - 1) / 2) * width
            if row is None or row["ratio_vs_plain"] is None:
                label = "n/a" if row is None else row["check"]
                ax.text(xpos, 0.05, label, rotation=90, ha="center", va="bottom", fontsize=7)
                continue
            r, s = row["ratio_vs_plain"], row["spread"]
            ax.bar(xpos, r, width, color=f"C{k}", label=f"{tool} ({layout})" if i == 0 or not ax.get_legend_handles_labels()[1].count(f"{tool} ({layout})") else None)
            ax.errorbar(xpos, r, yerr=[[r - r / s ** 0.5], [r * s ** 0.5 - r]], color="k", capsize=2, lw=0.8)
    handles, labels = ax.get_legend_handles_labels()
    uniq = dict(zip(labels, handles))
    ax.legend(uniq.values(), uniq.keys(), fontsize=8)
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xticks(range(len(TASKS)), TASKS)
    ax.set_ylabel("time / plain torch hooks (median; bars: spread)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, 3 rounds: a fast check")
    parser.add_argument("--gpt2-small", action="store_true", help="GPT-2-small shape (12 x 768, vocab 50257)")
    parser.add_argument("--batch", type=int, default=0)
    parser.add_argument("--seq", type=int, default=0)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--no-dp", action="store_true", help="leave out the dp2 layout")
    parser.add_argument("--json", action="store_true", help="one JSON line per (tool, task, layout)")
    parser.add_argument("--plot", default=None, help="save a bar plot (matplotlib) to this path")
    a = parser.parse_args()
    if a.quick:
        a.rounds = min(a.rounds, 3)
    cfg = config(a)
    load = os.getloadavg()[0]
    title = (f"GPT-2 config {cfg['n_layer']} x {cfg['n_embd']} ({cfg['n_head']} heads, vocab {cfg['vocab_size']}), "
             f"random weights, batch {cfg['batch']} x {cfg['seq']}, generate {cfg['new']} tokens, {a.rounds} rounds; "
             f"torch {torch.__version__}, load {load:.1f}")
    rows = single_process(a, cfg)
    if not a.no_dp:
        rows += data_parallel(a, cfg)
    if a.json:
        for r in rows:
            print(json.dumps(r))
    else:
        print(title)
        print()
        print(table(rows))
    if a.plot:
        plot(rows, a.plot, title)
    failed = [r for r in rows if r["check"] == "error" and "cannot load" in r["note"]]
    wrong = [r for r in rows if r["check"] in ("error", "differs")]
    if wrong:
        print(f"{len(wrong)} row(s) failed or differ from plain hooks (see their check column)", file=sys.stderr)
    if failed:
        print("a peer could not be imported: install the benchmarks extra (pip install -e '.[benchmarks]')",
              file=sys.stderr)
    sys.exit(1 if failed or any(r["tool"] == "flex_model" for r in wrong) else 0)


if __name__ == "__main__":
    main()
