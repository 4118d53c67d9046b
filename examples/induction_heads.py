"""Induction heads: train a 2-layer attention-only transformer on repeated random sequences, then look inside.

    python examples/induction_heads.py                 # ~2 minutes of training on one CPU thread
    python examples/induction_heads.py --smoke         # < 60 s (CI)
    python examples/induction_heads.py --out plots/    # keep the PNGs in plots/

One process (under torchrun, rank 0 runs it; the other ranks exit). Without
``--out`` the PNGs go to a fresh temp folder that is removed at the end; the
script prints where it wrote either way.

Each attention layer passes its probabilities through a ``flex_model.DummyModule``
(``layers.{i}.attn.pattern``), a hook point for ``FlexModel``. The script

1. trains on sequences ``[r, r]`` (``r`` random tokens of varying length): the
   second half can be predicted only by copying, which is what induction heads do;
2. retrieves the attention patterns through hooks and computes each head's
   induction score (the mean attention from position ``i`` in the second half
   to ``i - n + 1``, the token after the previous occurrence of the current one);
   saves a heat-map (``induction_scores.png``) and the per-position loss curve
   (``loss_by_position.png``);
3. samples through the wrapper with the capture hooks on (temperature, top-k,
   nucleus) and counts how often the continuation copies the sequence;
4. ablates the best induction head, then its whole layer (an editing function
   zeroes the patterns) and reports the per-token loss and perplexity.
"""
from __future__ import annotations

import argparse
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from flex_model import DummyModule, FlexModel, HookFunction


class Attention(nn.Module):
    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)
        self.pattern = DummyModule()  # hook point: (batch, heads, query, key) probabilities

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.n_heads, -1).transpose(1, 2) for t in self.qkv(x).split(C, -1))
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
        scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        pattern = self.pattern(scores.softmax(-1))
        return self.out((pattern @ v).transpose(1, 2).reshape(B, T, C))


class Layer(nn.Module):
    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(d_model)
        self.attn = Attention(d_model, n_heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.attn(self.ln(x))


class AttnOnly(nn.Module):
    """Token + position embeddings, ``n_layers`` attention-only residual layers, unembedding."""

    def __init__(self, vocab: int, d_model: int, n_heads: int, n_layers: int, max_len: int) -> None:
        super().__init__()
        self.embed, self.pos = nn.Embedding(vocab, d_model), nn.Embedding(max_len, d_model)
        self.layers = nn.ModuleList(Layer(d_model, n_heads) for _ in range(n_layers))
        self.ln_f, self.unembed = nn.LayerNorm(d_model), nn.Linear(d_model, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.pos(torch.arange(tokens.shape[1]))
        for layer in self.layers:
            x = layer(x)
        return self.unembed(self.ln_f(x))


def repeated(batch: int, half: int, vocab: int, generator: torch.Generator) -> torch.Tensor:
    r = torch.randint(0, vocab, (batch, half), generator=generator)
    return torch.cat([r, r], 1)


def token_losses(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """(batch, seq - 1) next-token losses."""
    return F.cross_entropy(logits[:, :-1].transpose(1, 2), tokens[:, 1:], reduction="none")


def train(model: nn.Module, steps: int, batch: int, max_half: int, vocab: int, seconds: float) -> None:
    """AdamW on ``[r, r]`` batches; the length of ``r`` varies per step, so no head can copy by position alone."""
    gen = torch.Generator().manual_seed(1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    start = time.monotonic()
    for step in range(steps):
        half = int(torch.randint(4, max_half + 1, (), generator=gen))
        tokens = repeated(batch, half, vocab, gen)
        loss = token_losses(model(tokens), tokens).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"step {step:4d} loss {loss.item():.3f}")
        if time.monotonic() - start > seconds:
            print(f"step {step:4d} loss {loss.item():.3f} (time budget of {seconds:.0f} s reached)")
            break


def induction_scores(patterns: list, half: int) -> torch.Tensor:
    """(layers, heads) mean attention from query i >= half to key i - half + 1."""
    queries = torch.arange(half, 2 * half)
    return torch.stack([p[:, :, queries, queries - half + 1].mean((0, 2)) for p in patterns])


def sample(flex: FlexModel, prompt: torch.Tensor, new: int, temperature: float, top_k: int, top_p: float,
           gen: torch.Generator) -> torch.Tensor:
    """Autoregressive sampling through the wrapper (its hooks fire at every step)."""
    tokens = prompt
    for _ in range(new):
        logits = flex(tokens)[:, -1] / temperature
        kth = logits.topk(top_k, -1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = logits.softmax(-1)
        sorted_p, order = probs.sort(-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > top_p  # nucleus: keep the smallest set reaching top_p
        probs = probs.scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
        tokens = torch.cat([tokens, torch.multinomial(probs / probs.sum(-1, keepdim=True), 1, generator=gen)], 1)
    return tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a short run (< 60 s)")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="folder for the PNGs, kept (default: a temp folder, removed at the end)")
    a = parser.parse_args()
    out = Path(a.out) if a.out else Path(tempfile.mkdtemp(prefix="flex_induction_"))
    try:
        run(a.smoke, out)
    finally:
        if a.out is None:
            shutil.rmtree(out, ignore_errors=True)
            print(f"removed the temp folder {out} (pass --out DIR to keep the PNGs)")


def run(smoke: bool, out: Path) -> None:
    """Train, look inside, ablate, sample; the two PNGs go to ``out``."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    vocab, half, n_layers, n_heads = 64, 16, 2, 4
    steps, seconds = (1500, 20.0) if smoke else (4000, 150.0)
    model = AttnOnly(vocab, d_model=64, n_heads=n_heads, n_layers=n_layers, max_len=2 * (half + 4))
    train(model, steps, batch=32, max_half=half + 4, vocab=vocab, seconds=seconds)
    model.eval()

    output_dict: dict = {}
    flex = FlexModel(model, output_dict)
    names = [f"layers.{i}.attn.pattern" for i in range(n_layers)]
    flex.create_hook_group("patterns", "attn.pattern")
    gen = torch.Generator().manual_seed(2)
    tokens = repeated(64, half, vocab, gen)
    with torch.no_grad():
        clean = token_losses(flex(tokens), tokens)
    patterns = [output_dict[n][0] for n in names]
    print(f"retrieved attention patterns: {[tuple(p.shape) for p in patterns]}, "
          f"rows sum to 1: {all(torch.allclose(p.sum(-1), torch.ones(())) for p in patterns)}")
    scores = induction_scores(patterns, half)
    for layer in range(n_layers):
        print(f"induction score layer {layer}: " + " ".join(f"H{h} {s:.3f}" for h, s in enumerate(scores[layer])))
    best_layer, best_head = divmod(int(scores.argmax()), n_heads)
    print(f"best induction head: L{best_layer}H{best_head} (score {scores.max():.3f})")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(4, 3))
    im = ax.imshow(scores, vmin=0, vmax=1, cmap="viridis")
    ax.set(xlabel="head", ylabel="layer", title="induction score")
    fig.colorbar(im)
    fig.savefig(out / "induction_scores.png", dpi=100, bbox_inches="tight")
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot(range(1, 2 * half), clean.mean(0), label="clean")

    # Ablation: zero patterns of the best head, then of every head in its layer (the editing
    # function sees the full pattern tensor; its result replaces the module's output).
    def ablation(heads):
        def ablate(current_module, inputs, save_ctx, modules):
            edited = inputs.clone()
            edited[:, heads] = 0
            return edited
        return ablate

    results = {"clean": clean}
    for label, heads in ((f"L{best_layer}H{best_head} ablated", [best_head]),
                         (f"layer {best_layer} ablated", list(range(n_heads)))):
        edit = flex.register_forward_hook(HookFunction(names[best_layer], editing_function=ablation(heads)))
        with torch.no_grad():
            results[label] = token_losses(flex(tokens), tokens)
        edit.remove()
        ax.plot(range(1, 2 * half), results[label].mean(0), label=label)
    ax.set(xlabel="position", ylabel="next-token loss", title="loss by position")
    ax.legend()
    fig.savefig(out / "loss_by_position.png", dpi=100, bbox_inches="tight")
    print(f"wrote {out / 'induction_scores.png'} and {out / 'loss_by_position.png'}")
    second = slice(half, None)  # predictions of tokens half+1 .. 2*half-1: copyable
    for label, losses in results.items():
        loss = losses[:, second].mean().item()
        print(f"second-half per-token loss, {label}: {loss:.3f} (perplexity {math.exp(loss):.2f}); "
              f"first half: {losses[:, :half - 1].mean().item():.3f} (chance {math.log(vocab):.3f})")

    # Sampling through the wrapper, capture hooks on: prompt = r plus its first 4 tokens again.
    prompts = repeated(8, half, vocab, gen)[:, :half + 4]
    flex.clear_output_dict()
    with torch.no_grad():
        for temperature, top_k, top_p in ((1.0, vocab, 1.0), (0.7, 10, 1.0), (1.0, vocab, 0.9)):
            got = sample(flex, prompts, half - 4, temperature, top_k, top_p, gen)
            copied = (got[:, half + 4:] == prompts[:, 4:half]).float().mean().item()
            print(f"sampling T={temperature} top_k={top_k} top_p={top_p}: copies the sequence at "
                  f"{copied:.0%} of new tokens")
    print(f"hooks fired while sampling: {len(output_dict[names[0]])} times per layer")
    flex.restore()


if __name__ == "__main__":
    if int(os.environ.get("RANK", "0")) == 0:  # a one-process example: under torchrun, rank 0 runs it
        main()
