"""Activation datasets on disk: dump hooked activations as safetensors shards, read them back lazily.

``dump_activations`` runs a data loader through a (possibly sharded)
``FlexModel`` with capture hooks on the chosen modules. Every rank runs every
batch (the hooks are collectives); only the owner (the rank holding
``output_dict``) writes. Every ``batches_per_shard`` batches the captures are
concatenated along the layout's batch dim, written as one safetensors shard
and dropped from memory, so memory is bounded by one shard.

On disk, ``out_dir`` holds ``shard-00000.safetensors``, ... and
``index.json`` (per name: dtype and shape; per shard: file, sha256, bytes,
batch and row ranges). Shards and the index are written atomically (temp
file, fsync, ``os.replace``); the index is rewritten after each complete
shard, so a killed run leaves complete shards and an index listing only
them. A rerun with the same ``out_dir`` skips the batches already on disk
(every rank skips the same ones: the owner broadcasts the count) and goes on.

``ActivationReader`` reads rows ``[start, stop)`` of one name, opening only
the shards that hold them (``safetensors.safe_open``); each shard's size and
sha256 are checked the first time it is read, or all at once by ``verify()``.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from flex_model.collectives import broadcast_int
from flex_model.firing import HOOK_KINDS
from flex_model.flex_model import FlexModel
from flex_model.hook_function import HookFunction

INDEX = "index.json"
VERSION = 1
_DTYPES = {str(t): t for t in (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64,
                               torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool)}


class ShardCorrupted(ValueError):
    """A shard on disk does not match the size or sha256 its index recorded."""


def _default_run(flex: FlexModel, batch: Any) -> Any:
    return flex(**batch) if isinstance(batch, Mapping) else flex(batch)


def dump_activations(flex: FlexModel, loader: Iterable, out_dir: Union[str, os.PathLike], names: Sequence[str], *,
                     batches_per_shard: int = 16, hook_type: str = "forward", unpack_idx: int = 0,
                     run: Callable[[FlexModel, Any], Any] = _default_run, progress: bool = True,
                     ) -> Optional["ActivationReader"]:
    """Run every batch of ``loader`` through ``flex`` and write the activations of ``names`` to ``out_dir``.

    Call it on every rank, each with its own loader (its data-parallel slice)
    yielding the same number of batches. ``names`` are module names as in the
    unwrapped model; a capture hook of ``hook_type`` is registered on each for
    the duration of the call (each must fire once per batch). ``run(flex,
    batch)`` runs one batch (default: ``flex(**batch)`` for a mapping, else
    ``flex(batch)``), under ``torch.no_grad()`` for forward hook types; for
    gradient hook types (``"full_backward"``, ``"full_backward_pre"``) ``run``
    must also run the backward. Entries of ``flex.output_dict`` under
    ``names`` are dropped before each batch. Returns an
    ``ActivationReader`` on the owner rank, None elsewhere.
    """
    if not names or isinstance(names, str):
        raise TypeError(f"names must be a non-empty list of module names, got {names!r}")
    if batches_per_shard < 1:
        raise ValueError(f"batches_per_shard must be >= 1, got {batches_per_shard}")
    if hook_type not in HOOK_KINDS or hook_type == "tensor":
        raise ValueError(f"hook_type must be one of {sorted(set(HOOK_KINDS) - {'tensor'})}, got {hook_type!r}")
    if flex.store == "none":
        raise ValueError('this FlexModel was wrapped with store="none", which keeps no activations; '
                         'wrap it with store="root" (the default) to dump them')
    layout, out = flex.layout, Path(out_dir)
    is_owner = layout.rank == layout.owner
    source = {"hook_type": hook_type, "unpack_idx": unpack_idx, "batch_dim": layout.batch_dim}
    writer = _ShardWriter(out, list(names), source) if is_owner else None
    done, error = 0, None
    if writer is not None:
        try:
            done = writer.resume()
        except Exception as e:
            done, error = -1, e
    done = _from_owner(flex, done)  # every rank skips the same batches
    if error is not None:
        raise error
    if done < 0:
        raise RuntimeError(f"the owner rank {layout.owner} could not resume the dump in {out}; see its traceback")
    hooks = [HookFunction(n, unpack_idx=unpack_idx) for n in names]
    handles = [flex.register(h, hook_type) for h in hooks]
    try:
        pending: Dict[str, List[torch.Tensor]] = {n: [] for n in names}
        first, problem = done, None
        bar = tqdm(loader, desc=f"dump → {out}", unit="batch", disable=not (is_owner and progress))
        index = -1
        for index, batch in enumerate(bar):
            if index < done:
                continue
            for n in names:  # entries of earlier runs would be taken for this batch's firings
                flex.output_dict.pop(n, None)
            with torch.set_grad_enabled(HOOK_KINDS[hook_type].is_grad and torch.is_grad_enabled()):
                run(flex, batch)
            if layout.pp > 1:
                flex.gather_pipeline_outputs()
            for n in names:
                fired = flex.output_dict.pop(n, [])
                if writer is not None and len(fired) != 1 and problem is None:  # raised on all ranks at the flush
                    problem = ValueError(f'module "{n}" fired {len(fired)} times in batch {index}; dump needs '
                                         "exactly one capture per batch: name a module that runs once per forward")
                pending[n].extend(fired[:1])
            if index + 1 - first == batches_per_shard:
                _flush(flex, writer, pending, first, index + 1, problem)
                first = index + 1
        if index + 1 > first:
            _flush(flex, writer, pending, first, index + 1, problem)
    finally:
        for h in handles:
            h.remove()
    return ActivationReader(out) if writer is not None else None


def _from_owner(flex: FlexModel, value: int) -> int:
    """The owner's ``value`` on every rank of the wrapped group."""
    if flex.layout.is_single:
        return value
    return broadcast_int(value, flex.layout.owner, flex.process_group)


def _flush(flex: FlexModel, writer: Optional["_ShardWriter"], pending: Dict[str, List[torch.Tensor]],
           start: int, stop: int, error: Optional[Exception]) -> None:
    """Write one shard on the owner; every rank learns whether it worked (so none waits forever)."""
    if writer is not None and error is None:
        try:
            writer.write(pending, start, stop)
        except Exception as e:
            error = e
        for chunks in pending.values():
            chunks.clear()
    failed = _from_owner(flex, int(error is not None))
    if error is not None:
        raise error
    if failed:
        raise RuntimeError(f"the owner rank {flex.layout.owner} failed to write the shard of batches "
                           f"[{start}, {stop}); see its traceback")


class _ShardWriter:
    """The owner's side: the index, resuming from it, writing shards atomically."""

    def __init__(self, out: Path, names: List[str], source: Dict[str, Any]) -> None:
        self.out, self.names, self.source, self.batch_dim = out, names, source, source["batch_dim"]
        self.index: Dict[str, Any] = {"version": VERSION, **source, "names": {}, "shards": []}

    def resume(self) -> int:
        """Load an existing index (checking it is the same dump); return the batches it holds."""
        self.out.mkdir(parents=True, exist_ok=True)
        for stale in self.out.glob("*.tmp"):
            stale.unlink()
        if not (self.out / INDEX).exists():
            return 0
        old = json.loads((self.out / INDEX).read_text())
        theirs = {k: old.get(k) for k in self.source}
        if sorted(old["names"]) != sorted(self.names) or theirs != self.source:
            raise ValueError(f"{self.out} holds a dump of {sorted(old['names'])} with {theirs}; this call dumps "
                             f"{sorted(self.names)} with {self.source}. Pass the same names, hook_type, unpack_idx "
                             "and batch dim to resume it, or another out_dir")
        self.index = old
        ActivationReader(self.out).verify()
        return old["shards"][-1]["batches"][1] if old["shards"] else 0

    def write(self, pending: Dict[str, List[torch.Tensor]], start: int, stop: int) -> None:
        tensors, rows = {}, None
        for n in self.names:
            try:
                tensors[n] = torch.cat([t.cpu() for t in pending[n]], self.batch_dim).contiguous()
                pending[n].clear()  # keep one copy of the shard in memory
            except RuntimeError as e:
                raise ValueError(f'the captures of "{n}" in batches [{start}, {stop}) have shapes '
                                 f"{[tuple(t.shape) for t in pending[n]]}; they can only be stacked along the "
                                 f"batch dim {self.batch_dim}, so pad the other dims to one size") from e
            meta = self.index["names"].setdefault(n, {"dtype": str(tensors[n].dtype), "shape": None})
            full = list(tensors[n].shape)
            if meta["shape"] is not None:
                old = meta["shape"]
                if meta["dtype"] != str(tensors[n].dtype) or len(old) != len(full) or any(
                        a != b for i, (a, b) in enumerate(zip(old, full)) if i != self.batch_dim):
                    raise ValueError(f'"{n}" was {meta["dtype"]} {old} in earlier shards but is '
                                     f"{tensors[n].dtype} {full} in batches [{start}, {stop}); keep them alike")
                full[self.batch_dim] += old[self.batch_dim]
            meta["shape"] = full
            rows = tensors[n].shape[self.batch_dim]
        shards = self.index["shards"]
        first_row = shards[-1]["rows"][1] if shards else 0
        name = f"shard-{len(shards):05d}.safetensors"
        digest, size = _atomic_write(self.out / name, lambda tmp: save_file(tensors, str(tmp)))
        shards.append({"file": name, "sha256": digest, "bytes": size,
                       "batches": [start, stop], "rows": [first_row, first_row + rows]})
        text = json.dumps(self.index, indent=1)
        _atomic_write(self.out / INDEX, lambda tmp: tmp.write_text(text))


def _atomic_write(path: Path, write: Callable[[Path], Any]) -> Tuple[str, int]:
    """``write(tmp)``, fsync it, rename it to ``path``; return the file's sha256 and size."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    digest = _sha256(tmp)
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return digest, path.stat().st_size


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class ActivationReader:
    """Lazy reader of a dump: ``read(name, start, stop)`` opens only the shards holding those rows.

    With ``verify_on_read`` (default) the first read touching a shard checks
    its size and sha256, which reads that file once; with False only its size
    is checked and only the requested rows of one tensor are read (call
    ``verify()`` to check everything at once).
    """

    def __init__(self, path: Union[str, os.PathLike], verify_on_read: bool = True) -> None:
        self.path = Path(path)
        if not (self.path / INDEX).exists():
            raise FileNotFoundError(f"{self.path} has no {INDEX}; is it the out_dir of dump_activations?")
        self.index = json.loads((self.path / INDEX).read_text())
        self.batch_dim: int = self.index["batch_dim"]
        self._checked: set = set()
        self.verify_on_read = verify_on_read

    @property
    def names(self) -> List[str]:
        return list(self.index["names"])

    def shape(self, name: str) -> torch.Size:
        return torch.Size(self._meta(name)["shape"])

    def dtype(self, name: str) -> torch.dtype:
        return _DTYPES[self._meta(name)["dtype"]]

    def __len__(self) -> int:
        """Rows (along the batch dim) in the dump."""
        shards = self.index["shards"]
        return shards[-1]["rows"][1] if shards else 0

    def read(self, name: str, start: int = 0, stop: Optional[int] = None) -> torch.Tensor:
        """Rows ``[start, stop)`` of ``name`` along the batch dim (negative indices count from the end)."""
        self._meta(name)
        n = len(self)
        start, stop = (start + n if start < 0 else start), (n if stop is None else stop + n if stop < 0 else stop)
        if not 0 <= start <= stop <= n:
            raise IndexError(f"rows [{start}, {stop}) are out of range: the dump of {name!r} has {n} rows")
        pieces = []
        for shard in self.index["shards"]:
            lo, hi = max(start, shard["rows"][0]), min(stop, shard["rows"][1])
            if lo >= hi:
                continue
            self._check(shard, hash_it=self.verify_on_read)
            with safe_open(str(self.path / shard["file"]), framework="pt") as f:
                rows = (slice(None),) * self.batch_dim + (slice(lo - shard["rows"][0], hi - shard["rows"][0]),)
                pieces.append(f.get_slice(name)[rows])
        if not pieces:
            shape = list(self.shape(name))
            shape[self.batch_dim] = 0
            return torch.empty(shape, dtype=self.dtype(name))
        return torch.cat(pieces, self.batch_dim)

    def verify(self) -> None:
        """Check every shard's size and sha256 against the index; raise ``ShardCorrupted`` on the first bad one."""
        for shard in self.index["shards"]:
            self._check(shard, force=True)

    def _check(self, shard: Dict[str, Any], force: bool = False, hash_it: bool = True) -> None:
        if shard["file"] in self._checked and not force:
            return
        path = self.path / shard["file"]
        fix = f"delete {self.path} and dump again (or restore the file)"
        if not path.exists():
            raise ShardCorrupted(f"{path} is missing but {INDEX} lists it; {fix}")
        size = path.stat().st_size
        if size != shard["bytes"]:
            raise ShardCorrupted(f"{path} has {size} bytes but {INDEX} recorded {shard['bytes']}: it is truncated "
                                 f"or partial; {fix}")
        if not hash_it:
            return
        digest = _sha256(path)
        if digest != shard["sha256"]:
            raise ShardCorrupted(f"{path} fails its sha256 check (index {shard['sha256'][:12]}…, file "
                                 f"{digest[:12]}…): its bytes changed since it was written; {fix}")
        self._checked.add(shard["file"])

    def _meta(self, name: str) -> Dict[str, Any]:
        if name not in self.index["names"]:
            raise KeyError(f"{name!r} is not in this dump; it holds {self.names}")
        return self.index["names"][name]
