"""Where a job's files live: a local folder, a folder every node mounts, or a
URI of any pyarrow filesystem (``s3://``, ``gs://``, ``hdfs://``).

Every job reads and writes its outputs, datasets and checkpoints through the
helpers here, which take either kind of location: ``join``, ``exists``,
``read_bytes``/``write_bytes`` (and text, JSON), ``listdir``, ``glob``,
``remove``, ``write_dir`` (a folder built locally, then put in place),
``upload``/``download`` (a folder between a local staging folder and the
location) and :class:`Appender` (a JSON-lines log). A write to a URI
appears whole or not at all: a file is one object, and a folder written with
``write_dir`` is marked complete by its manifest, written last (readers skip
a folder whose write is under way or failed: :func:`folder_files`). A
checkpoint folder is complete when its state file is there.

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
import logging
import os
import shutil
import tempfile
import uuid
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Optional, Union

from aesformer.config import ConfigError

log = logging.getLogger(__name__)


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
    return sorted({PurePosixPath(i.path).name for i in infos} - set(MARKERS))


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


def download(location: Location, local: Location, only: Optional[list[str]] = None) -> Path:
    """Copy the folder (or file) at ``location`` to the local path ``local``;
    ``only``: just these files of the folder (paths relative to it)."""
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
    elif only is not None:
        files = [(f"{path}/{rel}", local / rel) for rel in only]
        local.mkdir(parents=True, exist_ok=True)
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


# -- folders at a URI: complete or not there -----------------------------------------------
#
# An object store writes one object at a time, so a folder written there is
# marked. write_dir uploads the new folder under a hidden sibling
# (``.<name>.tmp-<token>``), which no reader looks at; only then does it put
# the marker of a write in progress in the folder, replace the folder's files
# with the uploaded ones (copies inside the store) and write the folder's
# manifest, the marker of a complete folder, last, before it takes the first
# marker away. A reader (local_copy, the dataset finders, checkpoint
# discovery) sees a folder with the manifest as exactly the files it lists, a
# folder with the marker of a write in progress as not there, and a folder
# with neither marker (one the project did not write, such as a user's model)
# as everything in it. A write that fails before the swap leaves the previous
# folder as it was; one that dies during the swap leaves a folder no reader
# uses until the next write of it, which also removes the leftovers.

COMPLETE = ".aesformer-complete"  # the manifest: {"files": {path: size}, "token", "written_at"}
WRITING = ".aesformer-writing"    # a write of the folder is under way (or died)
MARKERS = (COMPLETE, WRITING)


class IncompleteFolder(FileNotFoundError):
    """A folder at a URI that is being written, or whose write failed: nothing in it is read."""


def _staging_prefix(location: str) -> str:
    return f".{name(location)}.tmp-"


def folder_files(location: Location) -> Optional[dict[str, int]]:
    """What a reader may take from the folder at ``location``: {path relative
    to it: size} when :func:`write_dir` wrote it (its manifest), None for a
    local folder or a folder at a URI the project did not write (all of it).
    Raises :class:`IncompleteFolder` while a write of it is under way or
    after one failed half-way."""
    if not is_uri(location):
        return None
    manifest = _manifest(location)
    if manifest is None:
        return None
    return {str(k): int(v) for k, v in manifest["files"].items()}


def _manifest(location: Location) -> Optional[dict]:
    """The folder's manifest; None when it has no markers; IncompleteFolder."""
    import pyarrow.fs as pafs

    fs, path = filesystem(location)
    complete, writing = fs.get_file_info([f"{path}/{COMPLETE}", f"{path}/{WRITING}"])
    if writing.type != pafs.FileType.NotFound:
        raise IncompleteFolder(f"{location} is being written, or its last write failed half-way (it holds "
                               f"{WRITING}); nothing in it is read until a write of it completes")
    if complete.type == pafs.FileType.NotFound:
        return None
    try:
        manifest = json.loads(read_text(join(location, COMPLETE)))
        manifest["files"] = dict(manifest["files"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise IncompleteFolder(f"{location}: its manifest {COMPLETE} does not read ({e})") from None
    return manifest


def is_complete(location: Location) -> bool:
    """True when the folder exists and is not a folder being written (or whose write failed)."""
    try:
        folder_files(location)
    except IncompleteFolder:
        return False
    return is_dir(location)


def _files_of(folder: Path) -> dict[str, int]:
    return {f.relative_to(folder).as_posix(): f.stat().st_size for f in sorted(folder.rglob("*"))
            if f.is_file() and f.name not in MARKERS}


def _clear(location: str, keep: tuple[str, ...] = ()) -> None:
    """Delete everything under the folder at a URI but the entries named in ``keep``."""
    import pyarrow.fs as pafs

    fs, path = filesystem(location)
    for info in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True)):
        entry = PurePosixPath(info.path).name
        if entry in keep:
            continue
        if info.type == pafs.FileType.Directory:
            fs.delete_dir(info.path)
        else:
            fs.delete_file(info.path)


def write_dir(location: Location, write: Callable[[Path], Any]) -> str:
    """Run ``write(folder)`` on a fresh local folder, then put it in place of
    ``location``: an atomic swap on a local disk; at a URI a staged upload,
    a swap and the manifest last (see above), so that readers see the old
    folder or the new one, never part of one. Returns the location."""
    if not is_uri(location):
        from aesformer.atomic import write_dir as write_local

        return str(write_local(_local(location), write))
    given, location = str(location), str(location).rstrip("/")
    up = parent(location)
    # leftovers of writes of this folder that died (a folder has one writer at a time)
    for entry in listdir(up):
        if entry.startswith(_staging_prefix(location)):
            remove(join(up, entry))
    token = uuid.uuid4().hex[:12]
    staged = join(up, _staging_prefix(location) + token)
    with tempfile.TemporaryDirectory(prefix="aesformer-upload-") as tmp:
        local = Path(tmp)
        write(local)
        files = _files_of(local)
        try:
            upload(local, staged)
            _swap(location, staged, local, files, token)
        finally:
            try:
                remove(staged)
            except OSError as e:  # a leftover the next write of this folder removes
                log.warning("could not remove the staging folder %s: %s", staged, e)
    return given


def _swap(location: str, staged: str, local: Path, files: dict[str, int], token: str) -> None:
    """Put the uploaded folder ``staged`` in place of ``location``."""
    import time

    write_json(join(location, WRITING), {"token": token, "since": time.time()})
    _clear(location, keep=(WRITING,))
    fs, src = filesystem(staged)
    _, dst = filesystem(location)

    def put(rel: str):
        def job():
            try:
                fs.copy_file(f"{src}/{rel}", f"{dst}/{rel}")  # inside the store
            except OSError:  # e.g. an object above the store's limit for one copy: upload it again
                with open(local / rel, "rb") as f_in, fs.open_output_stream(f"{dst}/{rel}") as f_out:
                    _copy_stream(f_in, f_out)
        return job

    _parallel([put(rel) for rel in files])
    write_json(join(location, COMPLETE), {"files": files, "token": token, "written_at": time.time()})
    remove(join(location, WRITING))


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
    downloads again). A folder :func:`write_dir` wrote is copied as its
    manifest lists it; one being written raises :class:`IncompleteFolder`."""
    if not is_uri(location):
        return str(location)
    from filelock import FileLock

    uri = str(location).rstrip("/")
    if not is_dir(uri):
        raise FileNotFoundError(f"{uri} is not a folder")
    key = hashlib.sha256(uri.encode()).hexdigest()[:16]
    cache = Path(cache).expanduser() if cache is not None else model_cache()
    cache.mkdir(parents=True, exist_ok=True)
    for _ in range(3):
        manifest = _manifest(uri)
        if manifest is None:
            content = _fingerprint(uri)
        else:
            content = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:16]
        final = cache / f"{name(uri) or 'root'}-{key}-{content}"
        with FileLock(str(final) + ".lock"):
            if final.is_dir():
                return str(final)
            tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=cache))
            try:
                try:
                    download(uri, tmp / "d", None if manifest is None else sorted(manifest["files"]))
                    again = _manifest(uri)
                except OSError:  # a file went: the folder is being written again
                    if manifest is None:
                        raise
                    again = {}
                if manifest is None or again == manifest:  # nobody rewrote it meanwhile
                    os.replace(tmp / "d", final)
                    return str(final)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        log.warning("%s was rewritten while it was being copied; copying it again", uri)
    raise IncompleteFolder(f"{uri} kept changing while it was being copied (3 tries)")


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
