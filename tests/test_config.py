"""The config system: merge order, profiles, and errors that name the key."""
from dataclasses import dataclass, field
from typing import Any

import pytest

from aesformer.config import ConfigError, JobConfig, load_config


@dataclass
class OptimConfig:
    lr: float = 1e-4
    warmup: float = 0.1


@dataclass
class DemoConfig(JobConfig):
    output: str = "runs/demo"
    epochs: int = 2
    num_workers: Any = 1
    optim: OptimConfig = field(default_factory=OptimConfig)


@pytest.fixture
def conf(tmp_path, monkeypatch):
    (tmp_path / "profiles").mkdir()
    (tmp_path / "demo.yaml").write_text("epochs: 3\noptim:\n  lr: 0.001\n")
    (tmp_path / "profiles" / "tiny.yaml").write_text(
        "models:\n  thinker: tiny:thinker\nray:\n  num_cpus: 8\njobs:\n  demo:\n    optim:\n      warmup: 0.5\n")
    (tmp_path / "profiles" / "a40.yaml").write_text("models:\n  thinker: Qwen/Qwen3-VL-8B-Instruct\njobs: {}\n")
    monkeypatch.setenv("AESFORMER_CONF", str(tmp_path))
    return tmp_path


def test_defaults_then_job_yaml_then_profile_then_command_line(conf):
    cfg = load_config(DemoConfig, "demo", ["optim.lr=0.5"])
    assert cfg.epochs == 3            # job yaml over the dataclass default 2
    assert cfg.optim.warmup == 0.5    # profile's jobs.demo block
    assert cfg.ray.num_cpus == 8      # profile's shared block
    assert cfg.optim.lr == 0.5        # command line last
    assert cfg.models.thinker == "tiny:thinker"


def test_profile_switch_swaps_models(conf):
    cfg = load_config(DemoConfig, "demo", ["profile=a40"])
    assert cfg.profile == "a40"
    assert cfg.models.thinker == "Qwen/Qwen3-VL-8B-Instruct"
    assert cfg.ray.num_cpus is None


def test_null_on_the_command_line_is_none(conf):
    cfg = load_config(DemoConfig, "demo", ["ray.num_cpus=null", "ray.address=~", "ray.num_gpus="])
    assert (cfg.ray.num_cpus, cfg.ray.address, cfg.ray.num_gpus) == (None, None, None)
    assert load_config(DemoConfig, "demo", ["output=None"]).output == "None"  # a string stays as typed


def test_unknown_key_names_it_and_the_closest_valid_one(conf):
    with pytest.raises(ConfigError, match=r"'optim\.lrr'.*did you mean 'optim\.lr'"):
        load_config(DemoConfig, "demo", ["optim.lrr=1"])
    with pytest.raises(ConfigError, match=r"'epocs'.*'epochs'"):
        load_config(DemoConfig, "demo", ["epocs=1"])


def test_unknown_key_in_a_yaml_file_is_an_error_too(conf):
    (conf / "demo.yaml").write_text("epoch: 3\n")
    with pytest.raises(ConfigError, match=r"'epoch'.*demo\.yaml"):
        load_config(DemoConfig, "demo", [])


def test_wrong_type_names_the_key(conf):
    with pytest.raises(ConfigError, match="epochs"):
        load_config(DemoConfig, "demo", ["epochs=many"])


def test_unknown_profile_lists_the_available_ones(conf):
    with pytest.raises(ConfigError, match="unknown profile 'h100'.*a40, tiny"):
        load_config(DemoConfig, "demo", ["profile=h100"])


def test_values_parse_as_yaml_scalars_and_lists(conf):
    cfg = load_config(DemoConfig, "demo", ["num_workers=[1, 4]", "ray.address=127.0.0.1:6379", "output=/tmp/x"])
    assert cfg.num_workers == [1, 4]
    assert cfg.ray.address == "127.0.0.1:6379"
    assert cfg.output == "/tmp/x"


def test_argument_without_equals_is_rejected(conf):
    with pytest.raises(ConfigError, match="not key=value"):
        load_config(DemoConfig, "demo", ["epochs"])


def test_every_job_yaml_in_conf_loads_with_both_profiles(monkeypatch):
    """The shipped conf/ files agree with the shipped schemas."""
    import importlib
    from pathlib import Path

    monkeypatch.delenv("AESFORMER_CONF", raising=False)
    repo = Path(__file__).resolve().parents[1]
    checked = 0
    for path in sorted((repo / "conf").glob("*.yaml")):
        job = path.stem
        try:
            module = importlib.import_module(f"aesformer.jobs.{job}")
        except ModuleNotFoundError:
            continue
        schemas = [v for v in vars(module).values()
                   if isinstance(v, type) and issubclass(v, JobConfig) and v is not JobConfig
                   and v.__module__ == module.__name__]
        assert schemas, f"jobs/{job}.py declares no JobConfig schema"
        for profile in ("tiny", "a40"):
            load_config(schemas[0], job, [f"profile={profile}"])
        checked += 1
    assert checked >= 1
