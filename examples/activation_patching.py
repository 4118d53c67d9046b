"""Activation patching on a DDP-sharded GPT-2: where does the answer travel, layer by layer, position by position?

    python examples/activation_patching.py              # spawns 2 CPU ranks (gloo) itself
    torchrun --nproc_per_node 2 examples/activation_patching.py
    python examples/activation_patching.py --smoke      # a few training steps (CI)
    python examples/activation_patching.py --out plots/ # keep the heatmap in plots/

A tiny ``GPT2LMHeadModel`` (random init from a config) is trained under DDP on
the 2 ranks on an "A B ... A -> B" task: prompts ``[A, B, f, f, f, f, A]``
(``f`` random filler tokens) whose answer is ``B``, the token that followed the
first ``A``. Clean and corrupted prompts differ in one token: ``B`` (position 1)
is replaced by another ``B'``; the metric is the logit difference
``logit(B) - logit(B')`` at the last position, averaged over the prompts.
``patching_sweep`` patches the clean ``blocks.{i}.resid_pre`` (and the final
``resid_post``) into the corrupted run at one position at a time: in the first
block only position 1 (where ``B`` is) recovers the clean logit difference; in
the later ones only the last position does. The block where the recovery moves
from one to the other is where attention carried ``B`` to the answer position;
the script prints it. Each rank passes its rows; the sweep is the one-process
sweep, which rank 0 recomputes on the unwrapped model and compares. Heatmap
(``sweep.plot()``): ``patching.png`` in ``--out DIR``; without it, in a temp
folder removed at the end.
"""
from __future__ import annotations

import copy
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from _figure_cli import run, save_figure
from flex_model import FlexModel, ParallelLayout, patching_sweep

VOCAB, T = 64, 7  # prompt: A B f f f f A; answer B


def build_gpt2(n_layer: int, n_embd: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=VOCAB, n_positions=T, n_embd=n_embd, n_layer=n_layer, n_head=4,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg)


def prompts(batch: int, generator: torch.Generator):
    """(prompts (batch, T), answers (batch,)): A in 1..31, B in 32..63, fillers anywhere in 1..63."""
    a = torch.randint(1, 32, (batch,), generator=generator)
    b = torch.randint(32, VOCAB, (batch,), generator=generator)
    fill = torch.randint(1, VOCAB, (batch, T - 3), generator=generator)
    return torch.cat([a[:, None], b[:, None], fill, a[:, None]], dim=1), b


def main(smoke: bool, out: str | None) -> None:
    torch.set_num_threads(1)
    rank, world = dist.get_rank(), dist.get_world_size()
    n_layer, n_embd, steps, batch = (3, 32, 5, 16) if smoke else (3, 64, 200, 32)
    model = build_gpt2(n_layer, n_embd)

    ddp = DDP(model)  # train: each rank its own rows, gradients averaged
    opt = torch.optim.AdamW(ddp.parameters(), lr=3e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(100 + rank)
    t0 = time.time()
    for step in range(steps):
        x, y = prompts(batch, gen)
        loss = F.cross_entropy(ddp(x).logits[:, -1], y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if rank == 0 and (step % 100 == 0 or step == steps - 1):
            print(f"step {step}: answer loss {loss.item():.3f}")
    model.eval()
    reference = copy.deepcopy(model) if rank == 0 else None

    # Clean / corrupted: the same prompts but for B at position 1. Every rank builds all of them, passes its rows.
    clean, b = prompts(16, torch.Generator().manual_seed(7))
    b_other = 32 + (b - 32 + 1 + torch.randint(0, 30, b.shape, generator=torch.Generator().manual_seed(8))) % 32
    corrupted = clean.clone()
    corrupted[:, 1] = b_other
    with torch.no_grad():
        acc = (model(clean).logits[:, -1].argmax(-1) == b).float().mean().item()
    if rank == 0:
        print(f"trained {steps} steps under DDP on {world} ranks in {time.time() - t0:.1f} s; "
              f"answer accuracy on the clean prompts {acc:.2f}")

    def logit_diff(logits):  # gets every rank's rows: (16, T, vocab)
        last = logits[:, -1]
        rows = torch.arange(last.shape[0])
        return (last[rows, b] - last[rows, b_other]).mean()

    names = [f"blocks.{i}.resid_pre" for i in range(n_layer)] + [f"blocks.{n_layer - 1}.resid_post"]
    rows = slice(rank * 16 // world, (rank + 1) * 16 // world)
    inputs = lambda x: {"input_ids": x, "use_cache": False}
    flex = FlexModel(ddp, {})  # data parallel, read off DDP
    t0 = time.time()
    sweep = patching_sweep(flex, inputs(clean[rows]), inputs(corrupted[rows]), logit_diff, names=names,
                           positions=range(T))
    flex.restore()
    if rank != 0:
        return
    print(f"{sweep} in {time.time() - t0:.1f} s")
    norm = sweep.normalized()
    labels = ["A", "B", *["f"] * (T - 3), "A"]
    for name, row in zip(sweep.names, norm):
        print(f"{name:22s} " + " ".join(f"{labels[p]}{p}:{v:+.2f}" for p, v in zip(sweep.positions, row.tolist())))
    best = norm.argmax(1).tolist()  # the position that recovers the most, per name
    print("largest recovered logit difference: " + ", ".join(
        f"{n} at position {p} ({labels[p]}, {norm[i, p]:.2f})" for i, (n, p) in enumerate(zip(sweep.names, best))))
    moved = next((i for i, p in enumerate(best) if p == T - 1), None)
    if best[0] == 1 and moved is not None:
        print(f"information flow: B sits at position 1 up to {sweep.names[moved - 1]}; from {sweep.names[moved]} "
              f"on it is at the last position: attention in block {moved - 1} moved it")

    alone = FlexModel(reference, {}, layout=ParallelLayout.single())  # one process, every row
    one = patching_sweep(alone, inputs(clean), inputs(corrupted), logit_diff, names=names, positions=range(T))
    alone.restore()
    matches = torch.allclose(sweep.values, one.values, atol=1e-4) and abs(sweep.clean - one.clean) < 1e-4
    print(f"matches one process: {matches}")
    if smoke:
        assert matches

    import matplotlib

    matplotlib.use("Agg")

    ax = sweep.plot(normalize=True, title="recovered logit diff (normalized)")
    ax.set_xticks(range(T), [f"{labels[p]}{p}" for p in range(T)])
    ax.figure.tight_layout()
    save_figure(ax.figure, out, "patching.png")


if __name__ == "__main__":
    run(main, __doc__, "a few training steps, a smaller model (CI)")
