"""hywia's own folders: its cache, and scratch folders for what a prune spills to disk (second moments, the layers
built aside).

A prune cleans up its folders when it ends, even on an error or Ctrl-C; a killed process (SIGKILL, out of memory)
cannot, and at 0.5B one such folder holds 9 GB. So each folder's name carries its process id and holds a MARK file,
and making a folder first removes those, marked as hywia's, of processes that no longer run: the next prune cleans
up after a killed one, and a folder hywia did not write is never touched, whatever its name.
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

from .errors import HywiaError


def cache_dir() -> Path:
    """hywia's cache: joined GGUF parts, converted packaged models, output locks, logs (HYWIA_CACHE_DIR)."""
    return Path(os.environ.get("HYWIA_CACHE_DIR", Path.home() / ".cache" / "hywia")).expanduser()


MARK = ".hywia-scratch"  # written into every scratch folder: what makes a folder hywia's to remove


def scratch_dir(kind: str) -> tempfile.TemporaryDirectory:
    """A temporary folder `hywia-KIND-PID-*`, after removing every marked `hywia-*-PID-*` folder whose process is gone."""
    root = Path(tempfile.gettempdir())
    for folder in root.glob("hywia-*-*-*"):
        match = re.fullmatch(r"hywia-[a-z]+-(\d+)-\w+", folder.name)
        if match and (folder / MARK).is_file() and not process_running(int(match[1])):
            shutil.rmtree(folder, ignore_errors=True)
    made = tempfile.TemporaryDirectory(prefix=f"hywia-{kind}-{os.getpid()}-")
    (Path(made.name) / MARK).touch()
    return made


def process_running(pid: int) -> bool:
    """Whether process `pid` still runs (another user's process counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it runs
        return True
    return True


def check_room(needed: int, what: str) -> None:
    """Refuse, before any work, a prune whose scratch files would fill the temporary folder's disk hours into it."""
    root = tempfile.gettempdir()
    free = shutil.disk_usage(root).free
    if needed > free:
        raise HywiaError(f"this prune keeps up to {needed / 1e9:.1f} GB on disk ({what}) in {root}, which has "
                         f"{free / 1e9:.1f} GB free: set TMPDIR to a folder on a disk with room")
