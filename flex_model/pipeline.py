"""Pipeline parallel: ship what non-owner stages captured to the owner's ``output_dict`` (replica scope:
to the replica's owner).

Each stage's root queues its captures during the forward; ``ship_to_owner``
(a collective over the stage roots) moves them, in stage order, as raw bytes
with a small header per tensor (name, dtype, shape), so fp32/fp16/bf16 all
travel over gloo and NCCL alike. These point-to-point sends live here, not in
``collectives``, because only shipping uses them; their tensors sit on
``collectives.comm_device``.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch
import torch.distributed as dist

from flex_model.collectives import comm_device
from flex_model.layout import ParallelLayout

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32,
          torch.int8, torch.uint8, torch.bool]


def _send_entries(entries: List[Tuple[str, torch.Tensor]], dst: int, group: dist.ProcessGroup) -> None:
    dev = comm_device(group)
    dist.send(torch.tensor([len(entries)], device=dev), dst=dst, group=group)
    for name, tensor in entries:
        name_bytes = torch.frombuffer(bytearray(name.encode()), dtype=torch.uint8)
        meta = torch.tensor([len(name_bytes), DTYPES.index(tensor.dtype), tensor.ndim, *tensor.shape])
        dist.send(torch.tensor([meta.numel()], device=dev), dst=dst, group=group)
        dist.send(meta.to(dev), dst=dst, group=group)
        dist.send(name_bytes.to(dev), dst=dst, group=group)
        dist.send(tensor.detach().contiguous().reshape(-1).view(torch.uint8).to(dev), dst=dst, group=group)


def _recv_entries(src: int, group: dist.ProcessGroup) -> List[Tuple[str, torch.Tensor]]:
    dev = comm_device(group)
    count = torch.zeros(1, dtype=torch.int64, device=dev)
    dist.recv(count, src=src, group=group)
    entries = []
    for _ in range(int(count)):
        size = torch.zeros(1, dtype=torch.int64, device=dev)
        dist.recv(size, src=src, group=group)
        meta = torch.zeros(int(size), dtype=torch.int64, device=dev)
        dist.recv(meta, src=src, group=group)
        meta = meta.cpu()
        name_len, dtype_i, ndim = (int(v) for v in meta[:3])
        shape = [int(v) for v in meta[3:3 + ndim]]
        name_bytes = torch.zeros(name_len, dtype=torch.uint8, device=dev)
        dist.recv(name_bytes, src=src, group=group)
        dtype = DTYPES[dtype_i]
        nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        raw = torch.zeros(nbytes, dtype=torch.uint8, device=dev)
        dist.recv(raw, src=src, group=group)
        entries.append((bytes(name_bytes.tolist()).decode(), raw.cpu().view(dtype).reshape(shape)))
    return entries


def ship_to_owner(layout: ParallelLayout, outbox: List[Tuple[str, torch.Tensor]],
                  output_dict: Dict[str, List[torch.Tensor]], scope: str = "global") -> None:
    """Send this stage root's ``outbox`` to the owner (in replica scope: its replica's owner, over the
    replica's stage roots), which appends every stage's entries in stage order. Call it on every rank
    of that roots group."""
    if scope == "global":
        group, owner, roots = layout.roots, layout.owner, layout.root_ranks
    else:
        group, owner, roots = layout.replica_roots, layout.replica_owner, layout.replica_root_ranks
    if layout.rank != owner:
        _send_entries(outbox, owner, group)
        return
    for src in roots:
        if src != owner:
            for name, tensor in _recv_entries(src, group):
                output_dict.setdefault(name, []).append(tensor)
