"""Every collective flex_model runs, and the device its tensors live on.

``comm_device(group)`` is the one rule for where a tensor handed to a
collective lives (NCCL: the current CUDA device; gloo: CPU). Small
agreements over a group: ``any_rank`` (did any rank flag a problem?),
``broadcast_int``, ``all_reduce_``. Pipeline shipping (``pipeline.py``) uses
point-to-point sends on ``comm_device`` tensors.

A hook firing's traffic runs over its pipeline ``Stage``'s dp × tp ranks,
through the stage's root (dp 0, tp 0):

- ``exchange``: one all-to-all carrying every rank's header (local shape,
  error status) to every rank, and its piece to the root. Input placement: each rank's local
  piece per ``Placement``; output: the full tensor on the root (on every
  rank for ``store="all"``). An error on any rank surfaces on every rank
  before anyone waits on more data. Replicated pieces are taken from tp
  rank 0 (and dp rank 0) only; ``dp_mean`` pieces are averaged.
- ``gather_to_root``: the same assembly by point-to-point sends, when the
  shapes are already known (gradients in ``ScatterEdit``'s backward).
- ``scatter_from_root``: full tensor on the root → each rank's piece (the
  inverse of the gather; replicated dims are copied to every rank).
- ``broadcast_status``: the root's verdict after running the editing
  function (ok / unchanged / failed, with the error text).
- ``ScatterEdit``: the autograd function that scatters the root's edited
  tensor. Forward: root's full ``y = edit(x_full)`` → every rank's piece of
  ``y``. Backward: gather the pieces' gradients to the root (replicated
  pieces from tp rank 0: their gradients are replicated, as in
  Megatron/DTensor; a value every dp rank holds whole gets a part of its
  gradient from each dp rank: they are averaged), back-propagate through
  the edit's graph on the root
  (trainable modules get their ``.grad`` there), scatter ``d x_full`` back as
  pieces. On one process none of this runs: the edit stays in the graph.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from flex_model.layout import Stage
from flex_model.placement import Placement, gradient_placement

MAX_DIMS = 8
MSG_INTS = 40  # 320 bytes of error text
OK, FAILED, UNCHANGED, NO_PAYLOAD = 0, 1, 2, 3


class HookFailure(RuntimeError):
    """Raised on the ranks whose hook did not fail, when another rank's did."""


# -- where tensors go, and small agreements --------------------------------------
def comm_device(group: Optional[dist.ProcessGroup] = None) -> torch.device:
    """The device of every tensor flex_model hands to a collective on ``group``: NCCL moves only
    CUDA tensors (the current device), gloo CPU tensors."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def any_rank(flag: bool, group: Optional[dist.ProcessGroup] = None) -> bool:
    """True on every rank of ``group`` if ``flag`` is True on any (an all-reduce of one int)."""
    t = torch.tensor([int(flag)], device=comm_device(group))
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return bool(t.item())


def broadcast_int(value: int, src: int, group: Optional[dist.ProcessGroup] = None) -> int:
    """Global rank ``src``'s ``value`` on every rank of ``group``."""
    t = torch.tensor([value], dtype=torch.int64, device=comm_device(group))
    dist.broadcast(t, src=src, group=group)
    return int(t.item())


def all_reduce_(tensor: torch.Tensor, group: Optional[dist.ProcessGroup] = None,
                op: dist.ReduceOp = dist.ReduceOp.SUM) -> torch.Tensor:
    """All-reduce ``tensor`` in place over ``group``, moving it to ``comm_device`` and back if needed
    (e.g. CPU statistics under NCCL)."""
    device = comm_device(group)
    moved = tensor.to(device) if tensor.device != device else tensor
    dist.all_reduce(moved, op=op, group=group)
    if moved is not tensor:
        tensor.copy_(moved)
    return tensor


def is_source(stage: Stage, index: int, placement: Placement) -> bool:
    """Whether the rank at ``index`` of ``stage`` contributes a piece of a value so placed (a
    replicated dim is taken from its rank 0 only)."""
    dp_i, tp_i = stage.coords(index)
    keep_dp = placement.dp_dim is not None or placement.dp_mean or dp_i == 0
    return keep_dp and (placement.tp_dim is not None or tp_i == 0)


# -- headers and status ---------------------------------------------------------
def _header(status: int, shape: Sequence[int], message: str, device: torch.device, nbytes: int = 0) -> torch.Tensor:
    text = message.encode("utf-8", "replace")[: MSG_INTS * 8].ljust(MSG_INTS * 8, b"\0")
    dims = list(shape)[:MAX_DIMS] + [0] * (MAX_DIMS - len(shape))
    head = torch.tensor([status, len(shape), nbytes, *dims], dtype=torch.int64)
    body = torch.frombuffer(bytearray(text), dtype=torch.int64)
    return torch.cat([head, body]).to(device)


def _parse(header: torch.Tensor) -> Tuple[int, Tuple[int, ...], str, int]:
    """``(status, shape, error text, payload bytes)`` of a header."""
    values = header.cpu()
    ndim = int(values[1])
    text = values[3 + MAX_DIMS:].numpy().tobytes().rstrip(b"\0").decode("utf-8", "replace")
    return int(values[0]), tuple(int(d) for d in values[3:3 + ndim]), text, int(values[2])


def exchange(stage: Stage, local: Optional[torch.Tensor], placement: Optional[Placement],
             error: Optional[BaseException], device: torch.device, hook_name: str, *, send: bool,
             everyone: bool, capacity: int) -> Tuple[List[Tuple[int, ...]], Optional[torch.Tensor], int]:
    """Every rank's header (shape, error status) to every rank and, with ``send``, its piece to the root
    (to every rank with ``everyone``), in one all-to-all.

    Returns ``(shapes, full, capacity)``: ``full`` is the assembled full tensor
    on the root (on every rank with ``everyone``), else None. A chunk carries
    ``capacity`` payload bytes; all ranks keep the same capacity (the largest
    piece seen so far, in multiples of 8), so a firing costs one all-to-all,
    and a second one only when a piece outgrows it. An error on any rank
    raises on every rank: the original exception where it happened,
    ``HookFailure`` elsewhere.
    """
    if error is None and len(local.shape) > MAX_DIMS:
        error = ValueError(f"hook values have at most {MAX_DIMS} dims, got {local.ndim}")
    n, me = len(stage.ranks), stage.me
    capacity = -(-capacity // 8) * 8  # chunk offsets stay aligned for any dtype
    receives = [everyone or d == 0 for d in range(n)]  # who gets the pieces
    sends = send and error is None and is_source(stage, me, placement) and any(
        receives[d] for d in range(n) if d != me)
    payload = local.detach().contiguous().reshape(-1).view(torch.uint8) if sends else None
    nbytes = payload.numel() if sends else 0
    status = FAILED if error else (OK if nbytes <= capacity else NO_PAYLOAD)
    header = _header(status, () if error else tuple(local.shape), _describe(error), device, nbytes)
    head = header.numel() * 8

    def all_to_all(head_bytes: int, cap: int, fill: bool) -> Tuple[torch.Tensor, List[int]]:
        out_sizes = [head_bytes + (cap if receives[d] and d != me else 0) for d in range(n)]
        in_sizes = [head_bytes + (cap if receives[me] and s != me else 0) for s in range(n)]
        chunks = torch.empty(sum(out_sizes), dtype=torch.uint8, device=device)  # payload padding is never read
        offset = 0
        for size in out_sizes:
            if head_bytes:
                chunks[offset:offset + head_bytes] = header.view(torch.uint8)
            if fill and nbytes and size > head_bytes:
                chunks[offset + head_bytes:offset + head_bytes + nbytes] = payload
            offset += size
        received = torch.empty(sum(in_sizes), dtype=torch.uint8, device=device)
        dist.all_to_all_single(received, chunks, in_sizes, out_sizes, group=stage.group)
        starts = [sum(in_sizes[:s]) for s in range(n)]
        return received, starts

    received, starts = all_to_all(head, capacity, status == OK)
    parsed = [_parse(received[i:i + head].view(torch.int64)) for i in starts]
    failed = [(stage.ranks[i], text) for i, (st, _, text, _) in enumerate(parsed) if st == FAILED]
    if error is not None:
        raise error
    if failed:
        raise HookFailure(f'hook "{hook_name}" failed on rank {failed[0][0]}: {failed[0][1]}')
    shapes = [shape for _, shape, _, _ in parsed]
    sizes = [size for _, _, _, size in parsed]
    if any(st == NO_PAYLOAD for st, _, _, _ in parsed):  # a piece outgrew the chunks: resend at the new size
        capacity = -(-max(sizes) // 8) * 8
        received, starts = all_to_all(0, capacity, True)
        head = 0
    if not send or not receives[me]:
        return shapes, None, capacity
    pieces = {i: received[starts[i] + head:starts[i] + head + sizes[i]].view(local.dtype).reshape(shapes[i])
              for i in range(n) if i != me and is_source(stage, i, placement)}
    pieces[me] = local.detach()
    return shapes, assemble(pieces, stage, placement), capacity


def broadcast_status(stage: Stage, status: int, error: Optional[BaseException], device: torch.device,
                     hook_name: str, flag: int = 0) -> Tuple[int, int]:
    """The root's ``(status, flag)`` on every rank; a failure raises on every rank."""
    header = _header(status, (flag,), _describe(error), device)
    dist.broadcast(header, src=stage.ranks[0], group=stage.group)
    status, (flag,), text, _ = _parse(header)
    if status == FAILED:
        if error is not None:
            raise error
        raise HookFailure(f'hook "{hook_name}" failed on rank {stage.ranks[0]}: {text}')
    return status, flag


def _describe(error: Optional[BaseException]) -> str:
    return "" if error is None else f"{type(error).__name__}: {error}"


# -- data ------------------------------------------------------------------------
def gather_to_root(stage: Stage, local: torch.Tensor, placement: Placement,
                   shapes: List[Tuple[int, ...]]) -> Optional[torch.Tensor]:
    """Pieces → the full tensor on the root (None on other ranks)."""
    sources = [i for i in range(len(stage.ranks)) if is_source(stage, i, placement)]
    if not stage.is_root:
        if stage.me in sources:
            dist.send(local.contiguous(), dst=stage.ranks[0], group=stage.group)
        return None
    pieces = {0: local}
    requests = []
    for i in sources[1:]:
        pieces[i] = torch.empty(shapes[i], dtype=local.dtype, device=local.device)
        requests.append(dist.irecv(pieces[i], src=stage.ranks[i], group=stage.group))
    for request in requests:
        request.wait()
    return assemble(pieces, stage, placement)


def assemble(pieces: dict, stage: Stage, placement: Placement) -> torch.Tensor:
    """The full tensor from the source ranks' pieces (keyed by stage index)."""
    rows = []
    for d in range(stage.dp if placement.dp_dim is not None or placement.dp_mean else 1):
        row = [pieces[d * stage.tp + t] for t in range(stage.tp if placement.tp_dim is not None else 1)]
        rows.append(torch.cat(row, placement.tp_dim) if len(row) > 1 else row[0])
    if placement.dp_mean:
        return torch.stack(rows).mean(0)
    return torch.cat(rows, placement.dp_dim) if len(rows) > 1 else rows[0]


def split_pieces(full: torch.Tensor, stage: Stage, placement: Placement,
                 shapes: List[Tuple[int, ...]]) -> List[torch.Tensor]:
    """The piece of ``full`` that each stage rank holds (views)."""
    pieces = []
    for i in range(len(stage.ranks)):
        dp_i, tp_i = stage.coords(i)
        piece = full
        if placement.dp_dim is not None:
            start = sum(shapes[d * stage.tp][placement.dp_dim] for d in range(dp_i))
            piece = piece.narrow(placement.dp_dim, start, shapes[i][placement.dp_dim])
        if placement.tp_dim is not None:
            size = shapes[i][placement.tp_dim]
            piece = piece.narrow(placement.tp_dim, tp_i * size, size)
        pieces.append(piece)
    return pieces


def scatter_from_root(stage: Stage, full: Optional[torch.Tensor], placement: Placement,
                      shapes: List[Tuple[int, ...]], like: torch.Tensor) -> torch.Tensor:
    """The full tensor on the root → this rank's piece (shaped and typed like ``like``)."""
    if not stage.is_root:
        out = torch.empty(shapes[stage.me], dtype=like.dtype, device=like.device)
        dist.recv(out, src=stage.ranks[0], group=stage.group)
        return out
    pieces = split_pieces(full, stage, placement, shapes)
    requests = [dist.isend(pieces[i].contiguous(), dst=stage.ranks[i], group=stage.group)
                for i in range(1, len(pieces))]
    for request in requests:
        request.wait()
    return pieces[0].contiguous()


# -- the autograd function -------------------------------------------------------------
@dataclass
class EditedOnRoot:
    """What a ``ScatterEdit`` needs: the stage, the placement, and on the root the edit's graph."""

    stage: Stage
    placement: Placement
    shapes: List[Tuple[int, ...]]
    leaf: Optional[torch.Tensor] = None  # root: the full input, a leaf of the edit's graph
    edited: Optional[torch.Tensor] = None  # root: edit(leaf)
    # The gathered gradient is that of the SUM of the dp ranks' losses; trainable modules in the edit get
    # it divided by this (dp, for the DDP/FSDP mean-of-losses convention); d x_full is left as it was.
    grad_scale: float = 1.0


class ScatterEdit(torch.autograd.Function):
    """Pieces of the root's edited tensor; see the module docstring for forward and backward."""

    @staticmethod
    def forward(ctx, x_local: torch.Tensor, anchor: torch.Tensor, job: EditedOnRoot) -> torch.Tensor:
        ctx.job = job
        full = job.edited.detach() if job.stage.is_root else None
        return scatter_from_root(job.stage, full, job.placement, job.shapes, x_local)

    @staticmethod
    def backward(ctx, grad_local: torch.Tensor):
        job: EditedOnRoot = ctx.job
        # A value every dp rank holds whole gets a per-rank part of its gradient from each: average them.
        grad_placement = gradient_placement(job.placement, job.stage.dp)
        grad_full = gather_to_root(job.stage, grad_local.contiguous(), grad_placement, job.shapes)
        grad_x = None
        if job.stage.is_root:
            if job.edited.requires_grad:
                torch.autograd.backward(job.edited, grad_full / job.grad_scale, retain_graph=True)
            grad_x = job.leaf.grad * job.grad_scale if job.leaf.grad is not None else torch.zeros_like(job.leaf)
            job.leaf.grad = None
        return scatter_from_root(job.stage, grad_x, job.placement, job.shapes, grad_local), None, None
