"""Two random bigram sources over one vocabulary: the forget and the retain domain.

Each source draws, for every token, ``successors`` random next tokens (with
random Dirichlet probabilities); a sequence comes from one source only. The
sources share the vocabulary, so a model must tell them apart from context.
"""
from __future__ import annotations

import torch


class BigramSource:
    def __init__(self, vocab: int, successors: int, generator: torch.Generator) -> None:
        probs = torch.zeros(vocab, vocab)
        for t in range(vocab):
            nxt = torch.randperm(vocab, generator=generator)[:successors]
            probs[t, nxt] = torch.distributions.Dirichlet(torch.ones(successors)).sample()  # global RNG
        self.probs = probs

    def sample(self, n: int, seq: int, generator: torch.Generator) -> torch.Tensor:
        cdf = self.probs.cumsum(-1)
        cdf[:, -1] = 1.0
        u = torch.rand(seq, n, 1, generator=generator)
        out = torch.empty(n, seq, dtype=torch.long)
        out[:, 0] = (u[0, :, 0] * self.probs.shape[0]).long()
        for t in range(1, seq):
            out[:, t] = torch.searchsorted(cdf[out[:, t - 1]], u[t])[:, 0].clamp_max(cdf.shape[0] - 1)
        return out

    def entropy(self) -> float:
        """Mean next-token entropy (nats) under a uniform current token: the best achievable loss."""
        p = self.probs.clamp_min(1e-12)
        return float(-(self.probs * p.log()).sum(-1).mean())


class TwoSources:
    """``batch(n)`` → (tokens [n, seq], mask_ids [n, seq]: 0 = forget source, 1 = retain source)."""

    def __init__(self, vocab: int = 96, seq: int = 64, successors: int = 4, forget_frac: float = 0.5,
                 seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.g = torch.Generator().manual_seed(seed)
        self.forget, self.retain = (BigramSource(vocab, successors, self.g) for _ in range(2))
        self.seq, self.forget_frac = seq, forget_frac
        self._pools: dict = {}

    def batch(self, n: int):
        is_forget = torch.rand(n, generator=self.g) < self.forget_frac
        toks = torch.empty(n, self.seq, dtype=torch.long)
        for forget, rows in ((True, is_forget), (False, ~is_forget)):
            toks[rows] = self._take(forget, int(rows.sum()))
        return toks, (~is_forget).long()[:, None].expand(n, self.seq).contiguous()

    def retain_batch(self, n: int) -> torch.Tensor:
        """``n`` training sequences of the retain source only."""
        return self._take(False, n)

    def _take(self, forget: bool, n: int) -> torch.Tensor:
        """``n`` training sequences of one source, from a pool sampled 4096 at a time."""
        pool = self._pools.get(forget)
        if pool is None or len(pool) < n:
            fresh = (self.forget if forget else self.retain).sample(4096, self.seq, self.g)
            pool = fresh if pool is None else torch.cat([pool, fresh])
        self._pools[forget] = pool[n:]
        return pool[:n]

    def domain(self, forget: bool, n: int) -> torch.Tensor:
        return (self.forget if forget else self.retain).sample(n, self.seq, self.g)
