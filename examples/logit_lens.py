"""Logit lens: decode every block's residual stream of a DDP-sharded GPT-2 through its final norm and unembedding.

    python examples/logit_lens.py                 # spawns 2 CPU ranks (gloo) itself; ~20 s of training
    torchrun --nproc_per_node 2 examples/logit_lens.py
    python examples/logit_lens.py --smoke         # a few training steps (CI)
    python examples/logit_lens.py --out plots/    # keep the figure in plots/

A tiny ``GPT2LMHeadModel`` (random init from a config, no download) is trained
under DDP on the 2 ranks on sequences ``[r, r]`` (``r`` random tokens): the
second half can be predicted only by copying the first. Then, on held-out
sequences, each rank passes its rows to ``flex.run_with_cache(...,
names_filter="blocks.{i}.resid_post")``; the owner (rank 0) gets the full
residual stream of every block, applies the model's final norm (``ln_f``) and
unembedding (``lm_head``) to each, and prints the probability of the correct
next token per layer: low in the early blocks, rising through the layers (the
last layer's lens is the model's own output). Rank 0 computes the same lens on
one process (the unwrapped model, every row) and prints whether it matches.
Figure: correct-token probability, layers x positions (``logit_lens.png``),
written to ``--out DIR``; without it, to a temp folder removed at the end.
"""
from __future__ import annotations

import copy
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from _figure_cli import run, save_figure
from flex_model import FlexModel

VOCAB = 64


def build_gpt2(n_layer: int, n_embd: int, seq: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=VOCAB, n_positions=seq, n_embd=n_embd, n_layer=n_layer, n_head=4,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg)


def repeated(batch: int, half: int, generator: torch.Generator) -> torch.Tensor:
    r = torch.randint(1, VOCAB, (batch, half), generator=generator)
    return torch.cat([r, r], dim=1)


def lens(cache_stack: torch.Tensor, model, tokens: torch.Tensor) -> torch.Tensor:
    """(layers, batch, pos, d) residuals -> (layers, pos - 1) mean probability of the correct next token."""
    with torch.no_grad():
        probs = model.lm_head(model.transformer.ln_f(cache_stack)).softmax(-1)  # (L, B, T, V)
    target = tokens[:, 1:].unsqueeze(0).expand(probs.shape[0], -1, -1)
    return probs[:, :, :-1].gather(-1, target.unsqueeze(-1)).squeeze(-1).mean(1)  # (L, T - 1)


def main(smoke: bool, out: str | None) -> None:
    torch.set_num_threads(1)
    rank, world = dist.get_rank(), dist.get_world_size()
    n_layer, n_embd, half, steps, batch = (4, 32, 6, 5, 8) if smoke else (4, 64, 10, 300, 16)
    model = build_gpt2(n_layer, n_embd, 2 * half)

    # Train under DDP: each rank its own rows, gradients averaged over the 2 ranks.
    ddp = DDP(model)
    opt = torch.optim.AdamW(ddp.parameters(), lr=3e-3 if not smoke else 1e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(100 + rank)
    t0 = time.time()
    for step in range(steps):
        x = repeated(batch, half, gen)
        logits = ddp(x).logits
        loss = F.cross_entropy(logits[:, half:-1].reshape(-1, VOCAB), x[:, half + 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if rank == 0 and (step % 100 == 0 or step == steps - 1):
            print(f"step {step}: second-half loss {loss.item():.3f}")
    model.eval()
    if rank == 0:
        print(f"trained {steps} steps under DDP on {world} ranks in {time.time() - t0:.1f} s")
    reference = copy.deepcopy(model) if rank == 0 else None  # the unwrapped model, for one process

    # The lens through flex_model: each rank passes its rows; the cache is on the owner (rank 0).
    tokens = repeated(8, half, torch.Generator().manual_seed(7))
    rows = tokens.chunk(world)[rank]
    flex = FlexModel(ddp, {})  # data parallel, read off DDP
    with torch.no_grad():
        _, cache = flex.run_with_cache(rows, names_filter="blocks.{i}.resid_post")
    flex.restore()
    if rank != 0:
        return
    resid = cache.stack("resid_post")  # (layers, batch, pos, d_model): every rank's rows
    print(f"cached {cache.layer_names('resid_post')}: stacked {tuple(resid.shape)}")
    p = lens(resid, model, tokens)  # (layers, pos - 1)
    second = slice(half, None)  # positions half .. 2*half-2 predict the copies r[1:]: copyable (and trained on)
    first = slice(0, half - 1)  # predicting r[1:] the first time: not predictable
    for i in range(n_layer):
        print(f"layer {i} resid_post: correct-token probability first half {p[i, first].mean():.3f}, "
              f"second half {p[i, second].mean():.3f}")
    per_layer = p[:, second].mean(1)
    rising = bool((per_layer[1:] >= per_layer[:-1] - 1e-3).all()) and per_layer[-1] > per_layer[0]
    print(f"correct-token probability rises through the layers (second half): {rising} "
          f"({' -> '.join(f'{v:.3f}' for v in per_layer.tolist())}; chance {1 / (VOCAB - 1):.3f})")

    # The same on one process: the unwrapped model, every row, plain output_hidden_states.
    with torch.no_grad():
        hs = reference(tokens, output_hidden_states=True).hidden_states  # embeddings, block 0, ..., ln_f(last)
        last = reference.transformer.h[-1](hs[-2])
        last = last[0] if isinstance(last, tuple) else last
    want_resid = torch.stack([*hs[1:-1], last])
    matches = torch.allclose(resid, want_resid, atol=1e-5) and torch.allclose(p, lens(want_resid, reference, tokens),
                                                                            atol=1e-5)
    print(f"matches one process: {matches}")
    if smoke:
        assert matches

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3))
    im = ax.imshow(p.numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=1, origin="lower")
    ax.axvline(half - 0.5, color="white", lw=1, ls="--")
    ax.set_xlabel("position (predicting the next token)")
    ax.set_ylabel("block (resid_post)")
    ax.set_yticks(range(n_layer))
    ax.set_title("logit lens: probability of the correct next token")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    save_figure(fig, out, "logit_lens.png")


if __name__ == "__main__":
    run(main, __doc__, "a few training steps, a smaller model (CI)")
