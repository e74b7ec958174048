"""Where a job's files live: a local folder, a folder every node mounts, or a
URI of any pyarrow filesystem (``s3://``, ``gs://``, ``hdfs://``).

Every job reads and writes its outputs, datasets and checkpoints through the
helpers here, which take either kind of location: ``join``, ``exists``,
``read_bytes``/``write_bytes`` (and text, JSON), ``listdir``, ``glob``,
``remove``, ``write_dir`` (a folder built locally, then put in place),
``upload``/``download`` (a folder between a local staging folder and the
location) and :class:`Appender` (a JSON-lines log). A write to a URI
appears whole or not at all (one object per file); a folder is complete
when the file that marks it (a checkpoint's state file) is there.

A model or checkpoint at a URI is read through :func:`local_copy`: each node
downloads it once into its own cache (``AESFORMER_MODEL_CACHE``, default
``~/.cache/aesformer/from-uri``) and loads it from there. Credentials and
endpoints come from each node's environment, as the filesystem reads them
(for S3: ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL``).

On a cluster each node has its own disk: a file the learner writes on a GPU
node is not on the head where the driver runs. :func:`check_shared` proves a
job's local ``output`` is visible everywhere by writing a probe file from
the driver and asking a task pinned to every alive node whether it sees it;
a folder some node does not see fails before any work, naming the nodes and
what to use instead.
"""
from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Optional, Union

from aesformer.config import ConfigError


def _alive_nodes(ray) -> list[dict]:
    return [n for n in ray.nodes() if n.get("Alive")]


def node_label(node: dict) -> str:
    res = node.get("Resources", {})
    if "node:__internal_head__" in res:
        return "head"
    custom = sorted(k for k in res if k not in ("CPU", "GPU", "memory", "object_store_memory")
                    and not k.startswith(("node:", "accelerator_type")))
    return ",".join(custom) or node["NodeID"][:8]


def on_every_node(ray, fn, *args, timeout: float = 120.0) -> dict[str, object]:
    """Run ``fn(*args)`` once on every alive node (a task pinned to it, no CPU);
    returns {node label: result}."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    task = ray.remote(num_cpus=0, max_retries=0)(fn)
    nodes = _alive_nodes(ray)
    refs = [task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(*args)
            for n in nodes]
    return dict(zip((node_label(n) for n in nodes), ray.get(refs, timeout=timeout)))


def _sees(path: str) -> bool:
    return os.path.exists(path)


def check_shared(folder: str, ray, key: str = "output") -> None:
    """Raise ConfigError unless every alive node sees ``folder`` (a local
    path). One node: nothing to check."""
    if len(_alive_nodes(ray)) < 2:
        return
    root = Path(folder).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    probe = root / f".shared-probe-{uuid.uuid4().hex[:8]}"
    probe.write_text("probe")
    try:
        seen = on_every_node(ray, _sees, str(probe))
    finally:
        probe.unlink(missing_ok=True)
    blind = sorted(name for name, ok in seen.items() if not ok)
    if blind:
        raise ConfigError(
            f"{key}='{folder}' is on this node's disk only: node(s) {', '.join(blind)} of this {len(seen)}-node "
            f"cluster do not see it, so checkpoints and results written there would be lost or unreadable. "
            f"Use a folder every node mounts (a shared filesystem) or a URI every node reaches (s3://bucket/path, "
            f"gs://..., hdfs://...) for {key}.")


def check_visible(path: str, ray, key: str) -> None:
    """Raise ConfigError unless every alive node sees the local ``path`` (an
    input the workers read: a file or a folder). A URI or one node: nothing to check."""
    if is_uri(path) or len(_alive_nodes(ray)) < 2:
        return
    local = str(Path(path).expanduser().resolve())
    seen = on_every_node(ray, _sees, local)
    blind = sorted(name for name, ok in seen.items() if not ok)
    if blind:
        raise ConfigError(
            f"{key}='{path}' is on this node's disk only: node(s) {', '.join(blind)} of this {len(seen)}-node "
            f"cluster do not see it, and their workers read it. Put it on a folder every node mounts or at a URI "
            f"(s3://bucket/path, gs://..., hdfs://...).")


def is_local_path(uri: Optional[str]) -> bool:
    return uri is None or not is_uri(uri)


def check_across_nodes(cfg, ray, paths: tuple[str, ...] = ("output",)) -> int:
    """What a job checks before any work on a cluster of several nodes: the
    tracking store is not a file on the driver's disk, and each of ``paths``
    (config keys naming folders) is a folder every node sees. Returns the
    number of alive nodes."""
    from aesformer.tracking import check_tracking_across_nodes

    nodes = len(_alive_nodes(ray))
    check_tracking_across_nodes(cfg, nodes)
    for key in paths:
        value = getattr(cfg, key, None)
        if value and is_local_path(value):
            check_shared(str(value), ray, key)
    return nodes


# -- locations: a local path or a URI of a pyarrow filesystem ----------------------------

Location = Union[str, os.PathLike]
_FILESYSTEMS: dict[tuple, tuple[Any, str]] = {}


def is_uri(location: Optional[Location]) -> bool:
    """True for ``scheme://...`` other than ``file://`` (which is a local path)."""
    text = "" if location is None else str(location)
    return "://" in text and not text.startswith("file://")


def _local(location: Location) -> Path:
    text = str(location)
    return Path(text[len("file://"):] if text.startswith("file://") else text).expanduser()


def _split(uri: str) -> tuple[str, str, str]:
    """(``scheme://netloc``, path without its leading slash, ``?query`` or "")."""
    rest, _, query = uri.partition("?")
    scheme, _, after = rest.partition("://")
    netloc, _, path = after.partition("/")
    return f"{scheme}://{netloc}", path.strip("/"), f"?{query}" if query else ""


_FILESYSTEM_ENV = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                   "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_REGION")


def filesystem(location: Location) -> tuple[Any, str]:
    """(pyarrow filesystem, path inside it) for a local path or a URI; one
    filesystem object per bucket (or host) and query."""
    import pyarrow.fs as pafs

    if not is_uri(location):
        return pafs.LocalFileSystem(), str(_local(location).resolve())
    root, path, query = _split(str(location))
    # the endpoint and credentials come from the environment when the filesystem
    # is made: a filesystem made under other settings is not reused
    key = (root + query, tuple(os.environ.get(k) for k in _FILESYSTEM_ENV))
    if key not in _FILESYSTEMS:
        fs, root_path = pafs.FileSystem.from_uri(f"{root}/{query}")
        _FILESYSTEMS[key] = (fs, root_path.rstrip("/"))
    fs, root_path = _FILESYSTEMS[key]
    return fs, f"{root_path}/{path}" if path else (root_path or "/")


def join(location: Location, *parts: str) -> str:
    """``location/part/...``: a path for a local location, a URI for a URI
    (its query, if any, kept at the end)."""
    if not is_uri(location):
        return str(_local(location).joinpath(*parts))
    root, path, query = _split(str(location))
    tail = "/".join(p.strip("/") for p in (path, *parts) if p and p.strip("/"))
    return f"{root}/{tail}{query}"


def name(location: Location) -> str:
    """The last part of a location."""
    if not is_uri(location):
        return _local(location).name
    return PurePosixPath(_split(str(location))[1]).name


def parent(location: Location) -> str:
    if not is_uri(location):
        return str(_local(location).parent)
    root, path, query = _split(str(location))
    up = str(PurePosixPath(path).parent)
    return f"{root}/{'' if up == '.' else up}{query}"


def resolve(location: Location) -> str:
    """An absolute local path (``~`` expanded), or the URI unchanged."""
    return str(location) if is_uri(location) else str(_local(location).resolve())


def _info(location: Location):
    fs, path = filesystem(location)
    return fs.get_file_info(path)


def exists(location: Location) -> bool:
    import pyarrow.fs as pafs

    if not is_uri(location):
        return _local(location).exists()
    return _info(location).type != pafs.FileType.NotFound


def is_dir(location: Location) -> bool:
    import pyarrow.fs as pafs

    if not is_uri(location):
        return _local(location).is_dir()
    return _info(location).type == pafs.FileType.Directory


def is_file(location: Location) -> bool:
    import pyarrow.fs as pafs

    if not is_uri(location):
        return _local(location).is_file()
    return _info(location).type == pafs.FileType.File


def mtime(location: Location) -> float:
    if not is_uri(location):
        return _local(location).stat().st_mtime
    info = _info(location)
    return info.mtime.timestamp() if info.mtime is not None else 0.0


def makedirs(location: Location) -> None:
    """A local folder is created; a URI's folders exist once a file is in them."""
    if not is_uri(location):
        _local(location).mkdir(parents=True, exist_ok=True)


def read_bytes(location: Location) -> bytes:
    """The file's bytes; FileNotFoundError naming the location when it is not there."""
    if not is_uri(location):
        return _local(location).read_bytes()
    fs, path = filesystem(location)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except FileNotFoundError:
        raise
    except OSError as e:
        if not exists(location):
            raise FileNotFoundError(f"{location} does not exist") from e
        raise


def read_text(location: Location) -> str:
    return read_bytes(location).decode("utf-8")


def read_json(location: Location) -> Any:
    return json.loads(read_text(location))


def write_bytes(location: Location, data: bytes) -> str:
    """Write a whole file: atomically on a local disk (temporary + rename), as
    one object at a URI (it appears once complete)."""
    if not is_uri(location):
        from aesformer.atomic import write_bytes as write_local

        return str(write_local(_local(location), data))
    fs, path = filesystem(location)
    with fs.open_output_stream(path) as f:
        f.write(data)
    return str(location)


def write_text(location: Location, text: str) -> str:
    return write_bytes(location, text.encode("utf-8"))


def write_json(location: Location, obj: Any, *, indent: Optional[int] = 1, sort_keys: bool = False) -> str:
    """JSON as UTF-8 (non-ASCII kept); values JSON lacks go through ``str``."""
    return write_text(location, json.dumps(obj, indent=indent, sort_keys=sort_keys, ensure_ascii=False, default=str))


def listdir(location: Location) -> list[str]:
    """Names of the entries right inside a folder (none when it does not exist), sorted."""
    import pyarrow.fs as pafs

    if not is_uri(location):
        folder = _local(location)
        return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    fs, path = filesystem(location)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted({PurePosixPath(i.path).name for i in infos})


def glob(location: Location, pattern: str) -> list[str]:
    """Entries under a folder matching a relative glob (``step-*``, ``*/*``; no ``**``)."""
    if not is_uri(location):
        return sorted(str(p) for p in _local(location).glob(pattern))
    found = [str(location)]
    for part in pattern.strip("/").split("/"):
        found = [join(f, n) for f in found for n in listdir(f) if fnmatch.fnmatchcase(n, part)]
    return sorted(found)


def remove(location: Location) -> None:
    """Delete a file or a folder with everything in it; nothing when absent."""
    import pyarrow.fs as pafs

    if not is_uri(location):
        p = _local(location)
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        return
    fs, path = filesystem(location)
    kind = fs.get_file_info(path).type
    if kind == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif kind == pafs.FileType.File:
        fs.delete_file(path)


def _copy_stream(src, dst) -> None:
    while True:
        chunk = src.read(8 << 20)
        if not chunk:
            return
        dst.write(chunk)


def _parallel(jobs: list[Callable[[], Any]]) -> None:
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=8) as pool:
        for done in [pool.submit(job) for job in jobs]:
            done.result()


def upload(local: Location, location: Location) -> str:
    """Copy a local folder's files (recursively) into ``location``; returns it."""
    local = _local(local)
    if not is_uri(location):
        shutil.copytree(local, _local(location), dirs_exist_ok=True)
        return str(location)
    fs, path = filesystem(location)

    def put(file: Path):
        def job():
            with open(file, "rb") as src, fs.open_output_stream(f"{path}/{file.relative_to(local).as_posix()}") as dst:
                _copy_stream(src, dst)
        return job

    _parallel([put(f) for f in sorted(local.rglob("*")) if f.is_file()])
    return str(location)


def download(location: Location, local: Location) -> Path:
    """Copy the folder (or file) at ``location`` to the local path ``local``."""
    import pyarrow.fs as pafs

    local = _local(local)
    if not exists(location):
        raise FileNotFoundError(f"{location} does not exist")
    if not is_uri(location):
        if is_dir(location):
            shutil.copytree(_local(location), local, dirs_exist_ok=True)
        else:
            local.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(_local(location), local)
        return local
    fs, path = filesystem(location)
    if fs.get_file_info(path).type == pafs.FileType.File:
        files = [(path, local)]
    else:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
        files = [(i.path, local / i.path[len(path):].lstrip("/")) for i in infos if i.type == pafs.FileType.File]
        local.mkdir(parents=True, exist_ok=True)

    def get(source: str, target: Path):
        def job():
            target.parent.mkdir(parents=True, exist_ok=True)
            with fs.open_input_stream(source) as src, open(target, "wb") as dst:
                _copy_stream(src, dst)
        return job

    _parallel([get(src, dst) for src, dst in files])
    return local


def write_dir(location: Location, write: Callable[[Path], Any]) -> str:
    """Run ``write(folder)`` on a fresh local folder, then put it in place of
    ``location``: an atomic swap on a local disk; at a URI the old folder's
    files are removed and the new ones uploaded. Returns the location."""
    if not is_uri(location):
        from aesformer.atomic import write_dir as write_local

        return str(write_local(_local(location), write))
    with tempfile.TemporaryDirectory(prefix="aesformer-upload-") as tmp:
        write(Path(tmp))
        remove(location)
        upload(tmp, location)
    return str(location)


def ray_train_storage(location: Location) -> tuple[dict, Callable[[str], str]]:
    """Ray Train's ``RunConfig`` storage for runs under ``location`` (its
    ``storage_path``, and for a URI its pyarrow ``storage_filesystem``), and
    the function that turns a checkpoint path Ray reports into a location."""
    if not is_uri(location):
        return {"storage_path": resolve(location)}, str
    fs, path = filesystem(location)
    return ({"storage_path": path, "storage_filesystem": fs},
            lambda reported: join(location, str(reported)[len(path):].lstrip("/")))


def model_cache() -> Path:
    """This node's cache of folders copied from URIs."""
    return Path(os.environ.get("AESFORMER_MODEL_CACHE", "~/.cache/aesformer/from-uri")).expanduser()


def _fingerprint(location: str) -> str:
    """What a folder at a URI holds: each file's path, size and time."""
    import pyarrow.fs as pafs

    fs, path = filesystem(location)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    rows = sorted((i.path[len(path):], i.size, i.mtime_ns) for i in infos if i.type == pafs.FileType.File)
    return hashlib.sha256(json.dumps(rows, default=str).encode()).hexdigest()[:16]


def local_copy(location: Location, cache: Optional[Location] = None) -> str:
    """A local path holding ``location``'s folder: the path itself when local;
    for a URI, a copy in this node's cache (``cache``, default
    :func:`model_cache`), downloaded once per content (a changed folder
    downloads again)."""
    if not is_uri(location):
        return str(location)
    from filelock import FileLock

    uri = str(location).rstrip("/")
    if not is_dir(uri):
        raise FileNotFoundError(f"{uri} is not a folder")
    key = hashlib.sha256(uri.encode()).hexdigest()[:16]
    cache = Path(cache).expanduser() if cache is not None else model_cache()
    cache.mkdir(parents=True, exist_ok=True)
    final = cache / f"{name(uri) or 'root'}-{key}-{_fingerprint(uri)}"
    with FileLock(str(final) + ".lock"):
        if not final.is_dir():
            tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=cache))
            try:
                download(uri, tmp / "d")
                os.replace(tmp / "d", final)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return str(final)


def staging(location: Location) -> Path:
    """A local folder for what a job keeps beside a URI output while it runs
    (its log file, an embedded tracking store): the same folder for the same
    URI on this machine. A local location is its own staging folder."""
    if not is_uri(location):
        return _local(location)
    key = hashlib.sha256(str(location).encode()).hexdigest()[:16]
    folder = Path(os.environ.get("AESFORMER_STAGING", "~/.cache/aesformer/staging")).expanduser() / key
    folder.mkdir(parents=True, exist_ok=True)
    return folder


class Appender:
    """A JSON-lines file that grows a record at a time: appended in place on a
    local disk, rewritten whole at a URI (objects cannot grow). ``keep``
    drops records, e.g. the steps after the checkpoint a run resumes from."""

    def __init__(self, location: Location):
        self.location = str(location)
        self.uri = is_uri(location)
        self.lines: list[str] = []
        if self.uri and exists(self.location):
            self.lines = read_text(self.location).splitlines()

    def keep(self, predicate: Callable[[dict], bool]) -> None:
        lines = self.lines if self.uri else (
            _local(self.location).read_text().splitlines() if _local(self.location).exists() else [])
        kept = [line for line in lines if line.strip() and predicate(json.loads(line))]
        if self.uri:
            self.lines = kept
            write_text(self.location, "".join(line + "\n" for line in kept))
        elif _local(self.location).exists():
            _local(self.location).write_text("".join(line + "\n" for line in kept))

    def write(self, record: Any) -> None:
        line = json.dumps(record, ensure_ascii=False, default=str)
        if self.uri:
            self.lines.append(line)
            write_text(self.location, "".join(x + "\n" for x in self.lines))
        else:
            path = _local(self.location)
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a") as f:
                f.write(line + "\n")
