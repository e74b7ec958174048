"""DeepSpeed for the learners (SFT and GRPO), on GPU and on CPU.

One config builder and the few calls a Ray Train loop needs around
``deepspeed.initialize``. What differs on a CPU-only machine:

- DeepSpeed picks its CPU accelerator by itself and talks over gloo (it
  would use oneCCL if ``oneccl_bindings_for_pytorch`` were installed); Ray
  Train must then start its process group with ``TorchConfig(backend="gloo")``
  (:func:`torch_backend` says which).
- Its communication backend would JIT-compile a shared-memory op (about two
  minutes on a fresh 2-core machine) that only its inference all-reduce
  uses; training never calls it, so :func:`init_distributed` skips the build
  on CPU (:func:`skip_unused_ops`).
- DeepSpeed's fused and CPU Adam kernels would be compiled too, so the config
  asks for ``torch.optim.AdamW`` (``torch_adam``): the same update rule,
  nothing to build, on both devices.

ZeRO-2 and ZeRO-3, fp32 or bf16, train and checkpoint/resume inside a Ray
TorchTrainer this way. ``micro_batch`` and ``grad_accum`` are per worker;
DeepSpeed derives the global batch from the world size, so an elastic run
(``num_workers=(min, max)``) keeps them when the world size changes.

Typical use inside ``train_loop_per_worker``::

    init_distributed()                        # reuse Ray Train's process group
    conf = deepspeed_config(zero_stage=2, bf16=False, lr=1e-4, weight_decay=0.0,
                            grad_clip=1.0, micro_batch=2, grad_accum=8)
    engine = initialize(model, conf, lr_scheduler=lambda opt: my_schedule(opt))
    loss = engine(**batch).loss; engine.backward(loss); engine.step()
    save_checkpoint(engine, ckpt_dir, {"step": step})   # every rank calls it
    state = load_checkpoint(engine, ckpt_dir)            # every rank calls it
"""
from __future__ import annotations

import json

import contextlib
import logging
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

log = logging.getLogger(__name__)

# The tag DeepSpeed files are saved under inside a checkpoint folder:
# <dir>/deepspeed/..., plus DeepSpeed's own <dir>/latest pointer.
CHECKPOINT_TAG = "deepspeed"
# DeepSpeed returns its own bookkeeping beside the client state on load; ours
# travels under this one key.
CLIENT_KEY = "aesformer_client_state"


def deepspeed_config(
    zero_stage: int = 2,
    bf16: bool = False,
    lr: float = 1e-4,
    weight_decay: float = 0.0,
    grad_clip: Optional[float] = 1.0,
    micro_batch: int = 1,
    grad_accum: int = 1,
    *,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    offload_optimizer: bool = False,
    offload_params: bool = False,
    optimizer: bool = True,
) -> dict:
    """A DeepSpeed config dict for ``deepspeed.initialize(config=...)``.

    ``micro_batch`` is samples per worker per forward pass and ``grad_accum``
    the forward passes per optimizer step; the global batch is
    ``micro_batch × grad_accum × world size``. ``optimizer=False`` leaves the
    optimizer out (pass your own to ``deepspeed.initialize``). ZeRO-3 keeps
    16-bit weights gatherable on save so a consolidated model can be written.
    """
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage must be 0, 1, 2 or 3, got {zero_stage}")
    if micro_batch < 1 or grad_accum < 1:
        raise ValueError(f"micro_batch and grad_accum must be >= 1, got {micro_batch} and {grad_accum}")
    zero: dict[str, Any] = {"stage": zero_stage}
    if zero_stage >= 2:
        zero.update(contiguous_gradients=True, overlap_comm=False)
    if zero_stage == 3:
        zero.update(stage3_gather_16bit_weights_on_model_save=True)
    if offload_optimizer:
        if zero_stage == 0:
            raise ValueError("optimizer offload needs ZeRO stage 1 or more")
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if offload_params:
        if zero_stage != 3:
            raise ValueError("parameter offload needs ZeRO stage 3")
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    conf: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": int(micro_batch),
        "gradient_accumulation_steps": int(grad_accum),
        "zero_optimization": zero,
        "bf16": {"enabled": bool(bf16)},
        # we log through MLflow; DeepSpeed's own step prints would flood the log
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
    }
    if grad_clip is not None and grad_clip > 0:
        conf["gradient_clipping"] = float(grad_clip)
    if optimizer:
        conf["optimizer"] = {
            "type": "AdamW",
            "params": {
                "lr": float(lr),
                "betas": [float(betas[0]), float(betas[1])],
                "eps": float(eps),
                "weight_decay": float(weight_decay),
                # torch.optim.AdamW: no kernel to compile, same maths on CPU and GPU
                "torch_adam": not offload_optimizer,
            },
        }
    return conf


def has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def torch_backend() -> str:
    """The torch.distributed backend for Ray Train's ``TorchConfig``."""
    return "nccl" if has_cuda() else "gloo"


def skip_unused_ops() -> None:
    """Keep DeepSpeed from compiling its CPU shared-memory all-reduce op:
    only inference tensor parallelism uses it, never a training step."""
    if has_cuda():
        return
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def init_distributed() -> None:
    """Make DeepSpeed use the process group Ray Train already created."""
    import deepspeed
    import torch.distributed as dist

    skip_unused_ops()
    if dist.is_available() and dist.is_initialized():
        deepspeed.init_distributed(dist_backend=dist.get_backend(), verbose=False)
    else:  # a single process outside Ray Train (a debugging session)
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29512")
        deepspeed.init_distributed(dist_backend=torch_backend(), verbose=False)


def trainable_parameters(model: Any) -> list:
    return [p for p in model.parameters() if p.requires_grad]


def initialize(model: Any, config: dict, lr_scheduler: Optional[Callable] = None,
               optimizer: Any = None) -> Any:
    """``deepspeed.initialize`` over the trainable parameters only (frozen
    ones get no optimizer state); returns the engine.

    ``lr_scheduler`` may be a callable taking the optimizer DeepSpeed built;
    the engine steps it once per optimizer step.
    """
    import deepspeed

    init_distributed()
    params = trainable_parameters(model)
    if not params:
        raise ValueError("the model has no trainable parameters")
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=params, config=config,
                                           optimizer=optimizer, lr_scheduler=lr_scheduler)
    return engine


def save_checkpoint(engine: Any, directory: str | os.PathLike, client_state: Optional[dict] = None) -> None:
    """Save model, optimizer, scheduler and ``client_state`` into ``directory``.

    A collective: every rank calls it (each writes its ZeRO partition). On a
    single node Ray Train merges the ranks' folders into one checkpoint.
    """
    Path(directory).mkdir(parents=True, exist_ok=True)
    engine.save_checkpoint(str(directory), tag=CHECKPOINT_TAG, client_state={CLIENT_KEY: dict(client_state or {})})


def load_checkpoint(engine: Any, directory: str | os.PathLike) -> dict:
    """Restore what :func:`save_checkpoint` wrote; returns its client state.

    A collective: every rank calls it. Raises FileNotFoundError naming the
    folder when it holds no DeepSpeed checkpoint.
    """
    if not (Path(directory) / CHECKPOINT_TAG).is_dir():
        raise FileNotFoundError(f"no DeepSpeed checkpoint in {directory} (expected a '{CHECKPOINT_TAG}' folder)")
    path, client_state = engine.load_checkpoint(str(directory), tag=CHECKPOINT_TAG, load_optimizer_states=True,
                                                load_lr_scheduler_states=True)
    if path is None:
        raise FileNotFoundError(f"DeepSpeed could not load the checkpoint in {directory}")
    return dict((client_state or {}).get(CLIENT_KEY, {}))


def choose_zero_stage(parameters: int, *, bf16: bool, world: int, rank_memory_bytes: float,
                      headroom: float = 0.5) -> int:
    """ZeRO-2 when a whole copy of the weights and gradients plus this rank's
    share of the optimizer states (Adam: fp32 moments, and fp32 master
    weights under bf16) takes at most ``headroom`` of a rank's memory (the
    rest is for activations); otherwise ZeRO-3, which partitions the weights
    too and pays a gather of every layer in every forward and backward pass."""
    weight = 2 if bf16 else 4
    optimizer = 12 if bf16 else 8
    per_rank = parameters * 2 * weight + parameters * optimizer / max(1, world)
    return 2 if per_rank <= headroom * rank_memory_bytes else 3


def count_parameters(location: str) -> Optional[int]:
    """Parameters of the model folder at ``location`` (a path or a URI),
    from its safetensors headers alone; None when it has none."""
    import struct

    from aesformer import storage

    files = [f for f in storage.listdir(location) if f.endswith(".safetensors")]
    if not files:
        return None
    total = 0
    for name in files:
        fs, path = storage.filesystem(storage.join(location, name))
        with fs.open_input_file(path) as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        for key, entry in header.items():
            if key != "__metadata__":
                n = 1
                for d in entry["shape"]:
                    n *= int(d)
                total += n
    return total


@contextlib.contextmanager
def gathered(params: Iterable) -> Iterator[None]:
    """Inside the block, ZeRO-3 partitioned parameters hold their full value
    on every rank (read only); a no-op for ZeRO 0-2. A collective."""
    params = list(params)
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            yield
    else:
        yield


def global_grad_norm(engine: Any) -> Optional[float]:
    """The gradient norm of the last optimizer step (before clipping), if known."""
    norm = engine.get_global_grad_norm()
    if norm is None:
        return None
    try:
        return float(norm)
    except (TypeError, ValueError):
        return None


def layer_key(name: str) -> str:
    """The layer a parameter belongs to: the name up to its ``layers.<i>``
    index (``model.language_model.layers.3.mlp.up_proj.weight`` →
    ``model.language_model.layers.3``), else everything but the last part."""
    parts = name.split(".")
    for i in range(len(parts) - 1):
        if parts[i] in ("layers", "blocks", "h") and parts[i + 1].isdigit():
            return ".".join(parts[:i + 2])
    return ".".join(parts[:-1])


class GatheredSource:
    """Full weights out of a (possibly ZeRO-3 partitioned) model, a few layers
    at a time: ``metadata`` lists (name, dtype, full shape) without gathering
    anything; ``iter_full()`` gathers a group of whole layers on every rank (a
    collective: call it on every rank, in step) and yields (name, full tensor)
    while that group is gathered, then releases it. A group holds consecutive
    layers up to ``max_bytes`` of full weights (one layer when it is larger;
    ``max_bytes=0``: one layer a group), so peak extra memory is about
    ``max_bytes`` or one layer, never the whole model, and a model of small
    layers is not gathered in many small collectives."""

    def __init__(self, named_parameters: Iterable[tuple[str, Any]], max_bytes: int = 0):
        self.params = list(named_parameters)
        self.max_bytes = int(max_bytes)

    @property
    def metadata(self) -> list[tuple[str, Any, tuple[int, ...]]]:
        return [(n, p.dtype, tuple(getattr(p, "ds_shape", p.shape))) for n, p in self.params]

    def layers(self) -> list[list[tuple[str, Any]]]:
        groups: list[list[tuple[str, Any]]] = []
        last = None
        for name, p in self.params:
            key = layer_key(name)
            if key != last:
                groups.append([])
                last = key
            groups[-1].append((name, p))
        return groups

    def groups(self) -> list[list[tuple[str, Any]]]:
        """The layers, merged into runs of at most ``max_bytes``."""
        out: list[list[tuple[str, Any]]] = []
        size = 0
        for layer in self.layers():
            n = sum(getattr(p, "ds_numel", p.numel()) * p.element_size() for _, p in layer)
            if out and size + n <= self.max_bytes:
                out[-1].extend(layer)
                size += n
            else:
                out.append(list(layer))
                size = n
        return out

    def iter_full(self) -> Iterator[tuple[str, Any]]:
        for group in self.groups():
            with gathered([p for _, p in group]):
                for name, p in group:
                    yield name, p.data
