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

In replica scope (``scope="replica"``, or a FlexModel wrapped with it) every
rank writes at once and no data crosses replicas: each rank records its LOCAL
pieces (a ``ShardwiseEdit`` capture, no communication during the forward),
and at each shard boundary keeps its own near-equal part of its replica's rows
(a value replicated over tensor parallel needs no communication; one split
over tp is turned into a split over rows by one all-to-all,
``collectives.redistribute_to_rows``), then writes it under
``replica-DDDDD/tp-KKKKK/`` with its own ``manifest.json``; the owner
rewrites the global ``index.json`` from the manifests after every step.

``ActivationReader`` reads rows ``[start, stop)`` of one name, opening only
the shards that hold them (``safetensors.safe_open``, which memory-maps the
file and copies out only the rows asked for); each shard's size and sha256
are checked the first time it is read, or all at once by ``verify()``.
``ActivationDataset`` is a ``torch.utils.data.Dataset`` over the same rows
(one dict of name -> row per global row, optionally in a seeded random
order), with ``to_hf_dataset()`` for HuggingFace ``datasets``.
"""
from __future__ import annotations

import bisect
import ctypes
import hashlib
import itertools
import json
import os
import socket
import time
import uuid
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from flex_model.collectives import (all_reduce_, broadcast_int, gather_objects, gather_status, redistribute_to_rows,
                                    row_parts)
from flex_model.firing import HOOK_KINDS
from flex_model.flex_model import FlexModel
from flex_model.hook_function import SCOPES, HookFunction, ShardInfo, ShardwiseEdit

INDEX = "index.json"
MANIFEST = "manifest.json"
LOCK = ".lock"
VERSION = 2  # 2: the index records the model (weights sha256, layout); 1 did not (still readable)
PARALLEL_VERSION = 3  # replica scope: one directory of shards and a manifest per rank, a global index over them
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
                     scope: Optional[str] = None) -> Optional["ActivationReader"]:
    """Run every batch of ``loader`` through ``flex`` and write the activations of ``names`` to ``out_dir``.

    Call it on every rank, each with its own loader (its data-parallel slice)
    yielding the same number of batches. ``names`` are module names as in the
    unwrapped model; a capture hook of ``hook_type`` is registered on each for
    the duration of the call (each must fire once per batch). ``run(flex,
    batch)`` runs one batch (default: ``flex(**batch)`` for a mapping, else
    ``flex(batch)``), under ``torch.no_grad()`` for forward hook types; for
    gradient hook types (``"full_backward"``, ``"full_backward_pre"``) ``run``
    must also run the backward. Returns an ``ActivationReader`` on the owner
    rank, None elsewhere.

    ``scope`` (None: the FlexModel's): ``"global"`` gathers every batch to the
    owner, which writes every shard (entries of ``flex.output_dict`` under
    ``names`` are dropped before each batch). ``"replica"`` writes in
    parallel: every rank writes its own part of its replica's rows under
    ``out_dir/replica-DDDDD/tp-KKKKK/`` (shards and a manifest), no data
    crosses replicas, and the owner keeps ``out_dir/index.json`` over all of
    them (see ``docs/activations.md``). Not with pipeline parallelism.

    A resume (an ``out_dir`` with an index) is refused on every rank, the
    dump left as it was, when the model's weights, the layout, the scope, the
    names, hook type, unpack_idx or batch dim differ from those that wrote it
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
    scope = flex.scope if scope is None else scope
    if scope not in SCOPES:
        raise ValueError(f'scope must be "global" or "replica" (or None: the FlexModel\'s), got {scope!r}')
    if scope == "replica":
        return _dump_parallel(flex, loader, Path(out_dir), list(names), batches_per_shard, hook_type, unpack_idx,
                              run, progress)
    if flex.store == "none":
        raise ValueError('this FlexModel was wrapped with store="none", which keeps no activations; '
                         'wrap it with store="root" (the default) to dump them, or dump in scope="replica"')
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
        handles = [flex.register(HookFunction(n, unpack_idx=unpack_idx, scope="global"), hook_type) for n in names]
        pending: Dict[str, List[torch.Tensor]] = {n: [] for n in names}
        bar, meter, batches = _batches_after(flex, loader, out, done, is_owner and progress)
        first = stop = done
        problem: Optional[Exception] = None
        for index, batch in enumerate(batches, start=done):
            for n in names:  # entries of earlier runs would be taken for this batch's firings
                flex.output_dict.pop(n, None)
            with torch.set_grad_enabled(HOOK_KINDS[hook_type].is_grad and torch.is_grad_enabled()):
                _run_agreed(flex, run, batch, index)
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
                if writer is not None:
                    meter.show(writer.written_rows, writer.written_bytes)
        if stop > first:
            _flush(flex, writer, pending, first, stop, problem)
            if writer is not None:
                meter.show(writer.written_rows, writer.written_bytes)
        bar.close()
    finally:
        for h in handles:
            h.remove()
        if writer is not None:
            writer.close()
    return ActivationReader(out) if writer is not None else None


class _Throughput:
    """The progress bar's postfix: rows and megabytes (1e6 bytes) written per second since the call began."""

    def __init__(self, bar: Any) -> None:
        self.bar, self.start = bar, time.monotonic()

    def show(self, rows: int, nbytes: int) -> None:
        seconds = max(time.monotonic() - self.start, 1e-9)
        self.bar.set_postfix(OrderedDict([("rows/s", f"{rows / seconds:.1f}"),
                                          ("MB/s", f"{nbytes / seconds / 1e6:.2f}")]))


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
    """The owner's ``text`` on every rank (see ``_text_from``)."""
    return _text_from(flex, flex.layout.owner, text)


def _text_from(flex: FlexModel, src: int, text: str) -> str:
    """Global rank ``src``'s ``text`` on every rank: its length by ``broadcast_int``, then its bytes by an
    ``all_reduce_`` (SUM) to which only ``src`` adds anything."""
    is_src = flex.layout.rank == src
    data = text.encode() if is_src else b""
    length = broadcast_int(len(data), src, flex.process_group)
    row = torch.zeros(length, dtype=torch.int64)
    if is_src:
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


def _batches_after(flex: FlexModel, loader: Iterable, out: Path, done: int,
                   show: bool) -> Tuple[Any, "_Throughput", Iterator[Any]]:
    """The progress bar, its throughput meter, and the loader's batches after the ``done`` already on disk
    (those are drawn and dropped; every rank raises if any rank's loader ran out before them)."""
    bar = tqdm(loader, desc=f"dump → {out}", unit="batch", disable=not show)
    batches = _agreed(flex, iter(bar))
    skipped = sum(1 for _ in zip(range(done), batches))  # drawn from the loader, not run
    if done:
        _check_loader_length(flex, out, done, skipped)
    return bar, _Throughput(bar), batches


def _make_and_lock(out: Path) -> str:
    """Create ``out`` (a dangling symlink or a file there is an error naming it) and take its lock."""
    if out.is_symlink() and not out.exists():
        raise ValueError(f"out_dir {out} is a symlink to {os.readlink(out)}, which does not exist: create "
                         f"that directory, or pass another out_dir")
    if out.exists() and not out.is_dir():
        raise ValueError(f"out_dir {out} exists and is not a directory; pass another out_dir")
    out.mkdir(parents=True, exist_ok=True)
    return _acquire_lock(out / LOCK)


_HAVE, _DONE, _FAILED = 1, 2, 3


def _run_agreed(flex: FlexModel, run: Callable[[FlexModel, Any], Any], batch: Any, index: int) -> None:
    """``run(flex, batch)``, then every rank agrees it worked before the dump's next collective (a stage
    that failed in its backward would leave the others waiting in ``gather_pipeline_outputs``). A ``run``
    that fails on one rank while the others are still inside the forward's collectives cannot be helped:
    nothing can agree with a rank that is not in the collective."""
    if flex.layout.is_single:
        run(flex, batch)
        return
    error = None
    try:
        run(flex, batch)
    except Exception as e:
        error = e
    codes = gather_status(_FAILED if error is not None else _HAVE, flex.process_group)
    if _FAILED in codes:
        texts = gather_objects("" if error is None else f"{type(error).__name__}: {error}", flex.process_group)
        if error is not None:
            raise error
        ranks = dist.get_process_group_ranks(flex.process_group or dist.group.WORLD)
        bad = codes.index(_FAILED)
        raise RuntimeError(f"batch {index} failed on rank {ranks[bad]}: {texts[bad]}; every rank stops the dump")


def _agreed(flex: FlexModel, batches: Iterator[Any]) -> Iterator[Any]:
    """``batches``, each one drawn on every rank before any rank runs it: the ranks agree (one small
    all-reduce) that each has a batch, or that all ran out, before the batch's collectives; a loader that
    raises, or runs out early, on one rank is an error on every rank instead of a hang."""
    if flex.layout.is_single:
        yield from batches
        return
    group = flex.process_group
    for index in itertools.count():
        batch, error = None, None
        try:
            batch, code = next(batches), _HAVE
        except StopIteration:
            code = _DONE
        except Exception as e:  # the user's loader
            error, code = e, _FAILED
        codes = gather_status(code, group)
        ranks = dist.get_process_group_ranks(group or dist.group.WORLD)
        if _FAILED in codes:
            texts = gather_objects("" if error is None else f"{type(error).__name__}: {error}", group)
            if error is not None:
                raise error
            bad = codes.index(_FAILED)
            raise RuntimeError(f"the loader of rank {ranks[bad]} raised at batch {index}: {texts[bad]}; every "
                               "rank stops the dump")
        if len(set(codes)) > 1:
            short = [r for r, c in zip(ranks, codes) if c == _DONE]
            raise ValueError(f"the ranks' loaders give different numbers of batches: ranks {short} ran out after "
                             f"{index} batches while the others gave more; give every rank a loader of the same "
                             "length (e.g. a DistributedSampler with drop_last=True)")
        if code == _DONE:
            return
        yield batch


def _check_loader_length(flex: FlexModel, out: Path, done: int, drawn: int) -> None:
    """Every rank raises if any rank's loader ran out before the ``done`` batches already on disk."""
    if not flex.layout.is_single:
        fewest = torch.tensor([drawn], dtype=torch.int64)
        drawn = int(all_reduce_(fewest, flex.process_group, op=dist.ReduceOp.MIN).item())
    if drawn < done:
        raise ValueError(f"{out} already holds {done} batches, but the loader gave only {drawn}: a resume needs "
                         f"the loader that wrote them (the same batches in the same order, then more); pass it, "
                         f"or another out_dir, or delete {out} to start over")


def _raise_if_any(flex: FlexModel, error: Optional[BaseException], doing: str) -> None:
    """After a step every rank ran on its own: if it failed on any, raise on every rank — each failing rank
    its own error, the others an error of the first failing rank's kind with its message (two small
    collectives when one failed, one when none did)."""
    layout = flex.layout
    if layout.is_single:
        if error is not None:
            raise error
        return
    me = _my_row(flex)
    first = torch.tensor([me if error is not None else layout.world_size], dtype=torch.int64)
    first = int(all_reduce_(first, flex.process_group, op=dist.ReduceOp.MIN).item())
    if first == layout.world_size:
        return
    src = layout.ranks[first]
    kind = 1 + next((i for i, k in enumerate(_KINDS) if isinstance(error, k)), len(_KINDS) - 1) \
        if me == first else 0
    kind = broadcast_int(kind, src, flex.process_group)
    text = _text_from(flex, src, f"{type(error).__name__}: {error}" if me == first else "")
    if error is not None:
        raise error
    where = layout.coords(src)
    raise _KINDS[kind - 1](f"rank {src} (replica {where['dp']}, tp {where['tp']}) {doing}: {text}")


def _least(flex: FlexModel, value: int) -> int:
    """The smallest of every rank's ``value``, on every rank."""
    if flex.layout.is_single:
        return value
    t = torch.tensor([value], dtype=torch.int64)
    return int(all_reduce_(t, flex.process_group, op=dist.ReduceOp.MIN).item())


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


def _load_index(path: Path, what: str = "dump index") -> Dict[str, Any]:
    """``path`` (an ``index.json``, or a rank's ``manifest.json``) parsed, or a ValueError naming it."""
    fix = f"restore it from a backup, or delete {path.parent if what == 'dump index' else path.parents[2]} to " \
          "start over"
    try:
        index = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}): it is truncated or was edited; {fix}") from None
    if not isinstance(index, dict) or not isinstance(index.get("names"), dict) \
            or not isinstance(index.get("shards"), list) or "batch_dim" not in index:
        raise ValueError(f"{path} is not a {what} (it needs names, shards and batch_dim); {fix}")
    return index


def _scope_of(record: Dict[str, Any]) -> str:
    return record.get("scope", "global")


def _check_provenance(out: Path, old: Dict[str, Any], names: List[str], source: Dict[str, Any],
                      model: Dict[str, Any]) -> None:
    """Raise ``DumpMismatch`` unless ``old`` (an index or a manifest on disk) was written in the same scope,
    by these hooks, this layout and these weights."""
    scope, theirs_scope = source.get("scope", "global"), _scope_of(old)
    if scope != theirs_scope:
        how = {"global": "one set of shards written by the owner", "replica": "shards written by every rank"}
        raise DumpMismatch(f"{out} holds a dump written in {theirs_scope} scope ({how[theirs_scope]}); this call "
                           f"dumps in {scope} scope. Pass scope={theirs_scope!r} to resume it, or {_FIX}")
    theirs = {k: old.get(k) for k in source}
    if sorted(old["names"]) != sorted(names) or theirs != source:
        raise DumpMismatch(f"{out} holds a dump of {sorted(old['names'])} with {theirs}; this call dumps "
                           f"{sorted(names)} with {source}. Pass the same names, hook_type, "
                           f"unpack_idx and batch dim to resume it, or {_FIX}")
    recorded = old.get("model")
    if not isinstance(recorded, dict) or "sha256" not in recorded or "layout" not in recorded:
        raise DumpMismatch(f"{out} was written by an older flex_model (index version "
                           f"{old.get('version')}) that recorded no checksum of the model's weights, so a "
                           f"resume cannot tell whether this model wrote it; {_FIX}")
    if recorded["layout"] != model["layout"]:
        raise DumpMismatch(f"{out} was written by a model laid out as {_describe_layout(recorded['layout'])};"
                           f" this one is {_describe_layout(model['layout'])}. Resume with the same "
                           f"layout, or {_FIX}")
    if recorded["sha256"] != model["sha256"]:
        ranks = [r for r, (a, b) in enumerate(zip(recorded.get("rank_sha256", []), model["rank_sha256"]))
                 if a != b]
        many = len(model["rank_sha256"]) > 1
        where = f"; the shards of rank {', '.join(map(str, ranks))} differ" if ranks and many else ""
        raise DumpMismatch(f"the model's weights differ from those that wrote {out} (sha256 "
                           f"{model['sha256'][:12]}… now vs {recorded['sha256'][:12]}… in its index{where})"
                           f": resume with the model that wrote it, or {_FIX}")


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
        self.written_rows = self.written_bytes = 0  # by this call, for the progress bar

    def open(self) -> int:
        """Take the lock; load an existing index, checking the same model and hooks wrote it; return the
        batches it holds. A refusal leaves ``out_dir`` as it was (the lock is released by ``close``)."""
        out = self.out
        self.lock_token = _make_and_lock(out)
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
        _check_provenance(self.out, old, self.names, self.source, self.model)

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
        self.written_rows += rows
        self.written_bytes += size


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


# == replica scope: every rank writes its own part of its replica's rows ===========================================
def _rank_dir(dp: int, tp: int) -> str:
    return f"replica-{dp:05d}/tp-{tp:05d}"


class _LocalCapture(ShardwiseEdit):
    """A capture that keeps this rank's LOCAL piece and where it sits (its ``ShardInfo``), on every rank, with
    no communication (a ``ShardwiseEdit``'s firing is exactly that); the value is left unchanged. The copy
    goes to host memory at once, so a shard's captures never hold accelerator memory."""

    def __init__(self) -> None:
        self.fired: List[Tuple[torch.Tensor, ShardInfo]] = []

    def edit_shard(self, current_module: torch.nn.Module, local: torch.Tensor, shard: ShardInfo,
                   modules: torch.nn.ModuleDict) -> None:
        self.fired.append((local.detach().to("cpu", copy=True), shard))
        return None


def _dump_parallel(flex: FlexModel, loader: Iterable, out: Path, names: List[str], batches_per_shard: int,
                   hook_type: str, unpack_idx: int, run: Callable[[FlexModel, Any], Any],
                   progress: bool) -> Optional["ActivationReader"]:
    """``dump_activations`` in replica scope (see ``docs/activations.md``, "Writing in parallel")."""
    layout = flex.layout
    if layout.pp > 1:
        raise ValueError(f"dump_activations in replica scope does not support pipeline parallelism (pp="
                         f"{layout.pp}): the stages hold different modules; dump with scope=\"global\"")
    is_owner = layout.rank == layout.owner
    source = {"hook_type": hook_type, "unpack_idx": unpack_idx, "batch_dim": layout.batch_dim, "scope": "replica"}
    model = _model_record(flex)  # every rank hashes its own shards (a collective)
    index = _IndexWriter(out, names, source, model, layout) if is_owner else None
    mine = _RankWriter(out, names, source, model, layout)
    handles = []
    try:
        error: Optional[Exception] = None
        if index is not None:  # the lock, and the global index's record of what wrote it
            try:
                index.open()
            except Exception as e:
                error = e
        _raise_everywhere(flex, error, f"refused to write to {out}")
        have = 0
        try:  # this rank's manifest: what wrote it, and every shard it lists checked (every rank at once)
            have = mine.open()
        except Exception as e:
            error = e
        _raise_if_any(flex, error, f"refused to write to {out}")
        done = _least(flex, have)  # a rank that finished a step its peers did not redoes it
        try:
            mine.resume_at(done)
        except Exception as e:
            error = e
        _raise_if_any(flex, error, f"refused to write to {out}")
        recorders = {n: _LocalCapture() for n in names}
        handles = [flex.register(HookFunction(n, unpack_idx=unpack_idx, editing_function=recorders[n],
                                              scope="replica"), hook_type) for n in names]
        pending: Dict[str, List[torch.Tensor]] = {n: [] for n in names}
        rows: List[int] = []  # the replica's rows in each pending batch
        bar, meter, batches = _batches_after(flex, loader, out, done, is_owner and progress)
        first = stop = done
        problem: Optional[Exception] = None
        for step, batch in enumerate(batches, start=done):
            for r in recorders.values():
                r.fired.clear()
            with torch.set_grad_enabled(HOOK_KINDS[hook_type].is_grad and torch.is_grad_enabled()):
                _run_agreed(flex, run, batch, step)
            if problem is None:
                problem = mine.take(recorders, pending, rows, step)
            stop = step + 1
            if step == done:  # a wrong module or a resume of another run: said after one batch, not one shard
                _raise_if_any(flex, problem, f"stopped the dump in {out} after batch {step}")
            if stop - first == batches_per_shard:
                _flush_parallel(flex, mine, index, pending, rows, first, stop, problem, meter)
                first = stop
        if stop > first:
            _flush_parallel(flex, mine, index, pending, rows, first, stop, problem, meter)
        bar.close()
    finally:
        for h in handles:
            h.remove()
        if index is not None:
            index.close()
    return ActivationReader(out) if is_owner else None


def _flush_parallel(flex: FlexModel, mine: "_RankWriter", index: Optional["_IndexWriter"],
                    pending: Dict[str, List[torch.Tensor]], rows: List[int], start: int, stop: int,
                    problem: Optional[Exception], meter: _Throughput) -> None:
    """One step on every rank: keep this rank's rows (no communication for values replicated over tp, one
    all-to-all within the replica for values split over tp), write its shard and manifest; then the owner
    rewrites the global index from every rank's manifest. Every failure reaches every rank."""
    joined: Dict[str, Tuple[torch.Tensor, Optional[int]]] = {}
    error = problem
    if error is None:
        try:
            joined = mine.join(pending, start, stop)
        except Exception as e:
            error = e
    for chunks in pending.values():
        chunks.clear()
    replica_rows = list(rows)
    rows.clear()
    doing = f"failed to write its shard of batches [{start}, {stop})"
    _raise_if_any(flex, error, doing)  # before the collectives within each replica: all ranks enter them
    error = None
    try:
        bd = flex.layout.batch_dim
        tensors = {}
        for n in mine.names:
            x, tp_dim = joined.pop(n)
            part = redistribute_to_rows(flex.layout.replica, x, tp_dim, bd % x.ndim)
            del x
            tensors[n] = part.to("cpu").clone(memory_format=torch.contiguous_format)
        mine.write(tensors, start, stop, replica_rows)
    except Exception as e:
        error = e
    _raise_if_any(flex, error, doing)
    error = None
    if index is not None:
        try:
            index.update(stop, since=mine.since)
            meter.show(index.written_rows, index.written_bytes)
        except Exception as e:
            error = e
    _raise_everywhere(flex, error, f"failed to write {mine.out / INDEX} after the shards of batches "
                                   f"[{start}, {stop})")


class _RankWriter:
    """One rank's side in replica scope: its directory, its manifest, checks of its captures, its shards."""

    def __init__(self, out: Path, names: List[str], source: Dict[str, Any], model: Dict[str, Any],
                 layout: Any) -> None:
        me = layout.my
        self.out, self.names, self.source, self.model = out, names, source, model
        self.batch_dim = source["batch_dim"]
        self.dp, self.tp, self.tp_size, self.rank = me["dp"], me["tp"], layout.tp, layout.rank
        self.rel = _rank_dir(self.dp, self.tp)
        self.dir = out / self.rel
        self.path = self.dir / MANIFEST
        self.manifest: Dict[str, Any] = {"version": PARALLEL_VERSION, **source, "rank": self.rank, "dp": self.dp,
                                         "tp": self.tp, "model": model, "names": {}, "shards": []}
        self.seen: Dict[str, Tuple[str, List[int], Optional[int]]] = {}  # this run's first capture of each name
        self.on_disk: Dict[str, Tuple[str, List[int]]] = {}  # dtype and shape of this rank's rows on disk
        self.fresh = True  # stale files of a killed run are removed after this run's first manifest
        self.since = 0  # the batches on disk when this call began

    def open(self) -> int:
        """Check this rank's manifest (what wrote it, every shard's size and sha256) against the global index;
        return how many batches it holds. Reads only: a refusal leaves the dump as it was."""
        listed = 0
        if (self.out / INDEX).exists():  # the owner has checked it already
            mine = [s for s in _load_index(self.out / INDEX)["shards"] if s.get("rank") == self.rank]
            listed = mine[-1]["batches"][1] if mine else 0
        have = 0
        if self.path.exists():
            old = _load_index(self.path, what="manifest")
            _check_provenance(self.out, old, self.names, self.source, self.model)
            for shard in old["shards"]:
                _check_file(self.dir / shard["file"], shard, self.out, hash_it=True, listed_in=self.path)
            self.manifest = old
            have = old["shards"][-1]["batches"][1] if old["shards"] else 0
        if have < listed:
            raise ShardCorrupted(f"{self.out / INDEX} lists batches [0, {listed}) for rank {self.rank} (replica "
                                 f"{self.dp}, tp {self.tp}), but its manifest {self.path} "
                                 f"{'holds only ' + str(have) if self.path.exists() else 'is missing'}; delete "
                                 f"{self.out} and dump again (or restore the files)")
        return have

    def resume_at(self, done: int) -> None:
        """Keep the shards of batches before ``done`` (in memory: the manifest on disk changes only with this
        run's first shard), and the dtype and shape they hold."""
        kept = [s for s in self.manifest["shards"] if s["batches"][1] <= done]
        if done and (not kept or kept[-1]["batches"][1] != done):
            raise ShardCorrupted(f"{self.path} has no shard ending at batch {done}, where every rank's dump "
                                 f"ends; delete {self.out} and dump again")
        self.manifest["shards"] = kept
        self.since = done
        total = sum(s["part"][1] - s["part"][0] for s in kept)
        names = self.manifest["names"] if kept else {}
        for meta in names.values():
            meta["shape"][self.batch_dim % len(meta["shape"])] = total
        self.manifest["names"] = names
        self.on_disk = {n: (m["dtype"], list(m["shape"])) for n, m in names.items()}

    def take(self, recorders: Dict[str, _LocalCapture], pending: Dict[str, List[torch.Tensor]], rows: List[int],
             step: int) -> Optional[Exception]:
        """Check batch ``step``'s captures (one per name, the dtype and full shape of the first or of the
        dump on disk, one split dim, the same rows for every name) and keep them; else the problem."""
        got: Dict[str, torch.Tensor] = {}
        n_rows = None
        for n in self.names:
            fired = recorders[n].fired
            if len(fired) != 1:
                return ValueError(f'module "{n}" fired {len(fired)} times in batch {step}; dump needs exactly '
                                  "one capture per batch: name a module that runs once per forward")
            t, info = fired[0]
            bd = self.batch_dim % max(t.ndim, 1)
            if t.ndim == 0:
                return ValueError(f'"{n}" is a 0-d value in batch {step}; dump needs a batch dim {self.batch_dim}')
            tp_dim = info.tp_dim % t.ndim if info.tp_dim is not None and info.tp_size > 1 else None
            if tp_dim == bd:
                return ValueError(f'"{n}" is split over tensor parallel along the batch dim {bd} (its rows); a '
                                  'replica-scope dump needs every tp rank to see all of its replica\'s rows: dump '
                                  'it with scope="global"')
            shape = list(t.shape)
            if tp_dim is not None:
                shape[tp_dim] *= info.tp_size
            dtype = str(t.dtype)
            want = self.on_disk.get(n)
            first = self.seen.setdefault(n, (dtype, shape, tp_dim))
            if want is not None and not _alike(want, (dtype, shape), bd):
                return DumpMismatch(f'"{n}" is {dtype} {shape} in batch {step}, but {self.out} holds it as '
                                    f"{want[0]} {want[1]} (only the batch dim {self.batch_dim} may differ): this "
                                    f"is not the run that wrote it; {_FIX}")
            if not _alike(first[:2], (dtype, shape), bd) or first[2] != tp_dim:
                return ValueError(f'"{n}" is {dtype} {shape} (split dim {tp_dim}) in batch {step} but was '
                                  f"{first[0]} {first[1]} (split dim {first[2]}) in the first batch of this run; "
                                  f"captures must agree in every dim but the batch dim {self.batch_dim} (pad "
                                  "sequences to one length)")
            if n_rows is not None and t.shape[bd] != n_rows:
                return ValueError(f'"{n}" has {t.shape[bd]} rows in batch {step} but "{self.names[0]}" has '
                                  f"{n_rows}; every name must hold one row per sample")
            n_rows = t.shape[bd]
            got[n] = t
        for n, t in got.items():
            pending[n].append(t)
        rows.append(int(n_rows))
        return None

    def join(self, pending: Dict[str, List[torch.Tensor]], start: int, stop: int
             ) -> Dict[str, Tuple[torch.Tensor, Optional[int]]]:
        """Each name's pieces of the step, concatenated along the batch dim, with its split dim."""
        out = {}
        for n in self.names:
            pieces = pending[n]
            bd = self.batch_dim % pieces[0].ndim
            out[n] = (torch.cat(pieces, bd) if len(pieces) > 1 else pieces[0], self.seen[n][2])
            pieces.clear()
        return out

    def write(self, tensors: Dict[str, torch.Tensor], start: int, stop: int, replica_rows: List[int]) -> None:
        """This rank's part of the step's rows as one shard, then its manifest (both atomically)."""
        lo, hi = row_parts(sum(replica_rows), self.tp_size)[self.tp]
        shards = self.manifest["shards"]
        for n, t in tensors.items():
            bd = self.batch_dim % t.ndim
            if t.shape[bd] != hi - lo:
                raise RuntimeError(f'"{n}": {t.shape[bd]} rows for rows [{lo}, {hi}) of the replica\'s step')
            meta = self.manifest["names"].setdefault(n, {"dtype": str(t.dtype), "shape": None})
            full = list(t.shape)
            if meta["shape"] is not None:
                old = meta["shape"]
                if not _alike((meta["dtype"], old), (str(t.dtype), full), bd):
                    raise ValueError(f'"{n}" was {meta["dtype"]} {old} in earlier shards but is {t.dtype} {full} '
                                     f"in batches [{start}, {stop}); keep them alike")
                full[bd] += old[bd]
            meta["shape"] = full
        self.dir.mkdir(parents=True, exist_ok=True)
        name = f"shard-{len(shards):05d}.safetensors"
        digest, size = _atomic_write(self.dir / name, lambda tmp: save_file(tensors, str(tmp)))
        shards.append({"file": name, "sha256": digest, "bytes": size, "batches": [start, stop],
                       "replica_rows": replica_rows, "part": [lo, hi]})
        text = json.dumps(self.manifest, indent=1)
        _atomic_write(self.path, lambda tmp: tmp.write_text(text))
        if self.fresh:  # what a killed run left behind: temp files, shards this manifest does not list
            listed = {s["file"] for s in shards}
            for stale in list(self.dir.glob("*.tmp")) + list(self.dir.glob("shard-*.safetensors")):
                if stale.name not in listed:
                    stale.unlink()
            self.fresh = False


class _IndexWriter:
    """The owner's side in replica scope: the lock, the global index's record of what wrote the dump, and
    the global index rewritten from every rank's manifest after each step."""

    def __init__(self, out: Path, names: List[str], source: Dict[str, Any], model: Dict[str, Any],
                 layout: Any) -> None:
        self.out, self.names, self.source, self.model, self.layout = out, names, source, model, layout
        self.path = out / INDEX
        self.lock_token: Optional[str] = None
        self.written_rows = self.written_bytes = 0  # by every rank in this call, for the progress bar

    def open(self) -> None:
        out = self.out
        self.lock_token = _make_and_lock(out)
        if self.path.exists():
            _check_provenance(out, _load_index(self.path), self.names, self.source, self.model)

    def close(self) -> None:
        if self.lock_token is not None:
            _release_lock(self.out / LOCK, self.lock_token)
            self.lock_token = None

    def update(self, stop: int, since: int = 0) -> None:
        """The global index of the first ``stop`` batches, from every rank's manifest, written atomically;
        ``written_rows`` / ``written_bytes``: what the shards of batches ``since`` and later hold."""
        layout = self.layout
        ranks = sorted(layout.ranks, key=lambda r: (layout.coords(r)["dp"], layout.coords(r)["tp"]))
        shards, summary, names = [], [], None
        for r in ranks:
            where = layout.coords(r)
            rel = _rank_dir(where["dp"], where["tp"])
            manifest = _load_index(self.out / rel / MANIFEST, what="manifest")
            theirs = [s for s in manifest["shards"] if s["batches"][1] <= stop]
            if not theirs or theirs[-1]["batches"][1] != stop:
                raise ShardCorrupted(f"{self.out / rel / MANIFEST} of rank {r} does not reach batch {stop}, which "
                                     "every rank has just written")
            n_rows = sum(s["part"][1] - s["part"][0] for s in theirs)
            n_bytes = sum(s["bytes"] for s in theirs)
            summary.append({"rank": r, "dp": where["dp"], "tp": where["tp"], "dir": rel, "rows": n_rows,
                            "bytes": n_bytes})
            shards += [{**s, "file": f"{rel}/{s['file']}", "rank": r, "dp": where["dp"], "tp": where["tp"]}
                       for s in theirs]
            if names is None:
                names = {n: {"dtype": m["dtype"], "shape": list(m["shape"])} for n, m in manifest["names"].items()}
        total = sum(s["rows"] for s in summary)
        for meta in names.values():
            meta["shape"][self.source["batch_dim"] % len(meta["shape"])] = total
        index = {"version": PARALLEL_VERSION, **self.source, "model": self.model, "names": names, "batches": stop,
                 "rows": total, "ranks": summary, "shards": shards}
        text = json.dumps(index, indent=1)
        _atomic_write(self.path, lambda tmp: tmp.write_text(text))
        new = [s for s in shards if s["batches"][0] >= since]
        self.written_rows = sum(s["part"][1] - s["part"][0] for s in new)
        self.written_bytes = sum(s["bytes"] for s in new)


def _alike(a: Tuple[str, List[int]], b: Tuple[str, List[int]], batch_dim: int) -> bool:
    """The same dtype and shape but for the batch dim."""
    return a[0] == b[0] and len(a[1]) == len(b[1]) and all(
        x == y for i, (x, y) in enumerate(zip(a[1], b[1])) if i != batch_dim)


def _check_file(path: Path, shard: Dict[str, Any], dump: Path, hash_it: bool = True,
                listed_in: Optional[Path] = None) -> None:
    """Raise ``ShardCorrupted`` unless ``path`` has the size (and, with ``hash_it``, the sha256) that
    ``shard`` (its entry in the index, or in a rank's manifest) recorded."""
    fix = f"delete {dump} and dump again (or restore the file)"
    where = (listed_in or Path(INDEX)).name
    if not path.exists():
        raise ShardCorrupted(f"{path} is missing but {where} lists it; {fix}")
    size = path.stat().st_size
    if size != shard["bytes"]:
        raise ShardCorrupted(f"{path} has {size} bytes but {where} recorded {shard['bytes']}: it is truncated "
                             f"or partial; {fix}")
    if not hash_it:
        return
    digest = _sha256(path)
    if digest != shard["sha256"]:
        raise ShardCorrupted(f"{path} fails its sha256 check ({where} {shard['sha256'][:12]}…, file "
                             f"{digest[:12]}…): its bytes changed since it was written; {fix}")


class _Blocks:
    """Where every global row lives: consecutive global rows ``[start, start + length)`` are rows
    ``[file_row, file_row + length)`` of shard ``shard``; in replica scope each block also carries its
    global sample id (replica, step, row of that replica's batch ``step``) of its first row."""

    def __init__(self, index: Dict[str, Any]) -> None:
        self.start: List[int] = []
        self.length: List[int] = []
        self.shard: List[int] = []
        self.file_row: List[int] = []
        self.sample: List[Optional[Tuple[int, int, int]]] = []
        self.sample_start: Dict[Tuple[int, int], Tuple[int, int]] = {}  # (replica, step) -> (global row, rows)
        shards = index["shards"]
        if _scope_of(index) != "replica":
            for i, s in enumerate(shards):
                self._add(s["rows"][0], s["rows"][1] - s["rows"][0], i, 0, None)
            self.rows = shards[-1]["rows"][1] if shards else 0
            return
        steps: Dict[Tuple[int, int], Dict[int, List[Tuple[int, int, int, int]]]] = {}
        for i, s in enumerate(shards):
            steps.setdefault(tuple(s["batches"]), {}).setdefault(s["dp"], []).append((s["tp"], i, *s["part"]))
        row = 0
        for (first, stop), replicas in sorted(steps.items()):
            counts = {d: shards[parts[0][1]]["replica_rows"] for d, parts in replicas.items()}
            position = {d: 0 for d in replicas}
            for b in range(first, stop):
                for d in sorted(replicas):
                    n, p0 = counts[d][b - first], position[d]
                    position[d] += n
                    self.sample_start[(d, b)] = (row, n)
                    for _, i, lo, hi in sorted(replicas[d]):
                        a, z = max(p0, lo), min(p0 + n, hi)
                        if a < z:
                            self._add(row + a - p0, z - a, i, a - lo, (d, b, a - p0))
                    row += n
        self.rows = row

    def _add(self, start: int, length: int, shard: int, file_row: int, sample: Optional[Tuple[int, int, int]]):
        if length > 0:
            self.start.append(start)
            self.length.append(length)
            self.shard.append(shard)
            self.file_row.append(file_row)
            self.sample.append(sample)

    def find(self, row: int) -> int:
        """The block holding global row ``row``."""
        return bisect.bisect_right(self.start, row) - 1

    def spans(self, start: int, stop: int) -> List[Tuple[int, int, int]]:
        """``(shard, file_row_start, file_row_stop)`` pieces of global rows ``[start, stop)``, in order,
        consecutive pieces of one file merged."""
        out: List[Tuple[int, int, int]] = []
        i = max(self.find(start), 0)
        while i < len(self.start) and self.start[i] < stop:
            a, z = max(start, self.start[i]), min(stop, self.start[i] + self.length[i])
            if a < z:
                lo = self.file_row[i] + a - self.start[i]
                if out and out[-1][0] == self.shard[i] and out[-1][2] == lo:
                    out[-1] = (out[-1][0], out[-1][1], lo + z - a)
                else:
                    out.append((self.shard[i], lo, lo + z - a))
            i += 1
        return out


class ActivationReader:
    """Lazy reader of a dump: ``read(name, start, stop)`` opens only the shards holding those rows.

    Reads a dump written in either scope: the rows are global rows (for each
    batch, replica 0's rows, then replica 1's, ...), wherever they live. Shards
    are opened with ``safetensors.safe_open``, which memory-maps the file: a
    read copies only the requested rows of one tensor out of the map (open
    files are kept, up to ``open_files``, so random row reads do not reopen
    them). With ``verify_on_read`` (default) the first read touching a shard
    checks its size and sha256, which reads that file once; with False only
    its size is checked (call ``verify()`` to check everything at once).
    """

    def __init__(self, path: Union[str, os.PathLike], verify_on_read: bool = True, open_files: int = 64) -> None:
        self.path = Path(path)
        if not (self.path / INDEX).exists():
            raise FileNotFoundError(f"{self.path} has no {INDEX}; is it the out_dir of dump_activations?")
        self.index = _load_index(self.path / INDEX)
        self.batch_dim: int = self.index["batch_dim"]
        self._checked: set = set()
        self.verify_on_read = verify_on_read
        self._blocks = _Blocks(self.index)
        self._open_files = open_files
        self._handles: "OrderedDict[str, Any]" = OrderedDict()
        self._pid = os.getpid()

    @property
    def names(self) -> List[str]:
        return list(self.index["names"])

    @property
    def scope(self) -> str:
        """"global" (the owner wrote every shard) or "replica" (every rank wrote its own)."""
        return _scope_of(self.index)

    def shape(self, name: str) -> torch.Size:
        return torch.Size(self._meta(name)["shape"])

    def dtype(self, name: str) -> torch.dtype:
        return _DTYPES[self._meta(name)["dtype"]]

    def __len__(self) -> int:
        """Rows (along the batch dim) in the dump."""
        return self._blocks.rows

    def read(self, name: str, start: int = 0, stop: Optional[int] = None) -> torch.Tensor:
        """Rows ``[start, stop)`` of ``name`` along the batch dim (negative indices count from the end)."""
        self._meta(name)
        n = len(self)
        start, stop = (start + n if start < 0 else start), (n if stop is None else stop + n if stop < 0 else stop)
        if not 0 <= start <= stop <= n:
            raise IndexError(f"rows [{start}, {stop}) are out of range: the dump of {name!r} has {n} rows")
        bd = self.batch_dim
        pieces = []
        for shard, lo, hi in self._blocks.spans(start, stop):
            rows = (slice(None),) * bd + (slice(lo, hi),)
            pieces.append(self._file(shard).get_slice(name)[rows])
        if not pieces:
            shape = list(self.shape(name))
            shape[bd] = 0
            return torch.empty(shape, dtype=self.dtype(name))
        return torch.cat(pieces, bd) if len(pieces) > 1 else pieces[0]

    def row(self, name: str, row: int) -> torch.Tensor:
        """Global row ``row`` of ``name``, without the batch dim (one slice of one memory-mapped file)."""
        return self.read(name, row, row + 1 if row != -1 else None).select(self.batch_dim, 0).contiguous()

    def locate(self, row: int) -> Dict[str, Any]:
        """Where global row ``row`` lives: ``file`` and ``file_row``; for a replica-scope dump also its global
        sample id ``replica``, ``step`` (the batch) and ``row`` (in that replica's part of the batch)."""
        n = len(self)
        if not -n <= row < n:
            raise IndexError(f"row {row} is out of range: the dump has {n} rows")
        row %= n
        i = self._blocks.find(row)
        off = row - self._blocks.start[i]
        shard = self.index["shards"][self._blocks.shard[i]]
        out = {"file": shard["file"], "file_row": self._blocks.file_row[i] + off,
               "replica": None, "step": None, "row": None}
        sample = self._blocks.sample[i]
        if sample is not None:
            out.update(replica=sample[0], step=sample[1], row=sample[2] + off)
        return out

    def global_row(self, replica: int, step: int, row: int) -> int:
        """The global row of sample ``(replica, step, row)`` of a replica-scope dump."""
        if (replica, step) not in self._blocks.sample_start:
            raise KeyError(f"the dump holds no batch {step} of replica {replica}")
        start, n = self._blocks.sample_start[(replica, step)]
        if not 0 <= row < n:
            raise IndexError(f"replica {replica} has {n} rows in batch {step}, not row {row}")
        return start + row

    def verify(self) -> None:
        """Check every shard's size and sha256 against the index; raise ``ShardCorrupted`` on the first bad one."""
        for shard in self.index["shards"]:
            self._check(shard, force=True)

    def _file(self, i: int) -> Any:
        """Shard ``i`` opened (memory-mapped by ``safe_open``), checked the first time."""
        if self._pid != os.getpid():  # a forked DataLoader worker: its own handles
            self._handles, self._pid = OrderedDict(), os.getpid()
        shard = self.index["shards"][i]
        handle = self._handles.get(shard["file"])
        if handle is not None:
            self._handles.move_to_end(shard["file"])
            return handle
        self._check(shard, hash_it=self.verify_on_read)
        handle = safe_open(str(self.path / shard["file"]), framework="pt")
        self._handles[shard["file"]] = handle
        while len(self._handles) > self._open_files:
            self._handles.popitem(last=False)
        return handle

    def _check(self, shard: Dict[str, Any], force: bool = False, hash_it: bool = True) -> None:
        if shard["file"] in self._checked and not force:
            return
        _check_file(self.path / shard["file"], shard, self.path, hash_it=hash_it)
        if hash_it:
            self._checked.add(shard["file"])

    def _meta(self, name: str) -> Dict[str, Any]:
        if name not in self.index["names"]:
            raise KeyError(f"{name!r} is not in this dump; it holds {self.names}")
        return self.index["names"][name]

    def __getstate__(self) -> Dict[str, Any]:  # open files stay behind (e.g. for DataLoader workers)
        state = dict(self.__dict__)
        state["_handles"] = OrderedDict()
        return state


class ActivationDataset(torch.utils.data.Dataset):
    """One ``torch.utils.data.Dataset`` over a dump (of any scope: every replica's and rank's shards).

    ``dataset[i]`` is a dict of name -> that row's tensor (without the batch
    dim), read lazily from the memory-mapped shard that holds it; ``len`` is
    the number of global rows. With ``shuffle=True`` row ``i`` is global row
    ``permutation[i]``, a permutation of all rows drawn from ``seed`` (the same
    for the same seed, on any machine). ``names`` (default: all) picks the
    modules. ``to_hf_dataset()`` converts it to a HuggingFace ``datasets.Dataset``.
    """

    def __init__(self, path: Union[str, os.PathLike], names: Optional[Sequence[str]] = None, *,
                 shuffle: bool = False, seed: int = 0, verify_on_read: bool = True) -> None:
        self.reader = ActivationReader(path, verify_on_read=verify_on_read)
        self.names = list(names) if names is not None else self.reader.names
        for n in self.names:
            self.reader._meta(n)
        self.shuffle, self.seed = shuffle, seed
        self.permutation: Optional[torch.Tensor] = None
        if shuffle:
            self.permutation = torch.randperm(len(self.reader), generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return len(self.reader)

    def global_row(self, i: int) -> int:
        """The global row that item ``i`` is."""
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"index {i} is out of range: the dataset has {n} rows")
        i %= n
        return int(self.permutation[i]) if self.permutation is not None else i

    def __getitem__(self, i: int) -> Dict[str, torch.Tensor]:
        row = self.global_row(int(i))
        return {n: self.reader.row(n, row) for n in self.names}

    def to_hf_dataset(self, cache_dir: Optional[Union[str, os.PathLike]] = None,
                      format: Optional[str] = "torch") -> Any:
        """This dataset as a HuggingFace ``datasets.Dataset`` (row ``i`` is ``self[i]``; one column per name,
        fixed-shape ``ArrayXD`` / ``List`` features), written to an Arrow cache (memory-mapped) under
        ``cache_dir`` (default: HF's). ``format="torch"`` gives tensors (HF's torch formatter returns float
        columns as float32); None keeps HF's default. bfloat16 is stored as float32 (Arrow has no bfloat16)."""
        import datasets

        features = datasets.Features({n: _hf_feature(datasets, self.reader, n) for n in self.names})
        fingerprint = hashlib.sha256((self.reader.path / INDEX).read_bytes()).hexdigest()
        dataset = datasets.Dataset.from_generator(
            _hf_rows, features=features, cache_dir=None if cache_dir is None else str(cache_dir),
            # a list in gen_kwargs would be split into one generator call per item: the names go as JSON text
            gen_kwargs={"path": str(self.reader.path), "names": json.dumps(self.names), "shuffle": self.shuffle,
                        "seed": self.seed, "verify": self.reader.verify_on_read, "index_sha256": fingerprint})
        return dataset.with_format(format) if format is not None else dataset


_HF_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "float32",
              torch.float64: "float64", torch.int64: "int64", torch.int32: "int32", torch.int16: "int16",
              torch.int8: "int8", torch.uint8: "uint8", torch.bool: "bool"}


def _hf_feature(datasets: Any, reader: ActivationReader, name: str) -> Any:
    shape = list(reader.shape(name))
    del shape[reader.batch_dim]
    dtype = _HF_DTYPES[reader.dtype(name)]
    if not shape:
        return datasets.Value(dtype)
    if len(shape) == 1:
        sequence = getattr(datasets, "List", None) or datasets.Sequence
        return sequence(datasets.Value(dtype), length=shape[0])
    if len(shape) > 5:
        raise ValueError(f'"{name}" has {len(shape)}-d rows; HuggingFace datasets holds at most 5-d arrays')
    return getattr(datasets, f"Array{len(shape)}D")(shape=tuple(shape), dtype=dtype)


def _hf_rows(path: str, names: str, shuffle: bool, seed: int, verify: bool, index_sha256: str,
             chunk: int = 256) -> Iterable[Dict[str, Any]]:
    """The rows of ``ActivationDataset(path, json.loads(names), shuffle, seed)`` as numpy arrays, for
    ``from_generator`` (``index_sha256`` only keys HF's cache: another dump in the same place is converted
    anew)."""
    dataset = ActivationDataset(path, json.loads(names), shuffle=shuffle, seed=seed, verify_on_read=verify)
    names = dataset.names
    reader, bd = dataset.reader, dataset.reader.batch_dim
    if shuffle:
        for i in range(len(dataset)):
            yield {n: _numpy(t) for n, t in dataset[i].items()}
        return
    for lo in range(0, len(dataset), chunk):
        hi = min(lo + chunk, len(dataset))
        block = {n: reader.read(n, lo, hi) for n in names}
        for j in range(hi - lo):
            yield {n: _numpy(t.select(bd, j)) for n, t in block.items()}


def _numpy(t: torch.Tensor) -> Any:
    return (t.float() if t.dtype == torch.bfloat16 else t).numpy()
