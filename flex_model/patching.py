"""Activation patching: ``patching_sweep(flex, clean, corrupted, metric, names=..., positions=...)`` → ``Sweep``.

The clean input runs once with its activations cached (``run_with_cache``);
then, for every name and position, the corrupted input runs with that one
activation replaced by the clean run's at that position (along ``seq_dim``),
and ``metric`` scores the output. ``batched=True`` runs one pass per name
instead, over the corrupted batch repeated once per position (each copy
patched at its own position): fewer passes, ``len(positions)`` times the
rows. The result is a ``Sweep``: ``values`` of shape ``(len(names),
len(positions))`` with its axes' labels, the clean and corrupted scores, and
``plot()`` (a matplotlib heatmap).

The same under every layout with one pipeline stage: the patch is an
editing function, so it runs once on the full activation (in global scope on
the root, which holds the clean cache; in replica scope on each replica's
root, which holds its replica's rows), and ``metric`` sees the full output —
the model's output (its ``output``-selected tensor) gathered over the
data-parallel ranks' rows on the owner, where it runs; its scores are then
broadcast, so every rank returns the same ``Sweep``. A patch is batch-local,
so both scopes give the one-process result.

Built only on ``FlexModel``'s public surface (``register``, ``layout``,
``process_group``) and ``run_with_cache``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist

from flex_model import collectives as C
from flex_model.cache import ActivationCache, NamesFilter, key_for, note_on_failure, select_names
from flex_model.flex_model import FlexModel
from flex_model.hook_function import HookFunction, Scope
from flex_model.tree import tensor_leaves

Metric = Callable[[torch.Tensor], Union[torch.Tensor, float]]
Inputs = Union[torch.Tensor, Tuple[Any, ...], Mapping[str, Any]]


@dataclass
class Sweep:
    """A patching sweep's scores: ``values[i, j]`` is the metric with ``names[i]`` patched at
    ``positions[j]`` (None: every position). ``clean`` / ``corrupted``: the metric of the unpatched runs."""

    values: torch.Tensor
    names: List[str]
    positions: List[Optional[int]]
    clean: float
    corrupted: float

    def normalized(self) -> torch.Tensor:
        """``(values - corrupted) / (clean - corrupted)``: 0 = no effect, 1 = the clean run's score."""
        return (self.values - self.corrupted) / (self.clean - self.corrupted)

    def to_dict(self) -> Dict[str, Dict[Optional[int], float]]:
        return {n: {p: float(v) for p, v in zip(self.positions, row)} for n, row in zip(self.names, self.values)}

    def plot(self, ax: Any = None, *, normalize: bool = False, cmap: str = "RdBu_r", title: Optional[str] = None,
             **imshow_kwargs: Any) -> Any:
        """A heatmap of ``values`` (names down, positions across) on ``ax`` (a new figure if None); returns
        the axes. Needs matplotlib (imported here)."""
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots(figsize=(1.2 + 0.45 * len(self.positions), 1.0 + 0.35 * len(self.names)))
        data = (self.normalized() if normalize else self.values).float().numpy()
        lim = float(abs(data).max()) or 1.0
        imshow_kwargs.setdefault("vmin", -lim)
        imshow_kwargs.setdefault("vmax", lim)
        image = ax.imshow(data, cmap=cmap, aspect="auto", **imshow_kwargs)
        ax.set_xticks(range(len(self.positions)), ["all" if p is None else str(p) for p in self.positions])
        ax.set_yticks(range(len(self.names)), self.names)
        ax.set_xlabel("position")
        ax.set_title(title or ("patching (normalized)" if normalize else "patching"))
        ax.figure.colorbar(image, ax=ax)
        return ax

    def __repr__(self) -> str:
        return (f"Sweep({len(self.names)} names x {len(self.positions)} positions, clean={self.clean:.4g}, "
                f"corrupted={self.corrupted:.4g})")


def _call(flex: FlexModel, inputs: Inputs) -> Any:
    if isinstance(inputs, Mapping):
        return flex(**inputs)
    if isinstance(inputs, tuple):
        return flex(*inputs)
    return flex(inputs)


def _repeat(inputs: Inputs, times: int, batch_dim: int) -> Inputs:
    """The input batch repeated ``times`` (copy ``k`` = rows ``k*B .. (k+1)*B - 1`` of this rank)."""
    def rep(x: Any) -> Any:
        if isinstance(x, torch.Tensor) and x.ndim > batch_dim:
            return torch.cat([x] * times, dim=batch_dim)
        return x
    if isinstance(inputs, Mapping):
        return {k: rep(v) for k, v in inputs.items()}
    if isinstance(inputs, tuple):
        return tuple(rep(v) for v in inputs)
    return rep(inputs)


def _local_rows(inputs: Inputs, batch_dim: int) -> int:
    for leaf in tensor_leaves(dict(inputs) if isinstance(inputs, Mapping) else inputs):
        if leaf.ndim > batch_dim:
            return int(leaf.shape[batch_dim])
    raise ValueError("cannot tell the batch size: the inputs hold no tensor with a batch dim")


class _Full:
    """The owner's view of the full batch: gathers a tensor's rows from every data-parallel rank, runs the
    metric there, and tells every rank the scores."""

    def __init__(self, flex: FlexModel, output: Callable[[Any], torch.Tensor], scope: Scope) -> None:
        layout = flex.layout
        self.flex, self.output, self.layout = flex, output, layout
        self.single = layout.is_single
        self.group = flex.process_group
        self.is_owner = layout.rank == layout.owner
        me = layout.my
        self.source = me["tp"] == 0  # the model's output is whole on every tp rank: take tp 0's
        self.rows: List[int] = []  # local rows of each dp rank, dp order

    def learn_rows(self, local: int) -> None:
        if self.single:
            self.rows = [local]
            return
        everyone: List[Any] = [None] * dist.get_world_size(self.group)
        dist.all_gather_object(everyone, (self.layout.my["dp"], self.layout.my["tp"], local), group=self.group)
        self.rows = [n for _, _, n in sorted(e for e in everyone if e[1] == 0)]

    def gather(self, out: Any) -> Optional[torch.Tensor]:
        """The selected output tensor over every dp rank's rows, on the owner (None elsewhere)."""
        mine = self.output(out)
        if not isinstance(mine, torch.Tensor):
            raise TypeError(f"output= must return a tensor of the model's output, got {type(mine).__name__}")
        mine = mine.detach()
        if self.single:
            return mine
        piece = (self.layout.my["dp"], mine.cpu()) if self.source else None
        pieces: Optional[List[Any]] = [None] * dist.get_world_size(self.group) if self.is_owner else None
        dist.gather_object(piece, pieces, dst=self.layout.owner, group=self.group)
        if not self.is_owner:
            return None
        parts = sorted((p for p in pieces if p is not None), key=lambda p: p[0])
        return torch.cat([t for _, t in parts], dim=self.layout.batch_dim).to(mine.device)

    def score(self, metric: Metric, full: Optional[torch.Tensor]) -> Optional[float]:
        """``metric(full)`` on the owner; an error there is raised on every rank (one small all-reduce)."""
        value, error = None, None
        if full is not None:
            try:
                value = float(torch.as_tensor(metric(full)).detach().float().item())
            except Exception as e:
                error = e
        if not self.single and C.any_rank(error is not None, self.group):
            if error is not None:
                raise error
            raise RuntimeError(f"patching_sweep: the metric failed on the owner rank {self.layout.owner}")
        if error is not None:
            raise error
        return value

    def share(self, values: torch.Tensor) -> torch.Tensor:
        """The owner's ``values`` on every rank."""
        if self.single:
            return values
        device = C.comm_device(self.group)
        moved = values.to(device)
        dist.broadcast(moved, src=self.layout.owner, group=self.group)
        return moved.cpu()


def _first_leaf(out: Any) -> torch.Tensor:
    leaves = tensor_leaves(out)
    if not leaves:
        raise TypeError(f"the model's output ({type(out).__name__}) holds no tensor; pass output=")
    return leaves[0]


class _Patch:
    """The editing function of one patched pass: the clean value at ``positions`` (along ``seq_dim``), for the
    rows ``rows`` (None: every row; else (corrupted rows, clean rows) index pairs per position)."""

    def __init__(self, name: str, clean: Optional[torch.Tensor], positions: List[Optional[int]], seq_dim: int,
                 rows: Optional[List[Tuple[torch.Tensor, torch.Tensor]]] = None, batch_dim: int = 0) -> None:
        self.name, self.clean, self.positions, self.seq_dim = name, clean, positions, seq_dim
        self.rows, self.batch_dim = rows, batch_dim

    def __call__(self, module: torch.nn.Module, x: torch.Tensor, save_ctx: Any, modules: Any) -> torch.Tensor:
        if self.clean is None:
            raise RuntimeError(f'patching "{self.name}": the clean activation is not on this rank (the edit runs '
                               "on the root of its stage; pipeline stages other than the owner's are not "
                               "supported)")
        clean = self.clean.to(device=x.device, dtype=x.dtype)
        y = x.clone()
        if self.rows is None:
            if clean.shape != x.shape:
                raise ValueError(f'patching "{self.name}": the clean activation has shape {tuple(clean.shape)}, '
                                 f"the corrupted one {tuple(x.shape)}; clean and corrupted inputs must have the "
                                 "same shape")
            p = self.positions[0]
            if p is None:
                return clean.clone()
            index = [slice(None)] * x.ndim
            index[self.seq_dim] = p
            y[tuple(index)] = clean[tuple(index)]
            return y
        for p, (dst, src) in zip(self.positions, self.rows):
            index = [slice(None)] * x.ndim
            if p is not None:
                index[self.seq_dim] = p
            dst_index, src_index = list(index), list(index)
            dst_index[self.batch_dim], src_index[self.batch_dim] = dst.to(x.device), src.to(x.device)
            y[tuple(dst_index)] = clean[tuple(src_index)]
        return y


def _row_pairs(rows: List[int], n_positions: int) -> Tuple[List[Tuple[torch.Tensor, torch.Tensor]], List[torch.Tensor]]:
    """For the repeated batch (each dp rank's rows repeated ``n_positions`` times, gathered in dp order):
    per position, (rows of the gathered repeated batch, rows of the clean batch) — and per position the
    rows of the gathered output that belong to it, in clean-batch order."""
    pairs, outs = [], []
    for k in range(n_positions):
        dst, src = [], []
        offset_rep = offset_clean = 0
        for n in rows:
            dst += range(offset_rep + k * n, offset_rep + (k + 1) * n)
            src += range(offset_clean, offset_clean + n)
            offset_rep += n * n_positions
            offset_clean += n
        pairs.append((torch.tensor(dst), torch.tensor(src)))
        outs.append(torch.tensor(dst))
    return pairs, outs


def patching_sweep(flex: FlexModel, clean: Inputs, corrupted: Inputs, metric: Metric, names: NamesFilter,
                   positions: Optional[Sequence[int]] = None, *, batched: bool = False, seq_dim: int = 1,
                   output: Callable[[Any], torch.Tensor] = _first_leaf, unpack_idx: int = 0,
                   scope: Optional[Scope] = None) -> Sweep:
    """Patch each of ``names`` (a list, a pattern with ``{i}`` such as ``"layers.{i}"``, or a callable) at
    each of ``positions`` (indices along ``seq_dim`` of the activations; None: the whole activation at
    once) from the clean run into the corrupted run, and score every patched run with ``metric``.

    ``clean`` / ``corrupted``: the model's input (a tensor, a tuple of arguments or a dict of keyword
    arguments; on several ranks each rank's own rows, as for any pass). ``metric(full_output)`` gets the
    tensor ``output(model_output)`` selects (default: its first tensor, e.g. the logits) over the full
    batch, and returns a number (e.g. a mean logit difference). ``batched``: one pass per name over the
    batch repeated for every position. Runs under ``torch.no_grad()``; call on every rank alike. Returns
    the same ``Sweep`` on every rank."""
    layout = flex.layout
    if layout.pp > 1:
        raise NotImplementedError("patching_sweep runs on one pipeline stage: the patch runs on its stage's root, "
                                  "and only the owner's stage holds the clean cache")
    names = select_names(flex, names)
    pos: List[Optional[int]] = [None] if positions is None else [int(p) for p in positions]
    scope = scope or flex.scope
    full = _Full(flex, output, scope)
    batch_dim = layout.batch_dim
    with torch.no_grad():
        clean_out, cache = flex.run_with_cache(*_as_args(clean), names_filter=names, unpack_idx=unpack_idx,
                                               scope=scope, **_as_kwargs(clean))
        clean_score = full.score(metric, full.gather(clean_out))
        corrupted_score = full.score(metric, full.gather(_call(flex, corrupted)))
        values = torch.zeros(len(names), len(pos))
        if batched:
            full.learn_rows(_local_rows(corrupted, batch_dim))
            edit_rows = full.rows if scope == "global" else [_local_rows(corrupted, batch_dim)]
            pairs, _ = _row_pairs(edit_rows, len(pos))
            _, out_rows = _row_pairs(full.rows, len(pos))
            repeated = _repeat(corrupted, len(pos), batch_dim)
        for i, name in enumerate(names):
            value = _clean_value(cache, name)
            if batched:
                out = _patched(flex, name, _Patch(name, value, pos, seq_dim, pairs, batch_dim), unpack_idx, scope,
                               repeated)
                gathered = full.gather(out)
                for j in range(len(pos)):
                    part = None if gathered is None else gathered.index_select(batch_dim, out_rows[j].to(
                        gathered.device))
                    values[i, j] = _or_nan(full.score(metric, part))
                continue
            for j, p in enumerate(pos):
                out = _patched(flex, name, _Patch(name, value, [p], seq_dim), unpack_idx, scope, corrupted)
                values[i, j] = _or_nan(full.score(metric, full.gather(out)))
    scores = full.share(torch.cat([values.flatten(), torch.tensor([_or_nan(clean_score), _or_nan(corrupted_score)])]))
    values = scores[:-2].reshape(len(names), len(pos))
    return Sweep(values, list(names), pos, float(scores[-2]), float(scores[-1]))


def _or_nan(value: Optional[float]) -> float:
    return float("nan") if value is None else value


def _as_args(inputs: Inputs) -> Tuple[Any, ...]:
    if isinstance(inputs, Mapping):
        return ()
    return inputs if isinstance(inputs, tuple) else (inputs,)


def _as_kwargs(inputs: Inputs) -> Dict[str, Any]:
    return dict(inputs) if isinstance(inputs, Mapping) else {}


def _clean_value(cache: ActivationCache, name: str) -> Optional[torch.Tensor]:
    if not cache.here:
        return None
    return cache[name]


def _patched(flex: FlexModel, name: str, patch: _Patch, unpack_idx: int, scope: Scope, inputs: Inputs) -> Any:
    """One pass of ``inputs`` with the patch on ``name`` (after the wrapper's own hooks there); what the
    patch's hook captures (under a key of its own) is dropped."""
    key = key_for(name, "patching_sweep")
    handle = flex.register(HookFunction(name, editing_function=patch, unpack_idx=unpack_idx, scope=scope), "forward",
                           store_as=key)
    try:
        return _call(flex, inputs)
    except Exception as e:
        note_on_failure(e, "patching_sweep")
        raise
    finally:
        handle.remove()
        flex.output_dict.pop(key, None)
