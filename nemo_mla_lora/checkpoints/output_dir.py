"""Writing an output directory that cannot destroy: what ``overwrite`` may replace, one writer at a time,
and the temp dir renamed into place.

An output ``DIR`` is written as the sibling ``.DIR.partial`` and renamed into place (``atomic_dir``); an
overwritten ``DIR`` is moved aside as ``.DIR.replaced`` and deleted last. ``.DIR.lock`` (created with O_EXCL,
holding the writer's pid, host and start time) says a writer is at work. Before any work (``check_target``):

- ``check_output``: not the working directory or above it, not a file, not overlapping a source.
- ``check_replaceable``: an existing ``DIR`` is replaced only when it is empty or a previous output of ours,
  recognised by a marker file: an export's ``manifest.json`` (``"producer": "nemo_mla_lora"``, or the fields
  every earlier manifest had), a base's ``mla_spec.json``, an adapter's ``adapter.json``.
- ``check_leftovers``: a lock, temp dir or set-aside directory already beside ``DIR`` is named in the error with
  how to remove it (a live writer's lock: wait; a dead run's: ``rm``); nothing is deleted unasked, it may be
  another live process's.
"""

import errno
import json
import os
import shutil
import socket
import time
from contextlib import contextmanager
from pathlib import Path

from nemo_mla_lora.runtime.parallel import barrier, rank, world_size

PRODUCER = "nemo_mla_lora"  # written into every manifest.json / adapter.json of ours
MANIFEST = "manifest.json"
SPEC_FILE, ADAPTER_FILE = "mla_spec.json", "adapter.json"


class OutputError(ValueError):
    """An output refused before any work (not ours to replace, held by another writer, leftovers beside it)."""


def check_sources(path, sources=()) -> Path:
    """Refuse an output equal to a source, inside one, or holding one (a write or an overwrite there would
    destroy its input). Returns the resolved output path.

    Args:
        path: the output directory a writer is about to create or replace.
        sources: every input the writer reads (base, adapter, tokenizer directory, ...); None entries are skipped.
    """
    path = Path(path).resolve()
    for source in sources:
        if source is None:
            continue
        src = Path(source).resolve()
        if path == src or path in src.parents or src in path.parents:
            raise ValueError(f"output={path} overlaps the source {src}; write the export elsewhere")
    return path


def check_output(path, sources=()) -> Path:
    """Refuse an output that a write could destroy: the current directory or one above it, a file, a source
    (base, adapter), a directory holding a source, or a directory inside one (``check_sources``). Returns the
    resolved path.

    Args:
        path: the output directory.
        sources: the writer's inputs (None entries skipped).
    """
    path = Path(path).resolve()
    cwd = Path.cwd().resolve()
    if path == cwd or path in cwd.parents:
        raise ValueError(f"output={path} is the current directory or one above it; name a new directory")
    if path.exists() and not path.is_dir():
        raise ValueError(f"output={path} is a file, not a directory")
    return check_sources(path, sources)


def sidecars(path) -> tuple[Path, Path, Path]:
    """(temp dir, set-aside dir, lock file) beside output ``path``.

    Args:
        path: the output directory (resolved).
    """
    path = Path(path)
    return (
        path.parent / f".{path.name}.partial",
        path.parent / f".{path.name}.replaced",
        path.parent / f".{path.name}.lock",
    )


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _is_manifest(d) -> bool:
    if not isinstance(d, dict):
        return False
    if d.get("producer") == PRODUCER:
        return True
    # manifests before the producer field (format_version 1 and 2) all had these
    return (
        isinstance(d.get("format"), str)
        and isinstance(d.get("format_version"), int)
        and isinstance(d.get("mla"), dict)
        and isinstance(d.get("tensor_checksums"), dict)
    )


def _is_spec(d) -> bool:
    from nemo_mla_lora.arch.mla_spec import MLASpec

    try:
        MLASpec.from_dict(d)
    except (TypeError, ValueError):
        return False
    return True


def _is_adapter(d) -> bool:
    return isinstance(d, dict) and (
        d.get("producer") == PRODUCER or {"dim", "alpha", "parts", "mla_spec", "modules"} <= set(d)
    )


MARKERS = {MANIFEST: _is_manifest, SPEC_FILE: _is_spec, ADAPTER_FILE: _is_adapter}


def check_replaceable(path, markers=None) -> None:
    """Refuse to replace ``path`` unless it is empty or one of ``markers`` in it says it is an output of ours.

    Args:
        path: an existing output directory.
        markers: marker file names (keys of ``MARKERS``) accepted; None: any of them.
    """
    path = Path(path)
    markers = tuple(MARKERS) if markers is None else tuple(markers)
    entries = sorted(p.name for p in path.iterdir())
    if not entries:
        return
    for name in markers:
        if (path / name).is_file() and MARKERS[name](_read_json(path / name)):
            return
    shown = ", ".join(entries[:5]) + (f", ... ({len(entries)} entries)" if len(entries) > 5 else "")
    raise OutputError(
        f"output={path} is not an output of nemo_mla_lora (no {' or '.join(markers)} of ours in it; it "
        f"holds {shown}); overwrite=true replaces only a previous output: name a new directory, or "
        f"remove it yourself"
    )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def describe_lock(lock: Path, path: Path) -> str:
    """Why ``lock`` (beside output ``path``) blocks a writer, and what to do about it."""
    holder = _read_json(lock) if lock.is_file() else None
    partial = sidecars(path)[0]
    and_partial = f" (and rm -r {partial})" if os.path.lexists(partial) else ""
    if not isinstance(holder, dict) or not isinstance(holder.get("pid"), int):
        return (
            f"{lock} exists but names no writer (unreadable); if no other process is writing {path}, "
            f"remove it: rm {lock}{and_partial}"
        )
    who = f"pid {holder['pid']} on {holder.get('host')}, started {holder.get('time')}"
    if holder.get("host") == socket.gethostname() and not _alive(holder["pid"]):
        return (
            f"{lock} was left by a run that died ({who}); if no other process is writing {path}, remove it: "
            f"rm {lock}{and_partial}"
        )
    if holder.get("host") != socket.gethostname():
        return (
            f"{lock}: {path} is being written from another host ({who}); wait for it, or if that run is gone, "
            f"remove it: rm {lock}{and_partial}"
        )
    return (
        f"{lock}: {path} is being written by another process ({who}); wait for it to finish or write elsewhere "
        f"(if pid {holder['pid']} is no writer of ours, remove the lock: rm {lock})"
    )


def check_leftovers(path, held: bool = False) -> None:
    """Refuse an output with a lock, temp dir or set-aside directory beside it, naming it and how to remove it
    (nothing is deleted: it may be another live process's).

    Args:
        path: the output directory (resolved).
        held: the lock is this writer's own (checked for the other two only).
    """
    path = Path(path)
    tmp, old, lock = sidecars(path)
    if not held and os.path.lexists(lock):
        raise OutputError(describe_lock(lock, path))
    if os.path.lexists(old):
        if old.is_dir() and not old.is_symlink() and not path.exists():
            raise OutputError(
                f"{old} holds the previous {path.name} from a run stopped while swapping it in; "
                f"move it back (mv {old} {path}) or remove it (rm -r {old})"
            )
        raise OutputError(
            f"{old} is in the way of replacing {path} (left by an interrupted overwrite, or not "
            f"ours); remove it: rm -r {old}"
        )
    if os.path.lexists(tmp):
        raise OutputError(
            f"{tmp} is left from a run that did not finish (no {lock.name} holds it); if no other "
            f"process is writing {path}, remove it: rm -r {tmp}"
        )


def acquire(lock: Path, path: Path) -> None:
    """Create ``lock`` (O_EXCL) with this process's pid, host and time; a lock already there is refused
    (``describe_lock``).

    Args:
        lock: the lock file beside ``path`` (``sidecars``).
        path: the output it guards (named in the error).
    """
    try:
        fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        raise OutputError(describe_lock(lock, path)) from None
    with os.fdopen(fd, "w") as handle:
        json.dump(
            {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "output": str(path),
            },
            handle,
        )


def release(lock: Path) -> None:
    """Remove ``lock`` if it is still this process's."""
    holder = _read_json(lock)
    if isinstance(holder, dict) and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
        lock.unlink()


def check_target(path, sources=(), overwrite: bool = False, replaces=None) -> Path:
    """Everything about an output that can be refused before any work: ``check_output``; an existing ``path``
    without ``overwrite``, or one that is not a previous output of ours (``check_replaceable``);
    a lock, temp dir or set-aside directory of another or a dead writer beside it (``check_leftovers``).
    Returns the resolved path.

    Args:
        path: the output directory.
        sources: the writer's inputs (None entries skipped).
        overwrite: whether an existing output of ours may be replaced.
        replaces: marker files (``MARKERS``) that make an existing ``path`` ours; None: any.
    """
    path = check_output(path, sources)
    if path.exists():
        if not overwrite:
            raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
        check_replaceable(path, replaces)
    check_leftovers(path)
    return path


LOW_SPACE = 64 << 20  # a write that failed with less than this free failed for lack of space


def _share(error: BaseException | None, path: Path) -> None:
    """Raise rank 0's error on every rank (the others would wait at the next barrier for a rank that gave up)."""
    import torch

    if world_size() > 1:
        box = [f"{type(error).__name__}: {error}" if error is not None and rank() == 0 else None]
        torch.distributed.broadcast_object_list(box, src=0)
        if box[0] is not None and rank() != 0:
            raise OutputError(f"rank 0 could not start writing {path}: {box[0]}")
    if error is not None:
        raise error


def _begin(path: Path, overwrite: bool, sources, replaces) -> list:
    """Rank 0's start of ``atomic_dir``: checks, parents, lock, temp dir. Returns the parents it created."""
    path = check_target(path, sources, overwrite, replaces)
    tmp, _, lock = sidecars(path)
    created = [p for p in reversed(path.parents) if not p.exists()]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        acquire(lock, path)
        try:
            check_leftovers(path, held=True)  # a run that died just now
            tmp.mkdir()
        except BaseException:
            release(lock)
            raise
    except BaseException:
        _remove_empty(created)
        raise
    return created


def _remove_empty(created) -> None:
    for parent in reversed(created):  # innermost first; only if still empty
        if parent.exists() and not any(parent.iterdir()):
            parent.rmdir()


@contextmanager
def atomic_dir(path, overwrite: bool = False, sources=(), replaces=None):
    """Yield a temp dir beside ``path`` (a sibling, never inside it); on success it replaces ``path`` by
    renames (old aside, new in, old removed), on failure it and any parent directories this call created
    are removed, and an existing ``path`` is untouched. A lock file beside ``path`` keeps a second writer
    out while this one works. Under torch.distributed every rank gets the same temp dir
    and rank 0 renames after a barrier.

    Args:
        path: the output directory.
        overwrite: replace an existing ``path`` that is a previous output of ours.
        sources: inputs the output must not overlap.
        replaces: marker files that make an existing ``path`` ours (``check_target``); None: any of ours.
    """
    path = Path(path).resolve()
    tmp, old, lock = sidecars(path)
    created, error = [], None
    if rank() == 0:
        try:
            created = _begin(path, overwrite, sources, replaces)
        except BaseException as err:
            error = err
    _share(error, path)
    try:
        yield tmp
        barrier()
    except BaseException as err:
        if rank() == 0:
            free = shutil.disk_usage(tmp if tmp.exists() else path.parent).free  # before the partial goes
            _abandon(tmp, lock, created)
            if free < LOW_SPACE and not isinstance(err, KeyboardInterrupt):
                raise OSError(
                    errno.ENOSPC,
                    f"no space left on the device of {path} while writing it ({free} bytes "
                    f"free); the partial output was removed",
                ) from err
        raise
    if rank() == 0:
        try:
            _swap_in(tmp, path, old)
        except BaseException:
            _abandon(tmp, lock, created)
            raise
        release(lock)
    barrier()


def _abandon(tmp: Path, lock: Path, created) -> None:
    """A failed write: its temp dir, its lock and the parents it created (if empty) go."""
    shutil.rmtree(tmp, ignore_errors=True)
    release(lock)
    _remove_empty(created)


def fsync_path(path) -> None:
    """A file's (or directory's) data and metadata on disk.

    Args:
        path: the file or directory.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync_tree(root: Path) -> None:
    """Every file under ``root`` on disk (files a writer synced already cost little), then the directories,
    innermost first."""
    paths = list(root.rglob("*"))
    for p in [*(p for p in paths if p.is_file()), *reversed([root, *(p for p in paths if p.is_dir())])]:
        fsync_path(p)


def _swap_in(tmp: Path, path: Path, old: Path) -> None:
    """``tmp`` (synced to disk first) becomes ``path``; a previous ``path`` is renamed aside first and deleted
    only after."""
    _sync_tree(tmp)
    had_old = path.exists()
    if had_old:
        if os.path.lexists(old):  # refused before the write began (check_leftovers); never removed unasked
            raise OutputError(f"{old} appeared while {path} was being written; nothing was replaced")
        path.rename(old)
    try:
        tmp.rename(path)
    except BaseException:
        if had_old:
            old.rename(path)
        raise
    if had_old:
        shutil.rmtree(old)
