"""Package this project's code as a wheel, with the standard library alone.

Ray puts a job's working directory (the repository root) on its workers'
path, where neither ``aesformer`` (inside platform/) nor ``aesformer.actors``
(actors/) is importable. A wheel of the package mapping fixes both: Ray
installs a ``.whl`` listed in ``py_modules`` on every worker, and the driver
can import straight from the wheel file (it is a zip of pure Python).

This module must not import anything from ``aesformer`` or third parties: the
job files load it by path before the package is importable.
"""
from __future__ import annotations

import base64
import hashlib
import os
import tempfile
import zipfile
from pathlib import Path

# package name → folder, relative to the repository root (pyproject's package-dir)
PACKAGE_DIRS = {"aesformer": "platform/aesformer", "aesformer/actors": "actors", "aesformer/jobs": "jobs"}
DIST = "aesformer"
VERSION = "0.1.0"


def repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


def _sources(root: Path) -> list[tuple[str, Path]]:
    files = []
    for pkg, folder in PACKAGE_DIRS.items():
        base = root / folder
        for path in sorted(base.rglob("*.py")):
            rel = path.relative_to(base)
            if "__pycache__" in rel.parts:
                continue
            files.append((f"{pkg}/{rel.as_posix()}", path))
    return files


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def build_wheel(root: Path | None = None, out_dir: Path | None = None) -> Path:
    """Write ``aesformer-<ver>+<hash>-py3-none-any.whl`` and return its path.

    The file name carries a hash of the sources so that Ray's content-addressed
    upload of py_modules never serves a stale copy, and repeated calls reuse
    the file.
    """
    if root is None:
        here = Path(__file__).resolve()
        wheels = [p for p in here.parents if p.suffix == ".whl"]
        if wheels:  # imported from a wheel already: ship that same file
            return wheels[0]
        root = repo_root()
    root = Path(root)
    files = [(arc, p.read_bytes()) for arc, p in _sources(root)]
    if not files:
        raise FileNotFoundError(f"no package sources under {root} (expected {', '.join(PACKAGE_DIRS.values())})")
    h = hashlib.sha256()
    for arc, data in files:
        h.update(arc.encode())
        h.update(data)
    tag = h.hexdigest()[:12]
    out_dir = Path(out_dir) if out_dir else Path(tempfile.gettempdir()) / "aesformer-wheels"
    out_dir.mkdir(parents=True, exist_ok=True)
    version = f"{VERSION}+g{tag}"
    wheel = out_dir / f"{DIST}-{version}-py3-none-any.whl"
    if wheel.exists():
        return wheel
    info = f"{DIST}-{version}.dist-info"
    meta = {
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {DIST}\nVersion: {version}\n".encode(),
        f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: aesformer.shipping\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        f"{info}/top_level.txt": b"aesformer\n",
    }
    tmp = wheel.with_suffix(f".tmp{os.getpid()}")
    records = []
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
        for arc, data in files + list(meta.items()):
            zf.writestr(arc, data)
            records.append(_record_line(arc, data))
        records.append(f"{info}/RECORD,,")
        zf.writestr(f"{info}/RECORD", "\n".join(records) + "\n")
    os.replace(tmp, wheel)
    return wheel
