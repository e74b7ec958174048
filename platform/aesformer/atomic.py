"""Atomic writes: a reader sees the old file or the new one, never half of one.

Every job writes its results, states and checkpoints through these. A file
is written beside its final name under a hidden temporary name and moved
into place with one rename; a folder is built whole under a temporary name
and swapped in. A crash leaves at most a hidden ``.<name>.tmp*`` behind.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable

PathLike = str | os.PathLike


def _tmp_beside(path: Path) -> Path:
    # the pid keeps two writers of the same file from sharing a temporary
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def write_bytes(path: PathLike, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_beside(path)
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_text(path: PathLike, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: PathLike, obj: Any, *, indent: int | None = 1, sort_keys: bool = False) -> Path:
    """JSON as UTF-8 (non-ASCII kept as is); values JSON lacks go through ``str``."""
    return write_text(path, json.dumps(obj, indent=indent, sort_keys=sort_keys, ensure_ascii=False, default=str))


def write_jsonl(path: PathLike, records: Iterable[Any]) -> int:
    """One JSON object a line; returns how many lines were written."""
    lines = [json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in records]
    write_text(path, "".join(lines))
    return len(lines)


def replace_dir(tmp: PathLike, final: PathLike) -> Path:
    """Put the finished folder ``tmp`` in place of ``final`` (which may exist)."""
    tmp, final = Path(tmp), Path(final)
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final


def write_dir(final: PathLike, write: Callable[[Path], Any], *, mode: int = 0o755) -> Path:
    """Run ``write(tmp_folder)``, then swap the finished folder in as ``final``.

    A failure removes the temporary folder and leaves ``final`` as it was."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        write(tmp)
        os.chmod(tmp, mode)  # mkdtemp makes it private; shared caches and outputs must be readable
        return replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
