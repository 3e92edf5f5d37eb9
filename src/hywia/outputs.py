"""Outputs that are never half-written and never replaced by accident.

A folder is written into a temporary sibling and renamed into place (`atomic_dir`), so an interrupted run never
leaves a half model, and an existing output is replaced only with `overwrite`; the rename pair that swaps an old
output for a new one is never cut in half by a signal (`deferred_signals`). The temporary's name carries the
writer's pid, so one left by a run that was killed outright (SIGKILL, power loss) is recognised as stale and removed
by the next run writing the same output (`clear_stale`); a lock held for the whole run refuses a second process
writing it (`claim_output`). Every output is checked before any work (`check_output`), so a mistake costs nothing.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import signal
import tempfile
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path

from .errors import HywiaError
from .modes import as_user_file, as_user_folder
from .scratch import cache_dir, process_running


def check_output(out: str | Path, overwrite: bool, inputs: tuple[str | Path, ...] = (), file: bool = False) -> Path:
    """Refuse an output (a folder, or a `file`) that exists (unless `overwrite`), that is one of the run's `inputs`,
    or that cannot be created, before any work is done, so a mistake costs nothing."""
    out = Path(out).expanduser()
    if out.is_symlink():  # a rename would replace the link, not what it points at, and leave the target as it was
        raise HywiaError(f"output {out} is a symbolic link (to {os.readlink(out)}); hywia replaces outputs by renaming, which "
                         "would replace the link, not its target: pass the target itself as --out, or remove the link")
    if out.exists() and not overwrite:
        raise HywiaError(f"output {out} already exists; pass --overwrite to replace it or choose another --out")
    if out.exists() and out.is_dir() == file:
        raise HywiaError(f"output {out} exists and is {'a folder' if file else 'not a folder'}; remove it or choose another --out")
    resolved = out.resolve()
    for given in inputs:
        source = Path(given).expanduser().resolve()
        if resolved == source or resolved in source.parents or source in resolved.parents:
            raise HywiaError(f"--out {out} would replace or write into the input {given}, which hywia never changes: "
                             "choose another --out")
    check_writable(out)
    return out


def check_writable(out: Path) -> None:
    """Create and remove a probe folder where `out`'s first missing ancestor would go: the only test that also
    catches read-only file systems and root-squashed mounts, where permission bits say nothing."""
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise HywiaError(f"cannot create {out}: {parent} is a file, not a folder; choose another --out")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".hywia-probe-", dir=parent))
    except OSError as e:
        raise HywiaError(f"cannot write in {parent} ({e.strerror}); choose an --out in a folder you can write") from None


_HELD_LOCKS: dict[str, int] = {}


@contextlib.contextmanager
def claim_output(out: str | Path) -> Iterator[None]:
    """Hold an exclusive lock on `out` for the block, so a second hywia process writing the same output is refused
    at once instead of racing it (POSIX; the lock is released by the kernel if the process dies)."""
    key = str(Path(out).expanduser().resolve())
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, the atomic rename still keeps every folder whole
        yield
        return
    if key in _HELD_LOCKS:  # re-entered in this process (the CLI holds it, save_model asks again)
        yield
        return
    folder = cache_dir() / "locks"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        folder = Path(tempfile.gettempdir()) / "hywia-locks"
        folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / (hashlib.sha1(key.encode()).hexdigest()[:20] + ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise HywiaError(f"another hywia process (pid {owner}) is writing {out}; wait for it to finish or choose another --out") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    _HELD_LOCKS[key] = fd
    try:
        yield
    finally:
        del _HELD_LOCKS[key]
        os.close(fd)  # the file stays: unlinking a lock file races with a process about to take it


def _temporary_name(out: Path, kind: str) -> str:
    return f".{out.name}.hywia-{os.getpid()}-{kind}"


def clear_stale(out: Path) -> list[Path]:
    """Remove the temporary siblings of `out` (folders, or files of a GGUF export) that hywia runs left when they were
    killed outright (their pid is gone), and warn about each by name; those of live processes are left alone."""
    pattern = re.compile(rf"\.{re.escape(out.name)}\.hywia-(\d+)-\w+(\.tmp)?")
    removed = []
    if not out.parent.is_dir():
        return removed
    for path in out.parent.iterdir():
        match = pattern.fullmatch(path.name)
        if match and int(match[1]) != os.getpid() and not process_running(int(match[1])):
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
            warnings.warn(f"removed {path}, a temporary folder left by an earlier hywia run (pid {match[1]}) that was killed", stacklevel=3)
            removed.append(path)
    return removed


@contextlib.contextmanager
def deferred_signals() -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP arriving inside the block take effect when it ends, so a rename pair (old output
    aside, new output in) is never cut in half. Python runs signal handlers in the main thread only, so outside it
    there is nothing to defer."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    names = [n for n in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, n)]
    pending: list[int] = []
    previous = {n: signal.signal(getattr(signal, n), lambda signum, frame: pending.append(signum)) for n in names}
    try:
        yield
    finally:
        for n, handler in previous.items():
            signal.signal(getattr(signal, n), handler)
        if pending:
            signal.raise_signal(pending[0])


@contextlib.contextmanager
def atomic_dir(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces `out` in one rename, on failure it vanishes."""
    out = check_output(out, overwrite)
    with claim_output(out):
        clear_stale(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=_temporary_name(out, ""), suffix=".tmp", dir=out.parent))
        try:
            as_user_folder(tmp)  # mkdtemp makes 0700
            yield tmp
            for path in tmp.rglob("*"):  # what libraries wrote through temporary files of their own (safetensors: 0600)
                if not path.is_symlink():  # chmod would follow a link out of the output
                    (as_user_folder if path.is_dir() else as_user_file)(path)
            with deferred_signals():
                check_output(out, overwrite)  # a folder someone made meanwhile is not replaced without --overwrite
                if out.exists():
                    old = out.with_name(_temporary_name(out, "old"))
                    out.rename(old)
                    tmp.rename(out)
                    shutil.rmtree(old)
                else:
                    tmp.rename(out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
