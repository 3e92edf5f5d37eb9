"""File modes of what hywia writes: the modes any file or folder the user makes would get under their umask.

Outputs are written to temporary names and renamed into place; `tempfile` makes those 0600 (files) and 0700 (folders),
which a rename would carry over, so a model meant to be shared could be read by nobody else on the machine.
"""
from __future__ import annotations

import os
from pathlib import Path


def umask() -> int:
    """The process's umask (read by setting it and putting it back)."""
    mask = os.umask(0o22)
    os.umask(mask)
    return mask


def as_user_file(path: Path) -> None:
    """The mode open() would have given the file: 0666 less the umask."""
    os.chmod(path, 0o666 & ~umask())


def as_user_folder(path: Path) -> None:
    """The mode mkdir() would have given the folder: 0777 less the umask."""
    os.chmod(path, 0o777 & ~umask())
