"""Activation datasets on disk: dump hooked activations as safetensors shards, read them back lazily.

``dump_activations`` runs a data loader through a (possibly sharded)
``FlexModel`` with capture hooks on the chosen modules. Every rank runs every
batch (the hooks are collectives); only the owner (the rank holding
``output_dict``) writes. Every ``batches_per_shard`` batches the captures are
concatenated along the layout's batch dim, written as one safetensors shard
and dropped from memory, so memory is bounded by one shard.

On disk, ``out_dir`` holds ``shard-00000.safetensors``, ... and
``index.json`` (what wrote it: hook type, unpack_idx, batch dim, the
layout and a sha256 of the model's weights; per name: dtype and shape; per
shard: file, sha256, bytes, batch and row ranges). Shards and the index are
written atomically (temp file, fsync, ``os.replace``); the index is
rewritten after each complete shard, so a killed run leaves complete shards
and an index listing only them. While a dump runs, the owner holds
``out_dir/.lock``. A rerun with the same ``out_dir`` checks that the same
model (weights hashed on every rank, from its own shards), layout and hooks
wrote it, then skips the batches already on disk (every rank skips the same
ones: the owner broadcasts the count) and goes on. Every refusal is decided
on the owner and raised on every rank.

``ActivationReader`` reads rows ``[start, stop)`` of one name, opening only
the shards that hold them (``safetensors.safe_open``); each shard's size and
sha256 are checked the first time it is read, or all at once by ``verify()``.
"""
from __future__ import annotations

import ctypes
import hashlib
import json
import os
import socket
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from flex_model.collectives import all_reduce_, broadcast_int
from flex_model.firing import HOOK_KINDS
from flex_model.flex_model import FlexModel
from flex_model.hook_function import HookFunction

INDEX = "index.json"
LOCK = ".lock"
VERSION = 2  # 2: the index records the model (weights sha256, layout); 1 did not (still readable)
_FIX = "pass another out_dir, or delete it to start over"
_DTYPES = {str(t): t for t in (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64,
                               torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool)}


class ShardCorrupted(ValueError):
    """A shard on disk does not match the size or sha256 its index recorded."""


class DumpMismatch(ValueError):
    """A resume whose model, layout or hooks differ from those that wrote the dump."""


class DumpLocked(RuntimeError):
    """Another process is writing to the same ``out_dir`` (its ``.lock`` names it)."""


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

    A resume (an ``out_dir`` with an index) is refused on every rank, the
    dump left as it was, when the model's weights, the layout, the names,
    hook type, unpack_idx or batch dim differ from those that wrote it
    (``DumpMismatch``), when another process holds ``out_dir/.lock``
    (``DumpLocked``), when a shard is corrupted (``ShardCorrupted``), when
    the loader yields fewer batches than are on disk, and, after the first
    batch it runs, when a capture's dtype or shape differs from the index's.
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
    model = _model_record(flex)  # every rank hashes its own shards (a collective)
    writer = _ShardWriter(out, list(names), source, model) if is_owner else None
    handles = []
    try:
        done, error = 0, None
        if writer is not None:
            try:
                done = writer.open()
            except Exception as e:
                error = e
        _raise_everywhere(flex, error, f"refused to write to {out}")
        done = _from_owner(flex, done)  # every rank skips the same batches
        handles = [flex.register(HookFunction(n, unpack_idx=unpack_idx), hook_type) for n in names]
        pending: Dict[str, List[torch.Tensor]] = {n: [] for n in names}
        bar = tqdm(loader, desc=f"dump → {out}", unit="batch", disable=not (is_owner and progress))
        batches = iter(bar)
        skipped = sum(1 for _ in zip(range(done), batches))  # drawn from the loader, not run
        if done:
            _check_loader_length(flex, out, done, skipped)
        first = stop = done
        problem: Optional[Exception] = None
        for index, batch in enumerate(batches, start=done):
            for n in names:  # entries of earlier runs would be taken for this batch's firings
                flex.output_dict.pop(n, None)
            with torch.set_grad_enabled(HOOK_KINDS[hook_type].is_grad and torch.is_grad_enabled()):
                run(flex, batch)
            if layout.pp > 1:
                flex.gather_pipeline_outputs()
            for n in names:
                fired = flex.output_dict.pop(n, [])
                if writer is not None and problem is None:
                    problem = writer.check(n, fired, index)
                pending[n].extend(fired[:1])
            stop = index + 1
            if index == done:  # a wrong module or a resume of another run: said after one batch, not one shard
                _raise_everywhere(flex, problem, f"stopped the dump in {out} after batch {index}")
            if stop - first == batches_per_shard:
                _flush(flex, writer, pending, first, stop, problem)
                first = stop
        if stop > first:
            _flush(flex, writer, pending, first, stop, problem)
    finally:
        for h in handles:
            h.remove()
        if writer is not None:
            writer.close()
    return ActivationReader(out) if writer is not None else None


def _from_owner(flex: FlexModel, value: int) -> int:
    """The owner's ``value`` on every rank of the wrapped group."""
    if flex.layout.is_single:
        return value
    return broadcast_int(value, flex.layout.owner, flex.process_group)


# -- small agreements built on collectives.all_reduce_ / broadcast_int (no collective of their own) -------------
def _my_row(flex: FlexModel) -> int:
    return flex.layout.ranks.index(flex.layout.rank)


def _gather_bytes(flex: FlexModel, mine: bytes) -> List[bytes]:
    """Every rank's ``mine`` (the same length on every rank), in ``layout.ranks`` order, on every rank.

    An all-gather written as ``collectives.all_reduce_`` (SUM) of a table of
    zeros in which each rank fills only its own row.
    """
    table = torch.zeros(flex.layout.world_size, len(mine), dtype=torch.int64)
    table[_my_row(flex)] = torch.tensor(list(mine), dtype=torch.int64)
    all_reduce_(table, flex.process_group)
    return [bytes(row) for row in table.tolist()]


def _text_from_owner(flex: FlexModel, text: str) -> str:
    """The owner's ``text`` on every rank: its length by ``broadcast_int``, then its bytes by an
    ``all_reduce_`` (SUM) to which only the owner adds anything."""
    is_owner = flex.layout.rank == flex.layout.owner
    data = text.encode() if is_owner else b""
    length = _from_owner(flex, len(data))
    row = torch.zeros(length, dtype=torch.int64)
    if is_owner:
        row[:] = torch.tensor(list(data), dtype=torch.int64)
    all_reduce_(row, flex.process_group)
    return bytes(row.tolist()).decode(errors="replace")


# the owner's error is raised on the other ranks as the first of these it is an instance of (else RuntimeError)
_KINDS: Tuple[type, ...] = (DumpMismatch, DumpLocked, ShardCorrupted, ValueError, RuntimeError)


def _raise_everywhere(flex: FlexModel, error: Optional[BaseException], doing: str) -> None:
    """After a step only the owner ran: if it failed, raise ``error`` there and an error of the same kind, with
    its message, on every other rank (so none waits forever in the next collective)."""
    layout = flex.layout
    if layout.is_single:
        if error is not None:
            raise error
        return
    is_owner = layout.rank == layout.owner
    kind = 0
    if is_owner and error is not None:
        kind = 1 + next((i for i, k in enumerate(_KINDS) if isinstance(error, k)), len(_KINDS) - 1)
    kind = _from_owner(flex, kind)
    if not kind:
        return
    text = _text_from_owner(flex, f"{type(error).__name__}: {error}" if is_owner else "")
    if is_owner:
        raise error  # type: ignore[misc]
    raise _KINDS[kind - 1](f"the owner rank {layout.owner} {doing}: {text}")


def _check_loader_length(flex: FlexModel, out: Path, done: int, drawn: int) -> None:
    """Every rank raises if any rank's loader ran out before the ``done`` batches already on disk."""
    if not flex.layout.is_single:
        fewest = torch.tensor([drawn], dtype=torch.int64)
        drawn = int(all_reduce_(fewest, flex.process_group, op=dist.ReduceOp.MIN).item())
    if drawn < done:
        raise ValueError(f"{out} already holds {done} batches, but the loader gave only {drawn}: a resume needs "
                         f"the loader that wrote them (the same batches in the same order, then more); pass it, "
                         f"or another out_dir, or delete {out} to start over")


# -- what wrote a dump -------------------------------------------------------------------------------------------
def _local_digest(module: torch.nn.Module) -> bytes:
    """sha256 of the bytes of this rank's parameters as it holds them, in ``named_parameters`` order: local
    shards (a DTensor's ``to_local()``; FSDP1's flat parameters as they are), moved to CPU one at a time."""
    digest = hashlib.sha256()
    for _, p in module.named_parameters():
        t = p.detach()
        if hasattr(t, "to_local"):  # DTensor (FSDP2, tensor parallel): this rank's shard
            t = t.to_local()
        if t.is_meta:
            digest.update(f"meta {t.dtype} {tuple(t.shape)}".encode())
            continue
        if t.layout != torch.strided:
            t = t.to_dense()
        t = t.contiguous().cpu()
        if t.numel():
            digest.update(memoryview((ctypes.c_char * t.nbytes).from_address(t.data_ptr())))
    return digest.digest()


def _model_record(flex: FlexModel) -> Dict[str, Any]:
    """The index's record of the model: each rank's digest of its own shards (every rank hashes; the
    digests are gathered), their combined sha256, and the layout."""
    mine = _local_digest(flex.module)
    per_rank = [mine] if flex.layout.is_single else _gather_bytes(flex, mine)
    layout = flex.layout
    return {"sha256": hashlib.sha256(b"".join(per_rank)).hexdigest(),
            "rank_sha256": [d.hex() for d in per_rank],
            "layout": {"dp": layout.dp, "pp": layout.pp, "tp": layout.tp}}


def _describe_layout(lay: Dict[str, int]) -> str:
    return f"dp={lay['dp']} pp={lay['pp']} tp={lay['tp']}"


def _load_index(path: Path) -> Dict[str, Any]:
    """``path`` (an ``index.json``) parsed, or a ValueError naming it."""
    fix = f"restore it from a backup, or delete {path.parent} to start over"
    try:
        index = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}): it is truncated or was edited; {fix}") from None
    if not isinstance(index, dict) or not isinstance(index.get("names"), dict) \
            or not isinstance(index.get("shards"), list) or "batch_dim" not in index:
        raise ValueError(f"{path} is not a dump index (it needs names, shards and batch_dim); {fix}")
    return index


# -- the lock on out_dir -------------------------------------------------------------------------------------------
def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _read_lock(path: Path) -> Optional[Dict[str, Any]]:
    try:
        holder = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def _acquire_lock(path: Path) -> str:
    """Create ``path`` atomically (O_CREAT | O_EXCL) holding this pid and host; return its token.

    A lock whose pid no longer runs on this host is stale: it is moved aside (a rename, which only one taker
    wins) and taken over. Any other holder, or an unreadable lock, is refused with ``DumpLocked``.
    """
    token = uuid.uuid4().hex
    text = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "token": token})
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _read_lock(path)
            stale = (holder is not None and holder.get("host") == socket.gethostname()
                     and isinstance(holder.get("pid"), int) and not _pid_alive(holder["pid"]))
            if not stale:
                who = (f"process {holder.get('pid')} on host {holder.get('host')}" if holder is not None
                       else "a process that left an unreadable lock")
                raise DumpLocked(f"{path.parent} is being written by another dump_activations ({who}, per "
                                 f"{path}); two writers would mix their shards. Wait for it to finish, or, if "
                                 f"that process is gone, delete {path}") from None
            aside = path.with_name(f"{LOCK}.stale-{token}")
            try:
                os.rename(path, aside)
            except FileNotFoundError:  # another taker moved it first: try again
                continue
            if _read_lock(aside) != holder:  # we moved a fresh lock someone else had just taken: put it back
                try:
                    os.link(aside, path)
                except FileExistsError:  # and a third process took it since: it holds it now
                    pass
                finally:
                    aside.unlink()
                continue
            aside.unlink()
            continue
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        return token
    raise DumpLocked(f"could not take {path}: other processes keep taking it; if none is writing to "
                     f"{path.parent}, delete {path}")


def _release_lock(path: Path, token: str) -> None:
    holder = _read_lock(path)
    if holder is not None and holder.get("token") == token:
        path.unlink()


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
    _raise_everywhere(flex, error, f"failed to write the shard of batches [{start}, {stop})")


class _ShardWriter:
    """The owner's side: the lock, the index, resuming from it, checking captures, writing shards atomically."""

    def __init__(self, out: Path, names: List[str], source: Dict[str, Any], model: Dict[str, Any]) -> None:
        self.out, self.names, self.source, self.batch_dim = out, names, source, source["batch_dim"]
        self.model = model
        self.index: Dict[str, Any] = {"version": VERSION, **source, "model": model, "names": {}, "shards": []}
        self.seen: Dict[str, Tuple[str, List[int]]] = {}  # per name: dtype and shape of this run's first capture
        self.on_disk: Dict[str, Tuple[str, List[int]]] = {}  # per name: dtype and shape in the resumed index
        self.lock_token: Optional[str] = None

    def open(self) -> int:
        """Take the lock; load an existing index, checking the same model and hooks wrote it; return the
        batches it holds. A refusal leaves ``out_dir`` as it was (the lock is released by ``close``)."""
        out = self.out
        if out.is_symlink() and not out.exists():
            raise ValueError(f"out_dir {out} is a symlink to {os.readlink(out)}, which does not exist: create "
                             f"that directory, or pass another out_dir")
        if out.exists() and not out.is_dir():
            raise ValueError(f"out_dir {out} exists and is not a directory; pass another out_dir")
        out.mkdir(parents=True, exist_ok=True)
        self.lock_token = _acquire_lock(out / LOCK)
        done = 0
        if (out / INDEX).exists():
            old = _load_index(out / INDEX)
            self._check_same(old)
            ActivationReader(out).verify()
            self.index = old
            self.on_disk = {n: (m["dtype"], list(m["shape"])) for n, m in old["names"].items()}
            done = old["shards"][-1]["batches"][1] if old["shards"] else 0
        for stale in out.glob("*.tmp"):  # a write killed half-way; not listed by the index
            stale.unlink()
        return done

    def close(self) -> None:
        if self.lock_token is not None:
            _release_lock(self.out / LOCK, self.lock_token)
            self.lock_token = None

    def _check_same(self, old: Dict[str, Any]) -> None:
        """Raise ``DumpMismatch`` unless ``old`` (the index on disk) was written by these hooks, this layout
        and these weights."""
        theirs = {k: old.get(k) for k in self.source}
        if sorted(old["names"]) != sorted(self.names) or theirs != self.source:
            raise DumpMismatch(f"{self.out} holds a dump of {sorted(old['names'])} with {theirs}; this call dumps "
                               f"{sorted(self.names)} with {self.source}. Pass the same names, hook_type, "
                               f"unpack_idx and batch dim to resume it, or {_FIX}")
        model = old.get("model")
        if not isinstance(model, dict) or "sha256" not in model or "layout" not in model:
            raise DumpMismatch(f"{self.out} was written by an older flex_model (index version "
                               f"{old.get('version')}) that recorded no checksum of the model's weights, so a "
                               f"resume cannot tell whether this model wrote it; {_FIX}")
        if model["layout"] != self.model["layout"]:
            raise DumpMismatch(f"{self.out} was written by a model laid out as {_describe_layout(model['layout'])};"
                               f" this one is {_describe_layout(self.model['layout'])}. Resume with the same "
                               f"layout, or {_FIX}")
        if model["sha256"] != self.model["sha256"]:
            ranks = [r for r, (a, b) in enumerate(zip(model.get("rank_sha256", []), self.model["rank_sha256"]))
                     if a != b]
            many = len(self.model["rank_sha256"]) > 1
            where = f"; the shards of rank {', '.join(map(str, ranks))} differ" if ranks and many else ""
            raise DumpMismatch(f"the model's weights differ from those that wrote {self.out} (sha256 "
                               f"{self.model['sha256'][:12]}… now vs {model['sha256'][:12]}… in its index{where})"
                               f": resume with the model that wrote it, or {_FIX}")

    def check(self, name: str, fired: List[torch.Tensor], index: int) -> Optional[Exception]:
        """The problem with batch ``index``'s captures of ``name``, if any: not exactly one, or a dtype or
        shape (but for the batch dim) other than the index's or this run's first capture's."""
        if len(fired) != 1:
            return ValueError(f'module "{name}" fired {len(fired)} times in batch {index}; dump needs exactly '
                              "one capture per batch: name a module that runs once per forward")
        t = fired[0]
        dtype, shape = str(t.dtype), list(t.shape)
        if name in self.on_disk:
            want, on_disk = self.on_disk[name], True
        else:
            want, on_disk = self.seen.setdefault(name, (dtype, shape)), False
        same = want[0] == dtype and len(want[1]) == len(shape) and all(
            a == b for i, (a, b) in enumerate(zip(want[1], shape)) if i != self.batch_dim)
        if same:
            return None
        if on_disk:
            return DumpMismatch(f'"{name}" is {dtype} {shape} in batch {index}, but {self.out} holds it as '
                                f"{want[0]} {want[1]} (only the batch dim {self.batch_dim} may differ): this is "
                                f"not the run that wrote it; {_FIX}")
        return ValueError(f'"{name}" is {dtype} {shape} in batch {index} but was {want[0]} {want[1]} in the first '
                          f"batch of this run; captures must agree in every dim but the batch dim "
                          f"{self.batch_dim} (pad sequences to one length)")

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
        self.index = _load_index(self.path / INDEX)
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
