"""Checkpoints of every training job: one state file, one way to find, prune
and resume.

A checkpoint is a folder. Its state file, ``trainer_state.json``, is written
last and lists the folder's other files with their sizes, so a folder whose
state file reads and whose listed files are all there is complete: a folder
another program uploads file by file (Ray Train copying a worker's checkpoint
to shared storage) may show its state file before the rest, and is not taken
until the rest is there. A folder written again is first made incomplete
(:func:`begin`), and pruning removes the state file first. ``resume`` means
the same in every training job:

- ``auto`` (the default): continue from the newest complete checkpoint under
  the job's output, or start fresh when there is none;
- ``never``: start fresh;
- a path: continue from that checkpoint folder.

The root may be a local folder or a URI (``s3://...``, see
:mod:`aesformer.storage`); a checkpoint found at a URI is named by its URI
(a string), a local one by its Path.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Union

from aesformer import storage
from aesformer.config import ConfigError

STATE_FILE = "trainer_state.json"
RESUME_MODES = ("auto", "never")

Checkpoint = tuple[Union[Path, str], dict]


def _folder(location: str | os.PathLike) -> Union[Path, str]:
    return str(location) if storage.is_uri(location) else Path(location)


FILES_KEY = "files"  # in the state: {path relative to the folder: size} of the folder's other files


def _files(folder: str | os.PathLike) -> dict[str, int]:
    """{path relative to ``folder``: size} of its files but the state file."""
    import pyarrow.fs as pafs

    fs, path = storage.filesystem(folder)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    return {i.path[len(path):].lstrip("/"): int(i.size) for i in infos
            if i.type == pafs.FileType.File and i.path[len(path):].lstrip("/") != STATE_FILE}


def begin(folder: str | os.PathLike) -> None:
    """Before a checkpoint is written into ``folder``: the folder stops being
    a complete checkpoint (its state file goes first, then what was in it), so
    no reader takes a mix of the old checkpoint and the new one."""
    storage.remove(storage.join(folder, STATE_FILE))
    storage.remove(folder)


def write_state(folder: str | os.PathLike, state: dict) -> Union[Path, str]:
    """Write the state file, with the list of the folder's files; it marks
    the folder complete (once those files are all where it is read)."""
    state = {**state, FILES_KEY: _files(folder)}
    return _folder(storage.write_json(storage.join(folder, STATE_FILE), state, sort_keys=True))


def read_state(folder: str | os.PathLike) -> Optional[dict]:
    """The folder's state, or None when it is not a complete checkpoint (no
    readable state file, or a file the state lists missing or of another size)."""
    try:
        state = json.loads(storage.read_text(storage.join(folder, STATE_FILE)))
    except (OSError, ValueError):
        return None
    if not isinstance(state, dict):
        return None
    listed = state.get(FILES_KEY)
    if isinstance(listed, dict) and listed:
        try:
            have = _files(folder)
        except OSError:
            return None
        if any(have.get(rel) != size for rel, size in listed.items()):
            return None
    return state


def find(root: str | os.PathLike, pattern: str, required: Optional[str] = None) -> list[Checkpoint]:
    """Complete checkpoints under ``root`` whose folder matches ``pattern``
    (a glob relative to root), oldest first by step, then by when written.
    ``required`` names an entry a folder must also hold to count."""
    found = []
    if storage.is_dir(root):
        for folder in storage.glob(root, pattern):
            state = read_state(folder)
            if state is None or (required and not storage.exists(storage.join(folder, required))):
                continue
            written = state.get("written_at") or storage.mtime(storage.join(folder, STATE_FILE))
            found.append((_folder(folder), state, written))
    found.sort(key=lambda item: (item[1].get("step", 0), item[2]))
    return [(folder, state) for folder, state, _ in found]


def newest(root: str | os.PathLike, pattern: str, required: Optional[str] = None) -> Optional[Checkpoint]:
    found = find(root, pattern, required)
    return found[-1] if found else None


def prune(root: str | os.PathLike, pattern: str, keep: int) -> list[Union[Path, str]]:
    """Remove all but the ``keep`` newest complete checkpoints; returns what went."""
    found = find(root, pattern)
    gone = [folder for folder, _ in (found[:-keep] if keep > 0 else [])]
    for folder in gone:
        storage.remove(storage.join(folder, STATE_FILE))  # incomplete first: never half a checkpoint found
        storage.remove(folder)
    return gone


def check_resume(value: str, where: str = "resume") -> None:
    """Reject a ``resume`` value that is neither a mode nor a checkpoint folder."""
    if value in RESUME_MODES:
        return
    if not value or not storage.is_dir(value):
        raise ConfigError(f"{where} must be auto, never or a checkpoint folder; '{value}' is none of these")
    if read_state(storage.resolve(value)) is None:
        raise ConfigError(f"{where}={value}: not a checkpoint of this job (it has no readable {STATE_FILE}); "
                          "use resume=auto, resume=never or one of the job's checkpoint folders")


def resolve_resume(value: str, root: str | os.PathLike, pattern: str,
                   required: Optional[str] = None) -> Optional[Checkpoint]:
    """(folder, state) to continue from, or None to start fresh."""
    check_resume(value)
    if value == "never":
        return None
    if value == "auto":
        return newest(root, pattern, required)
    folder = _folder(storage.resolve(value))
    return folder, read_state(folder)


def wait_until_taken(timeout_s: float = 120.0) -> bool:
    """On a Ray Train worker, after ``ray.train.report(..., checkpoint=...)``:
    wait until the run's controller has collected that report.

    ``report`` returns once the checkpoint is uploaded and queued on the
    worker; the controller takes it as the run's latest only when it next
    polls the workers (every ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``, 2 s by
    default). A node lost in between restarts the group from the checkpoint
    before, and a loss soon after the first checkpoint restarts it from step 0.
    Waiting here, at most one poll interval a checkpoint, makes every finished
    checkpoint the restart point. Reads Ray Train v2's worker queue (the
    controller marks a report done when it collects it); False where that is
    missing or the wait timed out (a group being torn down is never polled)."""
    try:
        from ray.train.v2._internal.execution.context import get_train_context

        results = get_train_context().get_result_queue()
        done = results.all_tasks_done
    except Exception:  # another Ray Train, or not on a worker
        return False
    with done:
        return done.wait_for(lambda: results.unfinished_tasks == 0, timeout=timeout_s)
