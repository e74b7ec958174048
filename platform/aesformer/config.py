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


def _check_keys(data: dict, schema: DictConfig, source: str, prefix: str = "") -> None:
    """Raise ConfigError for the first key in ``data`` that ``schema`` lacks."""
    for k, v in data.items():
        path = f"{prefix}{k}"
        if k not in schema:
            known = _known_keys(schema, prefix)
            close = difflib.get_close_matches(path, known, n=1, cutoff=0.5)
            hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(sorted(known))}"
            raise ConfigError(f"unknown config key '{path}' (from {source}){hint}")
        child = schema._get_node(k)
        is_struct = isinstance(child, DictConfig) and child._metadata.object_type not in (None, dict)
        if isinstance(v, dict) and is_struct:
            _check_keys(v, child, source, path + ".")


def _read_yaml(path: Path) -> dict:
    if not path.exists():
        return {}
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


def _parse_overrides(argv: Sequence[str]) -> dict:
    """``a.b=1 c=x`` → nested dict, values parsed as YAML scalars/lists."""
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
        if isinstance(value, str) or value is None:
            value = raw if raw != "" else None
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
