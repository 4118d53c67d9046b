"""Every collective flex_model runs, and the device its tensors live on.

``comm_device(group)`` is the one rule for where a tensor handed to a
collective lives (NCCL: the current CUDA device; gloo: CPU). Small
agreements over a group: ``any_rank`` (did any rank flag a problem?),
``broadcast_int``, ``all_reduce_``, ``union_of_names``, and ``agree`` (the
end-of-pass check that turns a failure kept on one rank into an error on
every rank). Pipeline shipping (``pipeline.py``) uses
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
from typing import List, Optional, Sequence, Tuple, Union

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


def gather_objects(obj: object, group: Optional[dist.ProcessGroup] = None) -> List[object]:
    """Every rank's picklable ``obj``, in group rank order, on every rank (one object all-gather)."""
    everyone: List[object] = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, obj, group=group)
    return everyone


def union_of_names(names: Sequence[str], group: Optional[dist.ProcessGroup] = None) -> List[str]:
    """The sorted union of every rank's ``names`` (one object all-gather), the same on every rank."""
    return sorted({n for names_of_rank in gather_objects(list(names), group) for n in names_of_rank})


def gather_status(code: int, group: Optional[dist.ProcessGroup] = None) -> List[int]:
    """Every rank's small non-negative status ``code``, in group rank order, on every rank (one all-reduce
    of a vector with one slot per rank)."""
    t = torch.zeros(dist.get_world_size(group), dtype=torch.int64, device=comm_device(group))
    t[dist.get_rank(group)] = code
    dist.all_reduce(t, group=group)
    return [int(v) for v in t.tolist()]


def is_source(stage: Stage, index: int, placement: Placement) -> bool:
    """Whether the rank at ``index`` of ``stage`` contributes a piece of a value so placed (a
    replicated dim is taken from its rank 0 only)."""
    dp_i, tp_i = stage.coords(index)
    keep_dp = placement.dp_dim is not None or placement.dp_mean or dp_i == 0
    return keep_dp and (placement.tp_dim is not None or tp_i == 0)


# -- headers and status ---------------------------------------------------------
FIXED_INTS = 8  # status, ndim, payload bytes, tp_dim + 1, dp_dim + 1, dp_mean, fingerprint (2 float64s)


@dataclass(frozen=True)
class _Head:
    """What one rank says about its piece in a firing's exchange."""

    status: int
    shape: Tuple[int, ...] = ()
    text: str = ""
    nbytes: int = 0
    placement: Tuple[int, int, int] = (0, 0, 0)  # tp_dim + 1, dp_dim + 1, dp_mean (0: None / False)
    fingerprint: Tuple[float, float] = (0.0, 0.0)  # sum and sum of squares of a piece claimed replicated


def _header(status: int, shape: Sequence[int], message: str, device: torch.device, nbytes: int = 0,
            placement: Optional[Placement] = None, fingerprint: Tuple[float, float] = (0.0, 0.0)) -> torch.Tensor:
    text = message.encode("utf-8", "replace")[: MSG_INTS * 8].ljust(MSG_INTS * 8, b"\0")
    dims = list(shape)[:MAX_DIMS] + [0] * (MAX_DIMS - len(shape))
    code = _placement_code(placement)
    fp = torch.tensor(fingerprint, dtype=torch.float64).view(torch.int64).tolist()
    head = torch.tensor([status, len(shape), nbytes, *code, *fp, *dims], dtype=torch.int64)
    body = torch.frombuffer(bytearray(text), dtype=torch.int64)
    return torch.cat([head, body]).to(device)


def _parse(header: torch.Tensor) -> _Head:
    values = header.cpu()
    ndim = int(values[1])
    dims = values[FIXED_INTS:FIXED_INTS + MAX_DIMS]
    text = values[FIXED_INTS + MAX_DIMS:].numpy().tobytes().rstrip(b"\0").decode("utf-8", "replace")
    fp = values[6:8].clone().view(torch.float64).tolist()
    return _Head(int(values[0]), tuple(int(d) for d in dims[:ndim]), text, int(values[2]),
                 tuple(int(v) for v in values[3:6]), (fp[0], fp[1]))


def _placement_code(placement: Optional[Placement]) -> Tuple[int, int, int]:
    if placement is None:
        return (0, 0, 0)
    return (0 if placement.tp_dim is None else placement.tp_dim + 1,
            0 if placement.dp_dim is None else placement.dp_dim + 1, int(placement.dp_mean))


def _replicated_over(stage: Stage, placement: Placement) -> List[str]:
    """The axes over which a piece so placed is claimed to be the same on every rank."""
    axes = []
    if stage.tp > 1 and placement.tp_dim is None:
        axes.append("tp")
    if stage.dp > 1 and placement.dp_dim is None and not placement.dp_mean:
        axes.append("dp")
    return axes


def _fingerprint(local: torch.Tensor) -> Tuple[float, float]:
    """Sum and sum of squares of an evenly strided sample (at most ~64k entries, the same positions on every
    rank): pieces that differ (a batch slice, a sequence half, a partial sum) differ almost everywhere,
    so the sample tells them apart without an fp64 copy of a large value on every firing."""
    flat = local.detach().reshape(-1)
    x = flat[::max(1, flat.numel() // 65536)].double()
    return float(x.sum()), float(x.square().sum())


def _check_consistent(stage: Stage, heads: List[_Head], placement: Placement, hook_name: str) -> None:
    """Raise, on every rank alike (each has every header), if the ranks disagree on the placement, or
    if pieces claimed to be the same on several ranks differ: a wrong full tensor would follow."""
    codes = {h.placement for h in heads}
    if len(codes) > 1:
        seen = {stage.ranks[i]: _describe_code(h.placement) for i, h in enumerate(heads)}
        raise ValueError(f'hook "{hook_name}": the ranks disagree on how the value is split ({seen}); its '
                         "local shapes are " + str({stage.ranks[i]: h.shape for i, h in enumerate(heads)}) +
                         ". Pass expected_shape= with the FULL shape (the batch over all data-parallel ranks, "
                         "split dims at their full size), the same on every rank")
    axes = _replicated_over(stage, placement)
    if not axes:
        return
    groups: dict = {}
    for i, head in enumerate(heads):
        dp_i, tp_i = stage.coords(i)
        key = (None if "dp" in axes else dp_i, None if "tp" in axes else tp_i)
        groups.setdefault(key, []).append(i)
    for members in groups.values():
        first = heads[members[0]]
        for i in members[1:]:
            if not _same(first, heads[i]):
                a, b = stage.ranks[members[0]], stage.ranks[i]
                axis = " and ".join(axes)
                raise ValueError(
                    f'hook "{hook_name}": the value {first.shape} was taken as the same on every {axis} rank '
                    f"(replicated), but ranks {a} and {b} hold different values{_shapes(first, heads[i])}: it "
                    f"is split over {axis}, which the model does not say. Pass expected_shape= with its FULL "
                    "shape (e.g. the batch over all data-parallel ranks, a sequence split by sequence "
                    "parallelism at its full length)")


def _same(a: _Head, b: _Head) -> bool:
    if a.shape != b.shape:
        return False
    (sa, qa), (sb, qb) = a.fingerprint, b.fingerprint
    scale = max(qa, qb, 1e-30)
    return abs(qa - qb) <= 1e-6 * scale and abs(sa - sb) <= 1e-6 * (scale * max(1, _numel(a.shape))) ** 0.5


def _numel(shape: Tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _shapes(a: _Head, b: _Head) -> str:
    return "" if a.shape == b.shape else f" (shapes {a.shape} and {b.shape})"


def _describe_code(code: Tuple[int, int, int]) -> str:
    tp, dp, mean = code
    parts = [f"tp dim {tp - 1}" if tp else "tp: replicated", f"dp dim {dp - 1}" if dp else
             ("dp: mean" if mean else "dp: replicated")]
    return ", ".join(parts)


def exchange(stage: Stage, local: Optional[torch.Tensor], placement: Optional[Placement],
             error: Optional[BaseException], device: torch.device, hook_name: str, *, send: bool,
             everyone: bool, capacity: Union[int, Sequence[int]]
             ) -> Tuple[List[Tuple[int, ...]], Optional[torch.Tensor], List[int]]:
    """Every rank's header (shape, error status) to every rank and, with ``send``, its piece to the root
    (to every rank with ``everyone``), in one all-to-all.

    Returns ``(shapes, full, capacity)``: ``full`` is the assembled full tensor
    on the root (on every rank with ``everyone``), else None. ``capacity`` is
    the payload bytes each rank's chunk carries, per stage index (an int: the
    same for all): every rank holds the same list — the largest piece each
    rank sent so far, in multiples of 8, read off the headers every rank
    sees — so a firing costs one all-to-all, a second one only when a piece
    outgrows its chunk, and a rank with nothing to send (a replicated piece
    taken from another rank) sends its header alone. An error on any rank
    raises on every rank: the original exception where it happened,
    ``HookFailure`` elsewhere.
    """
    if error is None and len(local.shape) > MAX_DIMS:
        error = ValueError(f"hook values have at most {MAX_DIMS} dims, got {local.ndim}")
    n, me = len(stage.ranks), stage.me
    caps = [_align(c) for c in (capacity if not isinstance(capacity, int) else [capacity] * n)]
    if len(caps) != n:
        caps = [0] * n
    receives = [everyone or d == 0 for d in range(n)]  # who gets the pieces
    sends = send and error is None and is_source(stage, me, placement) and any(
        receives[d] for d in range(n) if d != me)
    payload = local.detach().contiguous().reshape(-1).view(torch.uint8) if sends else None
    nbytes = payload.numel() if sends else 0
    status = FAILED if error else (OK if nbytes <= caps[me] else NO_PAYLOAD)
    fingerprint = _fingerprint(local) if error is None and _replicated_over(stage, placement) else (0.0, 0.0)
    header = _header(status, () if error else tuple(local.shape), _describe(error), device, nbytes,
                     placement if error is None else None, fingerprint)
    head = header.numel() * 8

    def all_to_all(head_bytes: int, caps: List[int], fill: bool) -> Tuple[torch.Tensor, List[int]]:
        # Sizes agree pairwise: what I send d is my chunk; what I get from s is s's chunk (caps is shared).
        out_sizes = [head_bytes + (caps[me] if receives[d] and d != me else 0) for d in range(n)]
        in_sizes = [head_bytes + (caps[s] if receives[me] and s != me else 0) for s in range(n)]
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
        stage.stats.count(sum(out_sizes) - out_sizes[me], sum(in_sizes) - in_sizes[me])
        starts = [sum(in_sizes[:s]) for s in range(n)]
        return received, starts

    received, starts = all_to_all(head, caps, status == OK)
    parsed = [_parse(received[i:i + head].view(torch.int64)) for i in starts]
    failed = [(stage.ranks[i], h.text) for i, h in enumerate(parsed) if h.status == FAILED]
    if error is not None:
        raise error
    if failed:
        raise HookFailure(f'hook "{hook_name}" failed on rank {failed[0][0]}: {failed[0][1]}')
    _check_consistent(stage, parsed, placement, hook_name)
    shapes = [h.shape for h in parsed]
    sizes = [h.nbytes for h in parsed]
    grown = [max(c, _align(b)) for c, b in zip(caps, sizes)]
    if any(h.status == NO_PAYLOAD for h in parsed):  # a piece outgrew its chunk: resend at the new sizes
        received, starts = all_to_all(0, grown, True)
        head = 0
    if not send or not receives[me]:
        return shapes, None, grown
    pieces = {i: received[starts[i] + head:starts[i] + head + sizes[i]].view(local.dtype).reshape(shapes[i])
              for i in range(n) if i != me and is_source(stage, i, placement)}
    pieces[me] = local.detach()
    return shapes, assemble(pieces, stage, placement), grown


def _align(nbytes: int) -> int:
    """Chunk sizes in multiples of 8 bytes, so payload offsets stay aligned for any dtype."""
    return -(-nbytes // 8) * 8


def broadcast_status(stage: Stage, status: int, error: Optional[BaseException], device: torch.device,
                     hook_name: str, flag: int = 0) -> Tuple[int, int]:
    """The root's ``(status, flag)`` on every rank; a failure raises on every rank."""
    header = _header(status, (flag,), _describe(error), device)
    dist.broadcast(header, src=stage.ranks[0], group=stage.group)
    nbytes = header.numel() * 8
    stage.stats.count(nbytes * (len(stage.ranks) - 1) if stage.is_root else 0, 0 if stage.is_root else nbytes)
    head = _parse(header)
    if head.status == FAILED:
        if error is not None:
            raise error
        raise HookFailure(f'hook "{hook_name}" failed on rank {stage.ranks[0]}: {head.text}')
    return head.status, head.shape[0]


def agree(stage: Stage, failure: Optional[Tuple[str, BaseException]], when: str) -> None:
    """The end-of-pass check: every rank of ``stage`` says whether a hook failed on it during the pass
    (``failure`` = ``(hook name, exception)``, kept instead of raising mid-pass so that the model's own
    collectives stayed paired); if any did, every rank raises — the failing rank its own exception, the
    others a ``HookFailure`` naming the rank, the hook and the error. One all-gather of small headers."""
    name, error = failure if failure is not None else ("", None)
    device = comm_device(stage.group)
    mine = _header(FAILED if error is not None else OK, (), f"{name}\0{_describe(error)}", device)
    everyone = [torch.empty_like(mine) for _ in stage.ranks]
    dist.all_gather(everyone, mine, group=stage.group)
    stage.stats.count(mine.numel() * 8, mine.numel() * 8 * (len(stage.ranks) - 1))
    if error is not None:
        raise error
    for rank, header in zip(stage.ranks, everyone):
        head = _parse(header)
        if head.status == FAILED:
            hook, _, message = head.text.partition("\0")
            raise HookFailure(f'hook "{hook}" failed on rank {rank} during the {when}: {message}')


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
            stage.stats.count(local.numel() * local.element_size(), 0)
        return None
    pieces = {0: local}
    requests = []
    for i in sources[1:]:
        pieces[i] = torch.empty(shapes[i], dtype=local.dtype, device=local.device)
        requests.append(dist.irecv(pieces[i], src=stage.ranks[i], group=stage.group))
    for request in requests:
        request.wait()
    stage.stats.count(0, sum(pieces[i].numel() * pieces[i].element_size() for i in sources[1:]))
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
        stage.stats.count(0, out.numel() * out.element_size())
        return out
    pieces = split_pieces(full, stage, placement, shapes)
    requests = [dist.isend(pieces[i].contiguous(), dst=stage.ranks[i], group=stage.group)
                for i in range(1, len(pieces))]
    for request in requests:
        request.wait()
    stage.stats.count(sum(p.numel() * p.element_size() for p in pieces[1:]), 0)
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


# == Activation dumps written in parallel (used by ``flex_model.activations``) ==================================
# Each rank of a replica writes its own rows: a value every tensor-parallel rank holds whole needs no
# communication (rank k keeps rows part k), a value split over tp on another dim is turned into a split over
# rows by one all-to-all (the bytes of a gather, spread evenly over the ranks).
_REDIST_INTS = 2 + MAX_DIMS + 3  # ndim, itemsize, shape (MAX_DIMS), tp_dim, row_dim, dtype code


def row_parts(rows: int, parts: int) -> List[Tuple[int, int]]:
    """``[start, stop)`` of each of ``parts`` near-equal consecutive parts of ``rows`` rows (the first
    ``rows % parts`` parts one row longer), as ``torch.tensor_split`` cuts them."""
    base, extra = divmod(rows, parts)
    bounds = [0]
    for k in range(parts):
        bounds.append(bounds[-1] + base + (1 if k < extra else 0))
    return [(bounds[k], bounds[k + 1]) for k in range(parts)]


def redistribute_to_rows(stage: Optional[Stage], local: torch.Tensor, tp_dim: Optional[int],
                         row_dim: int) -> torch.Tensor:
    """This rank's part of the rows of a value split over ``stage``'s tensor-parallel ranks, at full width.

    ``stage`` is one replica's tp ranks (``layout.replica``: dp 1, ranks in tp order; None for one rank).
    The full value has ``local.shape[row_dim]`` rows (every rank holds all of them), cut by ``row_parts``
    into one near-equal part per rank; rank k gets part k. ``tp_dim`` None: ``local`` is the same on every
    rank (replicated) and rank k keeps ``local.narrow(row_dim, part k)``, with no communication. Otherwise
    ``local`` is this rank's slice along ``tp_dim`` and one all-to-all sends rank k the rows of part k of
    every slice, which it concatenates along ``tp_dim`` in tp order: each rank sends and receives
    (tp - 1) / tp of its local bytes. Before it, a small all-gather of every rank's shape and dtype (so the
    ranks agree on the sizes; disagreeing ranks raise a ValueError on every rank of the stage, before any
    payload moves). The split case works on ``comm_device`` tensors and returns one; both collectives are
    counted in ``stage.stats``."""
    if stage is None or len(stage.ranks) == 1:
        return local
    n = len(stage.ranks)
    if tp_dim is not None and tp_dim % local.ndim == row_dim % local.ndim:
        raise ValueError(f"a value split over tensor parallel along its row dim {row_dim} is already split by "
                         "rows; it needs no redistribution")
    row_dim %= local.ndim
    rows = local.shape[row_dim]
    parts = row_parts(rows, n)
    if tp_dim is None:
        lo, hi = parts[stage.me]
        return local.narrow(row_dim, lo, hi - lo)
    tp_dim %= local.ndim
    if local.ndim > MAX_DIMS:
        raise ValueError(f"values have at most {MAX_DIMS} dims here, got {local.ndim}")
    device = comm_device(stage.group)
    x = local.detach().to(device).contiguous()
    dtype_code = _REDIST_DTYPES.index(x.dtype) if x.dtype in _REDIST_DTYPES else -1
    mine = torch.tensor([x.ndim, x.element_size(), *x.shape, *[0] * (MAX_DIMS - x.ndim), tp_dim, row_dim,
                         dtype_code], dtype=torch.int64, device=device)
    heads = [torch.empty_like(mine) for _ in range(n)]
    dist.all_gather(heads, mine, group=stage.group)
    head_bytes = mine.numel() * 8
    stage.stats.count(head_bytes * (n - 1), head_bytes * (n - 1))
    shapes = []
    for head in heads:
        values = [int(v) for v in head.cpu().tolist()]
        ndim, itemsize = values[0], values[1]
        shape = tuple(values[2:2 + ndim])
        same_elsewhere = ndim == x.ndim and all(a == b for d, (a, b) in enumerate(zip(shape, x.shape)) if d != tp_dim)
        if values[2 + MAX_DIMS:] != [tp_dim, row_dim, dtype_code] or itemsize != x.element_size() \
                or not same_elsewhere:
            described = {stage.ranks[i]: tuple(int(v) for v in h.cpu().tolist()[2:2 + int(h[0])])
                         for i, h in enumerate(heads)}
            raise ValueError(f"the tensor-parallel ranks {list(stage.ranks)} disagree on the value to "
                             f"redistribute by rows (local shapes {described}, split dims / dtypes differ or "
                             f"only dim {tp_dim} may differ)")
        shapes.append(shape)
    send = [x.narrow(row_dim, a, b - a).contiguous().reshape(-1).view(torch.uint8) for a, b in parts]
    lo, hi = parts[stage.me]
    in_shapes = [tuple(hi - lo if d == row_dim else s for d, s in enumerate(shape)) for shape in shapes]
    in_sizes = [_numel(s) * x.element_size() for s in in_shapes]
    out_sizes = [t.numel() for t in send]
    received = torch.empty(sum(in_sizes), dtype=torch.uint8, device=device)
    dist.all_to_all_single(received, torch.cat(send), in_sizes, out_sizes, group=stage.group)
    me = stage.me
    stage.stats.count(sum(out_sizes) - out_sizes[me], sum(in_sizes) - in_sizes[me])
    pieces, offset = [], 0
    for shape, size in zip(in_shapes, in_sizes):
        pieces.append(received[offset:offset + size].view(x.dtype).reshape(shape))
        offset += size
    return torch.cat(pieces, tp_dim)


_REDIST_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32,
                  torch.int16, torch.int8, torch.uint8, torch.bool)
