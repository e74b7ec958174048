"""One config system for every job.

A job declares a dataclass that extends :class:`JobConfig`. Values are merged,
later winning, from: the dataclass defaults, ``conf/<job>.yaml``, the profile
(``conf/profiles/<profile>.yaml``: its top-level keys apply to every job, its
``jobs.<job>`` block to that job alone) and ``key=value`` arguments. A key the
schema does not know fails before any work, naming the closest valid key.
"""
from __future__ import annotations

import dataclasses
import difflib
import keyword
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Type, TypeVar

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

T = TypeVar("T", bound="JobConfig")


class ConfigError(ValueError):
    """A config problem a user can fix: an unknown key, a bad value, a missing file."""


@dataclass
class RayConfig:
    # None: RAY_ADDRESS when set, else a local Ray sized to this machine.
    address: Optional[str] = None
    num_cpus: Optional[int] = None
    num_gpus: Optional[int] = None
    # Ship this project's code to the workers as a wheel (py_modules), so a
    # cluster image with only the dependencies can run every job.
    ship_code: bool = True
    # Torch threads inside every Ray worker; 1 is much faster for tiny models.
    worker_threads: int = 1
    # Seconds a pool may wait to be placed, and a call on a pool to finish,
    # before the job fails naming the pool (the fit is checked before either).
    placement_timeout: float = 120.0
    call_timeout: float = 3600.0
    # Shrink the pools' CPU asks to the cluster's CPUs (for mostly idle
    # actors, as the tiny profile's on a small machine).
    fit_cpus: bool = False


@dataclass
class TrackingConfig:
    enabled: bool = True
    # None: a SQLite store under <output>/mlflow.
    uri: Optional[str] = None
    experiment: str = "aesformer"
    run_name: Optional[str] = None


@dataclass
class ModelsConfig:
    # A local path, a hub id, or "tiny:<name>" for the offline tiny models
    # (built on first use and cached under cache_dir).
    thinker: str = "tiny:thinker"
    judge: str = "tiny:judge"
    editor: str = "tiny:editor"
    cache_dir: str = "~/.cache/aesformer"


@dataclass
class JobConfig:
    profile: str = "tiny"
    output: str = "runs/job"
    seed: int = 42
    # console: info (the jobs' progress and warnings), warning, or debug (everything,
    # Ray workers included); the full log is always in <output>/logs/
    log_level: str = "info"
    ray: RayConfig = field(default_factory=RayConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    models: ModelsConfig = field(default_factory=ModelsConfig)


def conf_dir() -> Path:
    """The conf/ folder: $AESFORMER_CONF, else beside the source tree, else ./conf."""
    env = os.environ.get("AESFORMER_CONF")
    candidates = [Path(env)] if env else []
    candidates.append(Path(__file__).resolve().parents[2] / "conf")
    candidates.append(Path.cwd() / "conf")
    for c in candidates:
        if c.is_dir():
            return c
    raise ConfigError(f"no conf/ folder found (looked in: {', '.join(map(str, candidates))})")


def _known_keys(schema_node: Any, prefix: str = "") -> list[str]:
    keys = []
    for k in schema_node.keys():
        path = f"{prefix}{k}"
        keys.append(path)
        child = schema_node._get_node(k)
        if isinstance(child, DictConfig) and child._metadata.object_type not in (None, dict):
            keys.extend(_known_keys(child, path + "."))
    return keys


def _initials(name: str) -> str:
    return "".join(w[0] for w in name.split("_") if w)


def closest_key(name: str, candidates: Sequence[str]) -> Optional[str]:
    """The valid key a user most likely meant: a near spelling
    (``optim.lrr`` → ``optim.lr``) or a spelled-out short name
    (``learning_rate`` → ``lr``)."""
    leaf = name.rsplit(".", 1)[-1]
    by_leaf = {c.rsplit(".", 1)[-1]: c for c in candidates}
    for short, full in by_leaf.items():
        if len(short) >= 2 and (_initials(leaf) == short or _initials(short) == leaf):
            return full
    close = difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.6)
    if close:
        return by_leaf[close[0]]
    close = difflib.get_close_matches(name, candidates, n=1, cutoff=0.6)
    if close:
        return close[0]
    return None


def _is_section(node: Any) -> bool:
    return isinstance(node, DictConfig) and node._metadata.object_type not in (None, dict)


def _check_keys(data: dict, schema: DictConfig, source: str, prefix: str = "") -> None:
    """Raise ConfigError for the first key in ``data`` that ``schema`` lacks,
    or a plain value given for a whole section."""
    for k, v in data.items():
        path = f"{prefix}{k}"
        if k not in schema:
            here = [f"{prefix}{key}" for key in schema.keys()]
            close = closest_key(path, here) or closest_key(path, _known_keys(schema, prefix))
            hint = (f"; did you mean '{close}'?" if close else
                    f"; keys{' of ' + prefix.rstrip('.') if prefix else ''}: {', '.join(sorted(here))}")
            raise ConfigError(f"unknown config key '{path}' (from {source}){hint}")
        child = schema._get_node(k)
        if _is_section(child):
            if isinstance(v, dict):
                _check_keys(v, child, source, path + ".")
            elif v is not None:
                keys = list(child.keys())
                guess = next((key for key in ("kind", "engine", "mode", "name", "path") if key in keys), None)
                guess = guess if isinstance(v, str) and isinstance(child.get(guess), str) else None
                hint = f"did you mean '{path}.{guess}={v}'? " if guess else ""
                raise ConfigError(f"'{path}' is a section, not a value (from {source}): {hint}"
                                  f"its keys are {', '.join(f'{path}.{key}' for key in keys)}")


def _read_yaml(path: Path) -> dict:
    if not path.exists():
        return {}
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


def _parse_overrides(argv: Sequence[str]) -> dict:
    """``a.b=1 c=x`` → nested dict, values parsed as YAML scalars/lists
    (``key=null`` or ``key=`` sets None)."""
    out: dict = {}
    for arg in argv:
        if "=" not in arg:
            raise ConfigError(f"argument '{arg}' is not key=value")
        key, raw = arg.split("=", 1)
        key = key.strip().lstrip("-")
        if not key:
            raise ConfigError(f"argument '{arg}' has an empty key")
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError:
            value = raw
        if isinstance(value, str):
            value = raw  # a string stays as typed; null, ~ and an empty value are None
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"argument '{arg}' sets a key below a value")
        node[parts[-1]] = value
    return out


def _keyword_keys(data: Any) -> Any:
    """A key that is a Python keyword (``rollout.async``) names the schema field
    with a trailing underscore (``async_``), as a dataclass field cannot be
    called ``async``."""
    if not isinstance(data, dict):
        return data
    return {(f"{k}_" if isinstance(k, str) and keyword.iskeyword(k) else k): _keyword_keys(v) for k, v in data.items()}


def load_config(schema: Type[T], job: str, argv: Sequence[str] = ()) -> T:
    """Resolve a job's config; see the module docstring for the merge order."""
    base = OmegaConf.structured(schema)
    cli = _keyword_keys(_parse_overrides(argv))
    _check_keys(cli, base, "command line")
    confs = conf_dir()
    layers: list[tuple[str, dict]] = []
    job_yaml = confs / f"{job}.yaml"
    layers.append((str(job_yaml.name), _read_yaml(job_yaml)))
    profile = cli.get("profile") or layers[0][1].get("profile") or base.profile
    prof_path = confs / "profiles" / f"{profile}.yaml"
    if not prof_path.exists():
        names = sorted(p.stem for p in (confs / "profiles").glob("*.yaml"))
        raise ConfigError(f"unknown profile '{profile}'; available: {', '.join(names)}")
    prof = _read_yaml(prof_path)
    per_job = (prof.pop("jobs", None) or {}).get(job, {}) or {}
    layers.append((f"profiles/{profile}.yaml", prof))
    layers.append((f"profiles/{profile}.yaml jobs.{job}", per_job))
    layers.append(("command line", cli))
    merged = base
    for source, data in layers:
        data = _keyword_keys(data)
        _check_keys(data, base, source)
        try:
            merged = OmegaConf.merge(merged, data)
        except OmegaConfBaseException as e:
            key = getattr(e, "full_key", None) or "?"
            raise ConfigError(f"bad value for '{key}' (from {source}): {e.msg if hasattr(e, 'msg') else e}") from None
    merged.profile = profile
    try:
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        raise ConfigError(f"missing or bad value for '{key}': {e}") from None


def parse_workers(value: Any, key: str = "num_workers") -> int | tuple[int, int]:
    """A worker count: a positive int, or [min, max] for elastic training."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in value) \
                or not 1 <= value[0] <= value[1]:
            raise ConfigError(f"{key} as a range must be [min, max] with 1 <= min <= max, got {list(value)}")
        return (value[0], value[1]) if value[0] != value[1] else value[0]
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{key} must be a positive number or [min, max], got {value!r}")
    return value


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Any) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} → {'a.b': 1}, for MLflow params."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out
