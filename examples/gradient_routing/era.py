"""Expand, Route, Ablate (ERA) at CPU scale, with FlexModel hooks doing all three.

A 4-layer, d_model 128 GPT is trained from scratch on two random bigram
sources over one 96-token vocabulary; the forget domain is one source. The
MLPs of layers 0-2 get 32 extra hidden units (``flex_model.expand``: hooks,
no source edits). ERA routes per token (``flex_model.Router`` on the MLP
up-projections of those layers, parameter level by default, as fastmask's
example; ``level="activation"`` is the other variant): forget tokens get
weight -0.75 on the original units and 1 on the expanded ones; retain
tokens 1 and 0. The
control is trained identically except that no routing masks are set. Then
the expanded units are ablated (a pass without the "expand" hook group, the
same as ``contract()``) and forget / retain validation losses are compared.

    python examples/gradient_routing/era.py --quick           # ~45 s on 2 idle CPU cores, prints one JSON line
    python examples/gradient_routing/era.py                   # full run, ~12 min on 2 CPU cores
    python examples/gradient_routing/era.py --out docs        # full run, regenerates the docs' figure and table

One process plus a pool of 2 worker processes (ERA and the control train side by
side, one thread each); under torchrun, rank 0 runs it and the other ranks exit.
``--quick`` (200 steps, the default variant) writes nothing. The full run (300
steps, three variants: ~12 minutes on 2 CPU cores) writes
``gradient_routing.png`` and the results table to ``--out`` (default
``./era_out``, made if missing): the table goes into ``gradient_routing.md``
between its ``<!-- results:start/end -->`` markers if that file is there (as in
``docs/``), else into ``gradient_routing_table.md``. It prints the paths.
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import time
from contextlib import nullcontext

import torch

from flex_model import FlexModel, RouteActivation, RouteParameters, Router, expand

if __package__:
    from .data import TwoSources
    from .model import GPT, token_losses
else:
    from data import TwoSources
    from model import GPT, token_losses

CONFIGS = {
    "full": dict(steps=300, batch=32, seq=64, d_model=128, n_layers=4, d_hidden=512, eval_n=256),
    "quick": dict(steps=200, batch=32, seq=64, d_model=128, n_layers=4, d_hidden=512, eval_n=128),
    "test": dict(steps=120, batch=16, seq=32, d_model=64, n_layers=3, d_hidden=128, eval_n=64),
}
COMMON = dict(threads=1, vocab=96, n_heads=4, d_expand=32, expand_layers=(0, 1, 2), forget_weight=-0.75,
              retain_expanded_weight=0.0, lr=3e-3, coherence=False, level="parameter", forget_frac=0.5,
              successors=4, seed=0)


def evaluate(flex: FlexModel, toks: torch.Tensor, groups) -> float:
    with torch.no_grad():
        return float(token_losses(flex(toks, groups=groups), toks).mean())


def train(cfg: dict, routed: bool, verbose: bool = True) -> dict:
    """Train one model (ERA if ``routed`` else the control); return curves and before/after losses."""
    torch.set_num_threads(cfg["threads"])
    data = TwoSources(cfg["vocab"], cfg["seq"], cfg["successors"], cfg["forget_frac"], seed=cfg["seed"])
    val_forget, val_retain = data.domain(True, cfg["eval_n"]), data.domain(False, cfg["eval_n"])
    torch.manual_seed(cfg["seed"])
    model = GPT(cfg["vocab"], cfg["d_model"], cfg["n_heads"], cfg["n_layers"], cfg["d_hidden"], cfg["seq"])
    flex = FlexModel(model, {}, store="none")
    h, e = cfg["d_hidden"], cfg["d_expand"]
    router = Router(h + e, [(0, h), (h, h + e)],
                    {0: [cfg["forget_weight"], 1.0], 1: [1.0, cfg["retain_expanded_weight"]]})
    names = [f"layers.{i}.mlp" for i in cfg["expand_layers"]]
    param_level = cfg["level"] == "parameter"
    expanded = expand(flex, names, e, router=router, unit_offset=h, param_level=param_level)  # group "expand"
    layers = "|".join(str(i) for i in cfg["expand_layers"])
    route = RouteParameters(router) if param_level else RouteActivation(router)
    flex.create_hook_group("route", rf"layers\.({layers})\.mlp\.up$", editing_function=route, regex=True)
    opt = torch.optim.AdamW(list(model.parameters()) + expanded.parameters(), lr=cfg["lr"])
    curves = {"forget": [], "retain": []}
    start = time.time()
    for step in range(cfg["steps"]):
        toks, mask = data.batch(cfg["batch"])
        masks = router.masks(mask) if routed else nullcontext()  # the only difference: routing masks
        with masks:
            losses = token_losses(flex(toks, groups=["expand", "route"] if routed else ["expand"]), toks)
        opt.zero_grad(set_to_none=True)
        loss = losses.mean()
        if cfg["coherence"]:  # retain data through the ablated model (no expansion, no routing); both runs
            retain = data.retain_batch(cfg["batch"] // 2)
            loss = loss + token_losses(flex(retain, groups=[]), retain).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(opt.param_groups[0]["params"], 1.0)
        opt.step()
        forget = mask[:, 1:] == 0
        losses = losses.detach()
        curves["forget"].append(float(losses[forget].mean()) if forget.any() else float("nan"))
        curves["retain"].append(float(losses[~forget].mean()) if (~forget).any() else float("nan"))
        if verbose and (step % 50 == 0 or step == cfg["steps"] - 1):
            print(f"{'era' if routed else 'control'} step {step}: forget {curves['forget'][-1]:.3f} "
                f"retain {curves['retain'][-1]:.3f} ({time.time() - start:.0f}s)", flush=True)
    out = {"curves": curves,
           "forget_before": evaluate(flex, val_forget, "expand"), "retain_before": evaluate(flex, val_retain, "expand"),
           "forget_after": evaluate(flex, val_forget, []), "retain_after": evaluate(flex, val_retain, [])}
    contracted = expanded.contract()  # the plain model: must equal the ablated pass
    with torch.no_grad():
        assert torch.equal(contracted(val_forget[:4]), flex(val_forget[:4], groups=[]))
    return out


def run(name: str, verbose: bool = True, parallel: bool = True, **overrides) -> dict:
    """ERA and control; with ``parallel`` each trains in its own process on one thread (2 cores)."""
    cfg = {**COMMON, **CONFIGS[name], **overrides}
    jobs = [(cfg, True, verbose), (cfg, False, verbose)]
    if parallel:
        ctx = multiprocessing.get_context("fork")
        with ctx.Pool(2) as pool:
            era, control = pool.starmap(train, jobs)
    else:
        era, control = (train(*job) for job in jobs)
    cfg["entropy"] = TwoSources(cfg["vocab"], cfg["seq"], cfg["successors"], seed=cfg["seed"]).forget.entropy()
    return {"era": era, "control": control, "config": cfg}


def summary(results: dict) -> dict:
    return {f"{run}_{dom}_{when}": round(results[run][f"{dom}_{when}"], 4)
            for run in ("era", "control") for dom in ("forget", "retain") for when in ("before", "after")}


MAIN = "parameter"  # the variant --quick reports
VARIANTS = {"parameter": {}, "activation": dict(level="activation"), "parameter+coherence": dict(coherence=True)}


def write_results(variants: dict, out_dir: str) -> list:
    """The PNG (loss curves, before/after bars) and the results table, in ``out_dir``; returns the paths.

    The table replaces the results section of ``out_dir/gradient_routing.md`` when that file exists
    (``--out docs``), else it is written to ``out_dir/gradient_routing_table.md``.
    """
    os.makedirs(out_dir, exist_ok=True)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 1 + len(variants), figsize=(5.5 * (1 + len(variants)), 4))
    smooth = lambda v: torch.tensor(v).unfold(0, 10, 1).mean(1).tolist()  # noqa: E731
    first = next(iter(variants))
    for run, style in (("era", "-"), ("control", "--")):
        for dom, color in (("forget", "tab:red"), ("retain", "tab:blue")):
            axes[0].plot(smooth(variants[first][run]["curves"][dom]), style, color=color, label=f"{run} {dom}")
    axes[0].set(xlabel="step", ylabel="train loss (nats, 10-step mean)", title=f"training ({first})")
    axes[0].legend()
    labels, x = ["ERA\nforget", "ERA\nretain", "control\nforget", "control\nretain"], torch.arange(4)
    for ax, (name, results) in zip(axes[1:], variants.items()):
        before = [results[r][f"{d}_before"] for r in ("era", "control") for d in ("forget", "retain")]
        after = [results[r][f"{d}_after"] for r in ("era", "control") for d in ("forget", "retain")]
        ax.bar(x - 0.2, before, 0.4, label="before ablation")
        ax.bar(x + 0.2, after, 0.4, label="expanded units ablated")
        ax.set_xticks(x, labels)
        ax.set(ylabel="validation loss (nats)", title=f"ablation ({name})")
        ax.legend()
    fig.tight_layout()
    png = os.path.join(out_dir, "gradient_routing.png")
    fig.savefig(png, dpi=90)
    rows = ["| variant | run | forget before | forget after | Δ forget | retain before | retain after | Δ retain |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, results in variants.items():
        for run in ("era", "control"):
            r = results[run]
            rows.append(f"| {name} | {run} | {r['forget_before']:.3f} | {r['forget_after']:.3f} | "
                        f"{r['forget_after'] - r['forget_before']:+.3f} | {r['retain_before']:.3f} | "
                        f"{r['retain_after']:.3f} | {r['retain_after'] - r['retain_before']:+.3f} |")
    cfg = next(iter(variants.values()))["config"]
    table = (f"Seed {cfg['seed']}, {cfg['steps']} steps; best achievable loss per domain ≈ "
             f"{cfg['entropy']:.2f} nats, uniform {math.log(cfg['vocab']):.2f}.\n\n" + "\n".join(rows))
    doc = os.path.join(out_dir, "gradient_routing.md")
    if os.path.exists(doc):
        text = open(doc).read()
        head, rest = text.split("<!-- results:start -->")
        _, tail = rest.split("<!-- results:end -->")
        with open(doc, "w") as f:
            f.write(f"{head}<!-- results:start -->\n{table}\n<!-- results:end -->{tail}")
    else:
        doc = os.path.join(out_dir, "gradient_routing_table.md")
        with open(doc, "w") as f:
            f.write(table + "\n")
    return [png, doc]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="smaller run (~45 s on 2 idle CPU cores); print one JSON line, write nothing")
    parser.add_argument("--out", default="era_out", metavar="DIR",
                        help="where the full run (~12 min on 2 CPU cores) writes its figure and table "
                             "(default: ./era_out; --out docs regenerates the docs' ones)")
    args = parser.parse_args()
    if args.quick:
        print(json.dumps(summary(run("quick", verbose=False, **VARIANTS[MAIN]))))
        return
    print(f"full run: 3 variants x (ERA, control), ~12 min on 2 CPU cores; results go to "
          f"{os.path.abspath(args.out)} (--quick: ~45 s, writes nothing)", flush=True)
    variants = {name: run("full", **overrides) for name, overrides in VARIANTS.items()}
    for name, results in variants.items():
        print(json.dumps({"variant": name, **summary(results)}))
    for path in write_results(variants, args.out):
        print(f"wrote {os.path.abspath(path)}")


if __name__ == "__main__":
    if int(os.environ.get("RANK", "0")) == 0:  # a one-process example: under torchrun, rank 0 runs it
        main()
