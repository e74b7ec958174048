"""AesRecon: the (poor, good, plan) pair dataset and its on-disk forms.

Pairs live as sharded Parquet with an explicit schema (:data:`PAIR_SCHEMA`),
images stored as their encoded bytes. A folder of pairs looks like::

    pairs/
      part-00000.parquet     finished shards (the only files readers see)
      part-00001.parquet
      .part-00002.parquet.tmp   a shard being written (hidden; renamed when done)
      _quarantine.jsonl      rows an import refused, with the reason

:class:`ShardWriter` writes each shard under a hidden temporary name and
renames it into place, so a crash never leaves a partial shard visible; a
new writer on the same folder learns which ids are done and skips them.
Readers (:func:`read_pairs`, :func:`iter_pairs`, :func:`read_ray`) list
finished shards only and check each file's schema, naming the file and
field that do not match.

Scores and decisions are stored Parquet/pandas/HF-datasets friendly as lists
of structs: ``scores = [{"name": "iqa", "value": 0.71}, ...]`` and
``decisions = [{"stage": "good_frame", "decision": "keep", "reason": "..."}]``
(:func:`row_scores` turns the former into a dict).

Also here: the deterministic train/test split by id hash, import from and
export to the released folder layout, an SFT chat export, and a contact sheet.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import re
import textwrap
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Optional, Sequence, Union

import pyarrow as pa
import pyarrow.parquet as pq

from aesformer.atomic import write_json
from aesformer.actions import ActionPlan, PlanFormatError, thinker_instruction

log = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

SCORES_TYPE = pa.list_(pa.struct([("name", pa.string()), ("value", pa.float64())]))
DECISIONS_TYPE = pa.list_(pa.struct([("stage", pa.string()), ("decision", pa.string()), ("reason", pa.string())]))
PROVENANCE_TYPE = pa.struct([("job", pa.string()), ("config", pa.string()), ("version", pa.string())])

PAIR_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),  # unique pair id
        pa.field("video_id", pa.string()),  # source video
        pa.field("segment_start", pa.float64()),  # event segment, seconds into the video
        pa.field("segment_end", pa.float64()),
        pa.field("poor_time", pa.float64()),  # when the poor frame was taken
        pa.field("good_time", pa.float64()),  # when the good frame was taken
        pa.field("poor_image", pa.binary(), nullable=False),  # encoded bytes (PNG/JPEG/…)
        pa.field("poor_format", pa.string()),  # "png", "jpeg", …
        pa.field("poor_width", pa.int32()),
        pa.field("poor_height", pa.int32()),
        pa.field("good_image", pa.binary(), nullable=False),
        pa.field("good_format", pa.string()),
        pa.field("good_width", pa.int32()),
        pa.field("good_height", pa.int32()),
        pa.field("transcript", pa.string()),  # speech of the segment
        pa.field("plan", pa.string()),  # rendered seven-line plan; null before distillation
        pa.field("split", pa.string()),  # "train", "test" or null
        pa.field("scores", SCORES_TYPE),  # per-stage scores (iqa, aesthetic, judge …)
        pa.field("decisions", DECISIONS_TYPE),  # per-stage keep/drop with reasons
        pa.field("provenance", PROVENANCE_TYPE),  # the job and config that made the row
    ],
    metadata={"aesformer.schema": "aesrecon.pair/1"},
)

IMAGE_FIELDS = ("poor_image", "good_image")
SPLITS = ("train", "test")
SHARD_RE = re.compile(r"^(?P<prefix>[^._][^/]*)-(?P<index>\d{5,})\.parquet$")


class PairError(ValueError):
    """Bad pair data; names the row, the field and the file where known."""

    def __init__(self, message: str, *, row: Any = None, field: Optional[str] = None, file: Optional[PathLike] = None):
        where = []
        if file is not None:
            where.append(f"file '{file}'")
        if row is not None:
            where.append(f"row '{row}'")
        if field is not None:
            where.append(f"field '{field}'")
        super().__init__(f"{', '.join(where)}: {message}" if where else message)
        self.reason = message
        self.row, self.field, self.file = row, field, None if file is None else str(file)


# -- images ---------------------------------------------------------------------------

def _norm_format(fmt: Optional[str]) -> str:
    f = (fmt or "png").lower().lstrip(".")
    return {"jpg": "jpeg"}.get(f, f)


def encode_image(image: Any, fmt: str = "png", quality: int = 95) -> bytes:
    """PIL image → encoded bytes (PNG lossless by default, or JPEG/WebP)."""
    fmt = _norm_format(fmt)
    img = image.convert("RGB") if image.mode not in ("RGB", "L") or fmt == "jpeg" else image
    buf = io.BytesIO()
    kwargs = {"quality": quality} if fmt in ("jpeg", "webp") else {}
    img.save(buf, format=fmt.upper(), **kwargs)
    return buf.getvalue()


def decode_image(data: Any, *, row: Any = None, field: Optional[str] = None, mode: Optional[str] = "RGB") -> Any:
    """Encoded bytes → a loaded PIL image (converted to ``mode``; None keeps it).

    Raises :class:`PairError` naming ``row`` and ``field`` when the bytes
    are missing or do not decode.
    """
    from PIL import Image

    if data is None or len(data) == 0:
        raise PairError("no image bytes", row=row, field=field)
    try:
        img = Image.open(io.BytesIO(bytes(data)))
        img.load()
    except Exception as exc:  # PIL raises several types for bad data
        raise PairError(f"image does not decode ({type(exc).__name__}: {exc})", row=row, field=field) from exc
    return img.convert(mode) if mode and img.mode != mode else img


def _image_entry(image: Any, *, row: Any, field: str, fmt: str, quality: int) -> tuple[bytes, str, int, int]:
    """(bytes, format, width, height) from a PIL image, encoded bytes or a file path."""
    if isinstance(image, (str, os.PathLike)):
        try:
            image = Path(image).read_bytes()
        except OSError as exc:
            raise PairError(f"cannot read image file: {exc}", row=row, field=field) from exc
    if isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
        img = decode_image(data, row=row, field=field, mode=None)
        return data, _norm_format(img.format), img.width, img.height
    if not hasattr(image, "save") or not hasattr(image, "size"):
        raise PairError(f"expected a PIL image, encoded bytes or a path, got {type(image).__name__}", row=row, field=field)
    data = encode_image(image, fmt, quality)
    return data, _norm_format(fmt), image.width, image.height


# -- rows -------------------------------------------------------------------------------

def make_provenance(job: Optional[str] = None, config: Any = None) -> dict:
    """The provenance struct: the job name, its config (as JSON text) and the
    aesformer version."""
    from aesformer import __version__

    if config is not None and not isinstance(config, str):
        if dataclasses.is_dataclass(config):
            config = dataclasses.asdict(config)
        config = json.dumps(config, sort_keys=True, default=str)
    return {"job": job, "config": config, "version": __version__}


def _scores_list(scores: Any) -> Optional[list[dict]]:
    if scores is None:
        return None
    if isinstance(scores, Mapping):
        return [{"name": str(k), "value": float(v)} for k, v in scores.items()]
    out = []
    for s in scores:
        name, value = (s["name"], s["value"]) if isinstance(s, Mapping) else s
        out.append({"name": str(name), "value": float(value)})
    return out


def _decisions_list(decisions: Any) -> Optional[list[dict]]:
    if decisions is None:
        return None
    out = []
    for d in decisions:
        stage, decision, reason = (d["stage"], d["decision"], d.get("reason")) if isinstance(d, Mapping) else d
        out.append({"stage": str(stage), "decision": str(decision), "reason": None if reason is None else str(reason)})
    return out


def _plan_text(plan: Any, *, row: Any, validate: bool) -> Optional[str]:
    if plan is None or (isinstance(plan, str) and not plan.strip()):
        return None
    if isinstance(plan, ActionPlan):
        return plan.render()
    if isinstance(plan, Mapping):
        try:
            return ActionPlan.from_dict(plan).render()
        except PlanFormatError as exc:
            raise PairError(str(exc), row=row, field="plan") from exc
    if not validate:
        return str(plan)
    try:
        return ActionPlan.parse(str(plan)).render()
    except PlanFormatError as exc:
        raise PairError(str(exc), row=row, field="plan") from exc


def make_pair(id: str, poor: Any, good: Any, *, video_id: Optional[str] = None,
              segment_start: Optional[float] = None, segment_end: Optional[float] = None,
              poor_time: Optional[float] = None, good_time: Optional[float] = None,
              transcript: Optional[str] = None, plan: Any = None, split: Optional[str] = None,
              scores: Any = None, decisions: Any = None, provenance: Optional[Mapping] = None,
              image_format: str = "png", quality: int = 95, validate_plan: bool = True) -> dict:
    """One pair row matching :data:`PAIR_SCHEMA`.

    ``poor``/``good``: PIL images (encoded as ``image_format``: "png" or
    "jpeg" at ``quality``), already-encoded bytes (kept as they are after a
    check that they decode) or image file paths. ``plan``: an ActionPlan,
    its text (validated and stored in canonical form unless
    ``validate_plan`` is False), a {key: text} dict, or None. ``scores``: a
    {name: value} dict or a list; ``decisions``: dicts or (stage, decision,
    reason) tuples. Bad images or plans raise :class:`PairError` naming the
    row and field.
    """
    if not id:
        raise PairError("a pair needs a non-empty id", field="id")
    if split is not None and split not in SPLITS:
        raise PairError(f"split must be one of {SPLITS} or None, got {split!r}", row=id, field="split")
    pb, pf, pw, ph = _image_entry(poor, row=id, field="poor_image", fmt=image_format, quality=quality)
    gb, gf, gw, gh = _image_entry(good, row=id, field="good_image", fmt=image_format, quality=quality)
    return {
        "id": str(id),
        "video_id": video_id,
        "segment_start": None if segment_start is None else float(segment_start),
        "segment_end": None if segment_end is None else float(segment_end),
        "poor_time": None if poor_time is None else float(poor_time),
        "good_time": None if good_time is None else float(good_time),
        "poor_image": pb, "poor_format": pf, "poor_width": pw, "poor_height": ph,
        "good_image": gb, "good_format": gf, "good_width": gw, "good_height": gh,
        "transcript": transcript,
        "plan": _plan_text(plan, row=id, validate=validate_plan),
        "split": split,
        "scores": _scores_list(scores),
        "decisions": _decisions_list(decisions),
        "provenance": dict(provenance) if provenance is not None else make_provenance(),
    }


def pair_images(row: Mapping) -> tuple[Any, Any]:
    """The (poor, good) PIL images of a row."""
    rid = row.get("id")
    return (decode_image(row.get("poor_image"), row=rid, field="poor_image"),
            decode_image(row.get("good_image"), row=rid, field="good_image"))


def row_plan(row: Mapping) -> Optional[ActionPlan]:
    """The row's plan parsed, None when it has none; PairError if malformed."""
    if not row.get("plan"):
        return None
    try:
        return ActionPlan.parse(row["plan"])
    except PlanFormatError as exc:
        raise PairError(str(exc), row=row.get("id"), field="plan") from exc


def row_scores(row: Mapping) -> dict[str, float]:
    """The row's scores as {name: value}."""
    return {s["name"]: s["value"] for s in (row.get("scores") or [])}


def check_row(row: Mapping, schema: pa.Schema = PAIR_SCHEMA) -> dict:
    """The row with absent nullable fields set to None, after checking every
    field against ``schema``; PairError names the row and the field."""
    rid = row.get("id")
    unknown = [k for k in row if schema.get_field_index(k) < 0]
    if unknown:
        raise PairError(f"not in the schema (fields: {', '.join(schema.names)})", row=rid, field=unknown[0])
    out = {}
    for f in schema:
        value = row.get(f.name)
        if value is None:
            if not f.nullable:
                raise PairError("is required", row=rid, field=f.name)
        elif pa.types.is_binary(f.type) or pa.types.is_large_binary(f.type):
            if not isinstance(value, (bytes, bytearray, memoryview)):
                raise PairError(f"expected bytes, got {type(value).__name__}", row=rid, field=f.name)
        else:
            try:
                pa.array([value], type=f.type)
            except (pa.ArrowException, TypeError, ValueError) as exc:
                raise PairError(f"does not fit {f.type}: {exc}", row=rid, field=f.name) from exc
        out[f.name] = value
    return out


# -- shards -------------------------------------------------------------------------------

def finished_shards(folder: PathLike) -> list[Any]:
    """The finished shard files of a folder, sorted (temporaries never match):
    Paths for a local folder, URIs (strings) for a folder at a URI."""
    from aesformer import storage

    if storage.is_uri(folder):
        try:  # a folder being written shows no shards; a finished one, the shards it was written with
            written = storage.folder_files(folder)
        except storage.IncompleteFolder:
            return []
        return [storage.join(folder, n) for n in storage.listdir(folder)
                if SHARD_RE.match(n) and (written is None or n in written)]
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and SHARD_RE.match(p.name))


def parquet_source(shard: Any) -> dict:
    """Keyword arguments that open ``shard`` (a path or a URI) with pyarrow's
    Parquet readers: ``{"source": path, "filesystem": fs}``."""
    from aesformer import storage

    if not storage.is_uri(shard):
        return {"source": str(shard), "filesystem": None}
    fs, path = storage.filesystem(shard)
    return {"source": path, "filesystem": fs}


def shard_dataset(folder: PathLike) -> Any:
    """A pyarrow dataset over a folder's finished shards (local or at a URI)."""
    import pyarrow.dataset as pads

    shards = [parquet_source(s) for s in finished_shards(folder)]
    return pads.dataset([s["source"] for s in shards], format="parquet",
                        filesystem=shards[0]["filesystem"] if shards else None)


def find_dataset(value: Optional[PathLike], key: str = "data") -> Path:
    """The AesRecon folder a user named with ``key=``: the folder itself, or
    the ``pairs/`` inside an earlier job's output folder. Raises ConfigError
    naming the folder to pass instead when neither holds pair shards."""
    from aesformer.config import ConfigError

    from aesformer import storage

    if not value:
        raise ConfigError(f"{key}= is required: an AesRecon dataset folder, e.g. {key}=runs/distill/pairs")
    if storage.is_uri(value):
        for candidate in (str(value).rstrip("/"), storage.join(value, "pairs")):
            if finished_shards(candidate):
                return candidate
        if not storage.exists(value):
            raise ConfigError(f"{key}='{value}' does not exist")
        for candidate in (str(value).rstrip("/"), storage.join(value, "pairs")):
            if storage.is_dir(candidate) and not storage.is_complete(candidate):
                raise ConfigError(f"{key}='{value}': {candidate} is being written, or its last write failed "
                                  "half-way; wait for the job that writes it, or run it again")
        raise ConfigError(f"{key}='{value}' holds no AesRecon pair shards (part-*.parquet), nor does its pairs/ folder")
    folder = Path(value).expanduser()
    for candidate in (folder, folder / "pairs"):
        if finished_shards(candidate):
            return candidate.resolve()
    if not folder.exists():
        raise ConfigError(f"{key}='{value}' does not exist")
    if not folder.is_dir():
        raise ConfigError(f"{key}='{value}' is a file; pass the folder that holds the part-*.parquet shards")
    below = sorted({p.parent for p in folder.glob("**/part-*.parquet") if SHARD_RE.match(p.name)})
    hint = f"; pass {key}={below[0]}" if below else ""
    raise ConfigError(f"{key}='{value}' holds no AesRecon pair shards (part-*.parquet), nor does its pairs/ "
                      f"folder{hint}")


def no_plans_error(folder: PathLike, key: str = "data", split: Optional[str] = None):
    """The ConfigError for a dataset without a single plan to learn from."""
    from aesformer.config import ConfigError

    where = f" in split '{split}' (split=null takes every row)" if split else ""
    return ConfigError(f"{key}='{folder}' has no pairs with a plan{where}: plans come from distillation "
                       f"(python jobs/distill.py input={folder}); pass its output, e.g. {key}=runs/distill/pairs")


def check_schema(path: PathLike, schema: pa.Schema = PAIR_SCHEMA) -> None:
    """Raise PairError naming the file and field when a Parquet file's schema
    differs from ``schema`` (a missing, extra or differently typed field)."""
    try:
        src = parquet_source(path)
        got = pq.read_schema(src["source"], filesystem=src["filesystem"])
    except Exception as exc:
        raise PairError(f"not a readable Parquet file ({exc})", file=path) from exc
    for f in schema:
        idx = got.get_field_index(f.name)
        if idx < 0:
            raise PairError("missing from the file", file=path, field=f.name)
        if not got.field(idx).type.equals(f.type):
            raise PairError(f"has type {got.field(idx).type}, expected {f.type}", file=path, field=f.name)
    for name in got.names:
        if schema.get_field_index(name) < 0:
            raise PairError("is not in the schema", file=path, field=name)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class ShardWriter:
    """Writes rows into ``folder/<prefix>-NNNNN.parquet`` shards of
    ``shard_rows`` rows, each atomically (hidden temp file, fsync, rename).

    Resumable: on start it reads the ids of every finished shard in the
    folder; rows with those ids (and repeats within this run) are skipped,
    and shard numbering continues after the highest existing one. Leftover
    temporaries of this prefix (a crashed writer's) are removed, so run one
    writer per prefix at a time. Leaving the ``with`` block — normally or by
    an exception — flushes the rows already accepted, so finished work is
    never lost.
    """

    def __init__(self, folder: PathLike, schema: pa.Schema = PAIR_SCHEMA, shard_rows: int = 256, *,
                 prefix: str = "part", id_field: str = "id", row_group_rows: int = 32, compression: str = "zstd"):
        if shard_rows < 1:
            raise ValueError("shard_rows must be at least 1")
        if not prefix or prefix[0] in "._" or "/" in prefix:
            raise ValueError(f"bad shard prefix {prefix!r}")
        from aesformer import storage

        self.uri = storage.is_uri(folder)  # at a URI each shard is one object, whole once written
        self.folder = str(folder).rstrip("/") if self.uri else Path(folder)
        storage.makedirs(self.folder)
        self.schema, self.shard_rows, self.prefix, self.id_field = schema, shard_rows, prefix, id_field
        self.row_group_rows, self.compression = row_group_rows, compression
        for tmp in ([] if self.uri else self.folder.glob(f".{prefix}-*.parquet.tmp")):
            log.warning("removing unfinished shard %s left by an earlier run", tmp)
            tmp.unlink(missing_ok=True)
        self.done_ids: set[str] = set()
        next_index = 0
        for shard in finished_shards(self.folder):
            check_schema(shard, schema)
            self.done_ids.update(pq.read_table(**parquet_source(shard), columns=[id_field]).column(id_field).to_pylist())
            m = SHARD_RE.match(storage.name(shard))
            if m and m.group("prefix") == prefix:
                next_index = max(next_index, int(m.group("index")) + 1)
        self.next_index = next_index
        self.resumed = len(self.done_ids)
        self.written = 0  # rows written by this writer
        self.skipped = 0  # rows skipped because their id was already done
        self.shards: list = []  # shards written by this writer
        self._buffer: list[dict] = []
        self._pending: set[str] = set()

    def __contains__(self, row_id: str) -> bool:
        return row_id in self.done_ids or row_id in self._pending

    def write(self, row: Mapping) -> bool:
        """Add one row; returns False when its id was already written (skipped)."""
        rid = row.get(self.id_field)
        if rid in self:
            self.skipped += 1
            return False
        self._buffer.append(check_row(row, self.schema))
        self._pending.add(rid)
        if len(self._buffer) >= self.shard_rows:
            self.flush()
        return True

    def write_many(self, rows: Iterable[Mapping]) -> int:
        """Add rows; returns how many were accepted (not skipped)."""
        return sum(self.write(r) for r in rows)

    def flush(self) -> Optional[Path]:
        """Write the buffered rows as one shard now; returns its path."""
        if not self._buffer:
            return None
        name = f"{self.prefix}-{self.next_index:05d}.parquet"
        table = pa.Table.from_pylist(self._buffer, schema=self.schema)
        if self.uri:
            from aesformer import storage

            final = storage.join(self.folder, name)
            fs, path = storage.filesystem(final)
            with fs.open_output_stream(path) as out:
                pq.write_table(table, out, row_group_size=self.row_group_rows, compression=self.compression)
        else:
            final, tmp = self.folder / name, self.folder / f".{name}.tmp"
            pq.write_table(table, tmp, row_group_size=self.row_group_rows, compression=self.compression)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, final)
            _fsync_dir(self.folder)
        self.next_index += 1
        self.written += len(self._buffer)
        self.done_ids |= self._pending
        self._buffer, self._pending = [], set()
        self.shards.append(final)
        return final

    def close(self) -> None:
        self.flush()

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _shards_checked(folder: PathLike, schema: pa.Schema) -> list[Path]:
    shards = finished_shards(folder)
    for s in shards:
        check_schema(s, schema)
    return shards


def iter_pairs(folder: PathLike, columns: Optional[Sequence[str]] = None, split: Optional[str] = None, *,
               batch_rows: int = 64, schema: pa.Schema = PAIR_SCHEMA) -> Iterator[dict]:
    """Rows of the finished shards as dicts, streamed ``batch_rows`` at a time
    (images stay encoded; see :func:`pair_images`)."""
    cols = None if columns is None else list(columns)
    read_cols = cols
    if split is not None and cols is not None and "split" not in cols:
        read_cols = cols + ["split"]
    for shard in _shards_checked(folder, schema):
        src = parquet_source(shard)
        for batch in pq.ParquetFile(src["source"], filesystem=src["filesystem"]).iter_batches(
                batch_size=batch_rows, columns=read_cols):
            for row in batch.to_pylist():
                if split is not None and row.get("split") != split:
                    continue
                yield row if read_cols == cols else {k: row[k] for k in cols}


def read_table(folder: PathLike, columns: Optional[Sequence[str]] = None, split: Optional[str] = None, *,
               schema: pa.Schema = PAIR_SCHEMA) -> pa.Table:
    """The finished shards as one Arrow table (optionally one split)."""
    tables = []
    for shard in _shards_checked(folder, schema):
        filters = [("split", "==", split)] if split is not None else None
        tables.append(pq.read_table(**parquet_source(shard), columns=None if columns is None else list(columns),
                                    filters=filters))
    if not tables:
        fields = schema if columns is None else pa.schema([schema.field(c) for c in columns])
        return fields.empty_table()
    return pa.concat_tables(tables)


def read_pairs(folder: PathLike, columns: Optional[Sequence[str]] = None, split: Optional[str] = None, *,
               as_pandas: bool = False, schema: pa.Schema = PAIR_SCHEMA) -> Any:
    """All rows of the finished shards: a list of dicts, or a pandas
    DataFrame with ``as_pandas``. Each file's schema is checked first."""
    if as_pandas:
        return read_table(folder, columns, split, schema=schema).to_pandas()
    return list(iter_pairs(folder, columns, split, schema=schema))


def read_ray(folder: PathLike, columns: Optional[Sequence[str]] = None, split: Optional[str] = None, *,
             schema: pa.Schema = PAIR_SCHEMA, **read_kwargs: Any) -> Any:
    """A Ray Dataset over the finished shards only (schemas checked first),
    optionally one split and some columns.

    Extra keyword arguments go to ``ray.data.read_parquet``.
    """
    import ray.data
    from ray.data.expressions import col

    shards = _shards_checked(folder, schema)
    if not shards:
        raise PairError("no finished shards to read", file=folder)
    dataset = ray.data.read_parquet([str(s) for s in shards], **read_kwargs)
    if split is not None:
        dataset = dataset.filter(expr=col("split") == split)
    if columns is not None:
        dataset = dataset.select_columns(list(columns))
    return dataset


# -- train/test split ----------------------------------------------------------------------

def assign_split(ids: Iterable[str], test_size: Union[int, float] = 903, *, salt: str = "aesrecon") -> dict[str, str]:
    """{id: "train" | "test"}: the ``test_size`` ids with the smallest hash
    of (salt, id) are test. ``test_size`` is a count (903, the paper's test
    set) or a fraction in (0, 1) of the unique ids (rounded). The result
    depends only on the set of ids, not on their order."""
    unique = sorted(set(map(str, ids)))
    n = len(unique)
    if isinstance(test_size, bool):
        raise TypeError("test_size must be a count or a fraction")
    if isinstance(test_size, float) and 0.0 < test_size < 1.0:
        k = int(round(test_size * n))
    elif float(test_size) == int(test_size) and test_size >= 0:
        k = int(test_size)
    else:
        raise ValueError(f"test_size must be a count >= 0 or a fraction in (0, 1), got {test_size!r}")
    if k > n:
        raise ValueError(f"test_size {k} is larger than the {n} unique ids")
    ranked = sorted(unique, key=lambda i: (hashlib.sha256(f"{salt}\x00{i}".encode()).hexdigest(), i))
    test = set(ranked[:k])
    return {i: ("test" if i in test else "train") for i in unique}


split_by_id = assign_split


# -- released folder layout -------------------------------------------------------------------

RELEASED_LAYOUT = """\
<root>/
  images/poor_images/<file>   poor (input) photos
  images/good_images/<file>   good (reference) photos
  jsons/train/*.json          training pairs
  jsons/test/*.json           held-out pairs

Each JSON file holds a list of pair records, or a single record (then its
file stem is the default id). A record:

  {"id": "v12_s3_f8",                 # optional when one record per file
   "poor_image": "v12_s3_f8.jpg",      # relative to images/poor_images
   "good_image": "v12_s3_f8.jpg",      # relative to images/good_images
   "plan": "<Ratio>(1) Aspect Ratio: ...</Ratio>\\n...",   # or {"ratio": ..., ...}
   "video_id": "v12", "segment_start": 3.0, "segment_end": 9.5,
   "poor_time": 3.0, "good_time": 8.5, "transcript": "...",
   "scores": {"iqa": 0.7}, "decisions": [{"stage": ..., "decision": ..., "reason": ...}]}

Only poor_image, good_image and plan are required. The split is the folder
the JSON file is in. Also accepted: "poor"/"input_image" for poor_image,
"good"/"target_image" for good_image, "actions"/"action_plan" for plan.
"""

_ALIASES = {
    "poor_image": ("poor_image", "poor", "input_image"),
    "good_image": ("good_image", "good", "target_image"),
    "plan": ("plan", "actions", "action_plan"),
}


def _pick(record: Mapping, field: str) -> Any:
    for k in _ALIASES[field]:
        if k in record:
            return record[k]
    return None


def _safe_name(row_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", row_id)


def _released_records(root: Path) -> Iterator[tuple[str, Path, str, dict]]:
    """(split, json file, default id, record) for every record under jsons/."""
    for split in SPLITS:
        for jf in sorted((root / "jsons" / split).glob("*.json")):
            try:
                content = json.loads(jf.read_text())
            except (OSError, ValueError) as exc:
                raise PairError(f"not readable JSON ({exc})", file=jf) from exc
            if isinstance(content, Mapping):
                yield split, jf, jf.stem, dict(content)
            elif isinstance(content, list):
                for k, rec in enumerate(content):
                    if not isinstance(rec, Mapping):
                        raise PairError(f"entry {k} is not an object", file=jf)
                    yield split, jf, f"{jf.stem}-{k}", dict(rec)
            else:
                raise PairError("expected a list of records or one record", file=jf)


def _released_image(root: Path, sub: str, name: Any, *, row: str, field: str) -> bytes:
    if not name:
        raise PairError("no image file name", row=row, field=field)
    rel = str(name)
    for prefix in (f"images/{sub}/", f"{sub}/"):
        if rel.startswith(prefix):
            rel = rel[len(prefix):]
    path = root / "images" / sub / rel
    try:
        return path.read_bytes()
    except OSError as exc:
        raise PairError(f"cannot read {path} ({exc.strerror or exc})", row=row, field=field) from exc


def import_released(root: PathLike, out_folder: PathLike, *, shard_rows: int = 256, on_error: str = "quarantine",
                    job: str = "import_released") -> dict:
    """Read the released layout (see :data:`RELEASED_LAYOUT`) into Parquet
    shards under ``out_folder``; resumable (done ids are skipped).

    Image bytes are kept as they are (after a check that they decode). A
    record with a missing or undecodable image or a malformed plan is, with
    ``on_error="quarantine"``, skipped and listed with its reason in the
    result and in ``out_folder/_quarantine.jsonl``; with "raise" it raises
    PairError naming the row and field.
    """
    if on_error not in ("quarantine", "raise"):
        raise ValueError("on_error must be 'quarantine' or 'raise'")
    root, out = Path(root), Path(out_folder)
    if not (root / "jsons").is_dir():
        raise PairError("no jsons/ folder: not the released AesRecon layout", file=root)
    prov = make_provenance(job, {"root": str(root)})
    quarantined: list[dict] = []
    with ShardWriter(out, shard_rows=shard_rows) as writer:
        for split, jf, default_id, rec in _released_records(root):
            rid = str(rec.get("id") or default_id)
            if rid in writer:
                writer.skipped += 1
                continue
            try:
                if _pick(rec, "plan") is None:
                    raise PairError("no plan", row=rid, field="plan")
                segment = rec.get("segment") or (rec.get("segment_start"), rec.get("segment_end"))
                row = make_pair(
                    rid,
                    _released_image(root, "poor_images", _pick(rec, "poor_image"), row=rid, field="poor_image"),
                    _released_image(root, "good_images", _pick(rec, "good_image"), row=rid, field="good_image"),
                    video_id=rec.get("video_id"), segment_start=segment[0], segment_end=segment[1],
                    poor_time=rec.get("poor_time"), good_time=rec.get("good_time"),
                    transcript=rec.get("transcript"), plan=_pick(rec, "plan"), split=split,
                    scores=rec.get("scores"), decisions=rec.get("decisions"), provenance=prov,
                )
            except PairError as exc:
                if on_error == "raise":
                    raise PairError(exc.reason, row=rid, field=exc.field, file=jf) from exc
                quarantined.append({"id": rid, "field": exc.field, "file": str(jf), "reason": str(exc)})
                log.warning("quarantined %s", exc)
                continue
            writer.write(row)
    if quarantined:
        with open(out / "_quarantine.jsonl", "a") as f:
            for q in quarantined:
                f.write(json.dumps(q) + "\n")
    return {"written": writer.written, "skipped": writer.skipped, "quarantined": quarantined,
            "shards": [str(s) for s in writer.shards]}


def _rows(source: Any, columns: Optional[Sequence[str]] = None) -> Iterable[Mapping]:
    if isinstance(source, (str, os.PathLike)):
        return iter_pairs(source, columns)
    return source


def _ext(fmt: Optional[str]) -> str:
    return {"jpeg": "jpg"}.get(_norm_format(fmt), _norm_format(fmt))


def export_released(source: Any, root: PathLike) -> dict:
    """Write pairs (a folder of shards or an iterable of rows) in the released
    layout: image bytes as files, one ``jsons/<split>/aesrecon_<split>.json``
    list per split. Every row needs a split ("train"/"test"); see
    :func:`assign_split`."""
    root = Path(root)
    poor_dir, good_dir = root / "images" / "poor_images", root / "images" / "good_images"
    poor_dir.mkdir(parents=True, exist_ok=True)
    good_dir.mkdir(parents=True, exist_ok=True)
    records: dict[str, list[dict]] = {s: [] for s in SPLITS}
    for row in _rows(source):
        rid = row["id"]
        if row.get("split") not in SPLITS:
            raise PairError(f"needs a split in {SPLITS} to export, got {row.get('split')!r}", row=rid, field="split")
        name = _safe_name(rid)
        poor_name, good_name = f"{name}.{_ext(row.get('poor_format'))}", f"{name}.{_ext(row.get('good_format'))}"
        (poor_dir / poor_name).write_bytes(row["poor_image"])
        (good_dir / good_name).write_bytes(row["good_image"])
        rec = {"id": rid, "poor_image": poor_name, "good_image": good_name, "plan": row.get("plan"),
               "video_id": row.get("video_id"), "segment_start": row.get("segment_start"),
               "segment_end": row.get("segment_end"), "poor_time": row.get("poor_time"),
               "good_time": row.get("good_time"), "transcript": row.get("transcript")}
        if row.get("scores"):
            rec["scores"] = row_scores(row)
        if row.get("decisions"):
            rec["decisions"] = row["decisions"]
        records[row["split"]].append(rec)
    counts = {}
    for split, recs in records.items():
        d = root / "jsons" / split
        d.mkdir(parents=True, exist_ok=True)
        write_json(d / f"aesrecon_{split}.json", recs)
        counts[split] = len(recs)
    return counts


def export_sft_json(source: Any, out_dir: PathLike, *, split: Optional[str] = "train",
                    instruction: Optional[str] = None, dataset_name: str = "aesrecon_sft") -> dict:
    """An SFT set in the ShareGPT/LLaMA-Factory chat format.

    Writes ``out_dir/<dataset_name>.json``, a list of::

        {"messages": [{"role": "user", "content": "<image>" + instruction},
                      {"role": "assistant", "content": "<Ratio>(1) ...</Color>"}],
         "images": ["images/<id>.<ext>"]}

    with the poor images under ``out_dir/images/`` (paths relative to
    out_dir), and ``out_dir/dataset_info.json`` registering it (formatting
    "sharegpt", role/content tags) so LLaMA-Factory reads it with
    ``dataset_dir=out_dir``. Rows of other splits or without a plan are
    left out (counted in the result).
    """
    out = Path(out_dir)
    img_dir = out / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    prompt = "<image>" + thinker_instruction(instruction)
    examples, no_plan = [], 0
    for row in _rows(source):
        if split is not None and row.get("split") != split:
            continue
        plan = row_plan(row)
        if plan is None:
            no_plan += 1
            continue
        rel = f"images/{_safe_name(row['id'])}.{_ext(row.get('poor_format'))}"
        (out / rel).write_bytes(row["poor_image"])
        examples.append({"messages": [{"role": "user", "content": prompt},
                                      {"role": "assistant", "content": plan.render()}],
                         "images": [rel]})
    path = out / f"{dataset_name}.json"
    write_json(path, examples)
    info_path = out / "dataset_info.json"
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    info[dataset_name] = {
        "file_name": path.name,
        "formatting": "sharegpt",
        "columns": {"messages": "messages", "images": "images"},
        "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"},
    }
    write_json(info_path, info)
    return {"path": str(path), "examples": len(examples), "skipped_no_plan": no_plan}


# -- contact sheet -------------------------------------------------------------------------

def contact_sheet(pairs: Any, path: PathLike, max_pairs: int = 8, *, thumb: int = 256, font_size: int = 12,
                  labels: tuple[str, str] = ("poor", "good"), columns: int = 3) -> Path:
    """One image for people to look at: for each pair (at most ``max_pairs``),
    poor | good side by side (``labels`` name the two), the id above and the
    plan wrapped under them; pairs fill a grid ``columns`` wide."""
    from PIL import Image, ImageDraw, ImageFont

    try:
        font = ImageFont.load_default(size=font_size)
    except TypeError:  # Pillow < 10.1
        font = ImageFont.load_default()
    pad, gap = 8, 4
    width = 2 * thumb + 3 * pad
    line_h = int(font.getbbox("Ag")[3] - font.getbbox("Ag")[1]) + 4
    chars = max(20, int((width - 2 * pad) / max(1.0, font.getlength("abcdefghij") / 10)))

    blocks = []
    for row in _rows(pairs):
        if len(blocks) >= max_pairs:
            break
        poor, good = pair_images(row)
        text = row.get("plan") or "(no plan)"
        plan_lines: list[str] = []
        for line in text.splitlines():
            plan_lines.extend(textwrap.wrap(line, chars) or [""])
        blocks.append((row.get("id", ""), poor, good, plan_lines))
    if not blocks:
        raise ValueError("contact_sheet got no pairs")

    # a grid that fits a screen: up to ``columns`` pairs side by side
    columns = max(1, min(columns, len(blocks)))
    heights = [pad + line_h + thumb + gap + line_h * len(lp) + pad for _, _, _, lp in blocks]
    row_heights = [max(heights[i:i + columns]) for i in range(0, len(blocks), columns)]
    sheet = Image.new("RGB", (width * columns, sum(row_heights)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (rid, poor, good, plan_lines) in enumerate(blocks):
        grid_row, col = divmod(i, columns)
        x, y = col * width, sum(row_heights[:grid_row])
        draw.text((x + pad, y + pad), f"{rid}    {labels[0]} | {labels[1]}", fill="black", font=font)
        top = y + pad + line_h
        for k, img in enumerate((poor, good)):
            t = img.copy()
            t.thumbnail((thumb, thumb))
            x0 = x + pad + k * (thumb + pad)
            sheet.paste(t, (x0 + (thumb - t.width) // 2, top + (thumb - t.height) // 2))
        ty = top + thumb + gap
        for line in plan_lines:
            draw.text((x + pad, ty), line, fill=(30, 30, 30), font=font)
            ty += line_h
        if col:
            draw.line([(x, y), (x, y + row_heights[grid_row])], fill=(200, 200, 200))
        if grid_row:
            draw.line([(x, y), (x + width, y)], fill=(200, 200, 200))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path
