"""Ray plumbing of the distillation job: the local VLM pool (teacher and/or
judge), the Whisper pool, the measuring tasks, and the factories that turn
the job's config into a teacher, a validator and a transcriber.

Each VLM actor holds one engine (vLLM on GPU, transformers on CPU) behind an
:class:`aesformer.distill.chat.EngineChat`; the driver-side
:class:`LocalChat` has the same interface as the OpenAI client, splits a
batch of conversations across the pool, and charges each one to the
budget. A teacher and a judge that name the same model and engine share one
pool.
"""
from __future__ import annotations

import logging
from typing import Any, Optional, Sequence

import ray

from aesformer.actors.pool import ResilientPool, run_tag
from aesformer.cluster import use_worker_threads
from aesformer.distill.chat import Budget, BudgetExhausted, EngineChat, OpenAIChat, Reply
from aesformer.distill.settings import JUDGE_KINDS, TEACHER_KINDS, EndpointConfig, LocalModelConfig
from aesformer.distill.teachers import ChatTeacher, MeasuredTeacher
from aesformer.distill.validator import Judge, Validator

log = logging.getLogger(__name__)


def _engine_options(kind: str, c: LocalModelConfig) -> dict:
    opts = {"dtype": c.dtype, "max_pixels": c.max_pixels}
    if kind == "vllm":
        opts.update(tensor_parallel_size=c.tensor_parallel_size, max_model_len=c.max_model_len,
                    gpu_memory_utilization=c.gpu_memory_utilization, max_images=2)
    else:
        opts["batch_size"] = c.batch_size
    return {k: v for k, v in opts.items() if v is not None}


# -- actors --------------------------------------------------------------------------

@ray.remote
class VLMWorker:
    """One engine; answers chat completions and first-token scores."""

    def __init__(self, model_path: str, engine_kind: str, config: dict):
        use_worker_threads()
        import torch

        from aesformer.engines import make_engine, resolve_engine_kind

        kind = resolve_engine_kind(engine_kind)
        opts = _engine_options(kind, LocalModelConfig(**config))
        if kind == "hf":
            opts.setdefault("device", "cuda" if torch.cuda.is_available() else "cpu")
        self.chat = EngineChat(make_engine(kind, model_path, **opts), model=model_path, kind=kind)

    def complete(self, conversations: list, sampling: dict, top_logprobs: int = 0) -> list[dict]:
        return [r.to_dict() for r in self.chat.complete(conversations, sampling, top_logprobs)]

    def score(self, conversations: list, candidates: list) -> list[dict]:
        return [r.to_dict() for r in self.chat.score(conversations, candidates)]


@ray.remote
class WhisperWorker:
    """Speech recognition of video segments (the audio is decoded here, next to the file)."""

    def __init__(self, model_path: str, language: Optional[str], max_new_tokens: int):
        use_worker_threads()
        import torch

        from aesformer.distill.transcript import WhisperTranscriber

        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.asr = WhisperTranscriber(model_path, device=device, language=language, max_new_tokens=max_new_tokens)

    def transcribe(self, items: list) -> list[dict]:
        """[{"text"} or {"error"}] for each (video, start, end)."""
        from aesformer.distill.transcript import segment_audio

        audios, out = [], []
        for video, start, end in items:
            try:
                audios.append(segment_audio(video, start, end))
                out.append({})
            except Exception as e:  # a broken audio stream: this segment gets no transcript
                audios.append(None)
                out.append({"error": f"audio does not decode: {type(e).__name__}: {e}"})
        ok = [i for i, a in enumerate(audios) if a is not None]
        for i, text in zip(ok, self.asr.transcribe([audios[i] for i in ok])):
            out[i]["text"] = text
        return out


@ray.remote(num_cpus=1)
def measure_remote(poor: bytes, good: bytes, max_side: int) -> dict:
    """The measured change of one pair (images as encoded bytes)."""
    from aesformer.data import decode_image
    from aesformer.distill.measured import measure_pair

    try:
        return measure_pair(decode_image(poor), decode_image(good), max_side=max_side)
    except Exception as e:  # an undecodable image: the pair is unmeasured, not the job dead
        return {"error": f"{type(e).__name__}: {e}"}


def measure_many(pairs: Sequence[tuple[bytes, bytes]], max_side: int, timeout: float = 600.0) -> list[dict]:
    """Measure pairs as parallel Ray tasks (at most ``timeout`` seconds for all)."""
    from ray.exceptions import GetTimeoutError

    try:
        return ray.get([measure_remote.remote(p, g, max_side) for p, g in pairs], timeout=timeout)
    except GetTimeoutError:
        raise TimeoutError(f"measuring {len(pairs)} pairs (tasks measure_remote) did not finish within "
                           f"{timeout:.0f}s") from None


# -- the driver's side ----------------------------------------------------------------

def vlm_pool(model_path: str, c: LocalModelConfig, role: str, threads: int = 1,
             timeouts: Optional[dict] = None) -> ResilientPool:
    """``c.num_actors`` :class:`VLMWorker` actors on a placement group;
    ``timeouts``: the pool's ``ready_timeout`` and ``call_timeout``."""
    import dataclasses

    config = dataclasses.asdict(c)
    return ResilientPool(run_tag(f"distill-{role}"), VLMWorker, c.num_actors, {"CPU": c.num_cpus, "GPU": c.num_gpus},
                     lambda i: (model_path, c.engine, config),
                     env={"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}, **(timeouts or {}))


class LocalChat:
    """A pool of :class:`VLMWorker` behind the chat-backend interface; each
    conversation is one request against the budget under ``role``."""

    def __init__(self, pool: ResilientPool, model_name: str, c: LocalModelConfig, budget: Budget, role: str):
        self.pool, self.model_name, self.c = pool, model_name, c
        self.budget, self.role = budget, role

    def settings(self) -> dict:
        return {"backend": "local", "engine": self.c.engine, "model": self.model_name}

    def _charge(self, n: int) -> int:
        """How many of ``n`` requests the budget allows."""
        for k in range(n):
            try:
                self.budget.reserve(self.role)
            except BudgetExhausted:
                return k
        return n

    def _run(self, method: str, conversations: Sequence, *args: Any) -> list[Reply]:
        allowed = self._charge(len(conversations))
        todo = list(conversations[:allowed])
        size = max(1, self.c.batch_size)
        chunks = [(todo[i:i + size], *args) for i in range(0, len(todo), size)]
        out: list[Reply] = []
        for part in self.pool.map(method, chunks):
            out.extend(Reply(**d) for d in part)
        for r in out:
            self.budget.charge(r.prompt_tokens, r.completion_tokens)
        reason = self.budget.exhausted_reason() or "spending cap reached"
        out.extend(Reply(error=reason, stopped="budget") for _ in conversations[allowed:])
        return out

    def complete(self, conversations: Sequence, sampling: Optional[dict] = None, top_logprobs: int = 0) -> list[Reply]:
        return self._run("complete", conversations, dict(sampling or {}), top_logprobs)

    def score(self, conversations: Sequence, candidates: Sequence[str]) -> list[Reply]:
        return self._run("score", conversations, list(candidates))

class WhisperPool:
    """Whisper actors, started on first use."""

    def __init__(self, model_path: str, c: Any, threads: int = 1, timeouts: Optional[dict] = None):
        self.model_path, self.c, self.threads = model_path, c, threads
        self.timeouts = dict(timeouts or {})
        self.pool: Optional[ResilientPool] = None

    def transcribe(self, items: Sequence[tuple[str, float, float]]) -> list[dict]:
        if not items:
            return []
        if self.pool is None:
            self.pool = ResilientPool(run_tag("distill-asr"), WhisperWorker, self.c.num_actors,
                                  {"CPU": self.c.num_cpus, "GPU": self.c.num_gpus},
                                  lambda i: (self.model_path, self.c.language, self.c.max_new_tokens),
                                  env={"OMP_NUM_THREADS": str(self.threads), "MKL_NUM_THREADS": str(self.threads)},
                                  **self.timeouts)
        size = max(1, self.c.batch_size)
        chunks = [(list(items[i:i + size]),) for i in range(0, len(items), size)]
        return [r for part in self.pool.map("transcribe", chunks) for r in part]

    def shutdown(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()


# -- factories -----------------------------------------------------------------------

def openai_chat(e: EndpointConfig, budget: Budget, role: str) -> OpenAIChat:
    return OpenAIChat(e.base_url, e.model, api_key_env=e.api_key_env, timeout_s=e.timeout_s,
                      max_retries=e.max_retries, backoff_s=e.backoff_s, max_backoff_s=e.max_backoff_s,
                      requests_per_minute=e.requests_per_minute, concurrency=e.concurrency, budget=budget,
                      image_format=e.image_format, image_max_side=e.image_max_side, role=role)


class Backends:
    """Builds and owns the job's model backends; shares a local pool between
    a teacher and a judge that name the same model and engine."""

    def __init__(self, budget: Budget, cache_dir: Optional[str], threads: int = 1, timeouts: Optional[dict] = None):
        self.budget, self.cache_dir, self.threads = budget, cache_dir, threads
        self.timeouts = dict(timeouts or {})  # each pool's ready_timeout and call_timeout
        self._pools: dict[tuple, LocalChat] = {}

    def local(self, c: LocalModelConfig, default_model: str, role: str, config_key: str) -> LocalChat:
        import dataclasses

        from aesformer.models import resolve_model

        name = c.model or default_model
        path = resolve_model(name, self.cache_dir, config_key=config_key)
        key = (path, tuple(sorted((k, v) for k, v in dataclasses.asdict(c).items() if k != "model")))
        if key not in self._pools:
            self._pools[key] = vlm_pool(path, c, role, self.threads, self.timeouts)
        return LocalChat(self._pools[key], name, c, self.budget, role)

    def shutdown(self) -> None:
        for p in self._pools.values():
            p.shutdown()
        self._pools.clear()


def make_teacher(t: Any, models: Any, backends: Backends):
    """The teacher named by ``t.kind`` (a TeacherConfig); ``models`` is the job's ModelsConfig."""
    if t.kind not in TEACHER_KINDS:
        raise ValueError(f"teacher.kind must be one of {', '.join(TEACHER_KINDS)}, got '{t.kind}'")
    if t.kind == "measured":
        return MeasuredTeacher(max_side=t.measure_max_side)
    chat = openai_chat(t.openai, backends.budget, "teacher") if t.kind == "openai" else \
        backends.local(t.local, models.thinker, "teacher", "teacher.local.model")
    return ChatTeacher(chat, kind=t.kind, temperature=t.temperature, top_p=t.top_p, max_tokens=t.max_tokens,
                       seed=t.seed, hints=t.hints, instruction=t.instruction)


def make_validator(v: Any, models: Any, backends: Backends) -> Validator:
    """The validator of a ValidatorConfig, with its judge (if any)."""
    if v.judge not in JUDGE_KINDS:
        raise ValueError(f"validator.judge must be one of {', '.join(JUDGE_KINDS)}, got '{v.judge}'")
    judge = None
    if v.judge == "openai":
        judge = Judge(openai_chat(v.openai, backends.budget, "judge"))
    elif v.judge == "local":
        judge = Judge(backends.local(v.local, models.judge, "judge", "validator.local.model"))
    return Validator(judge, min_score=v.min_score, check_geometry=v.check_geometry, strict_format=v.strict_format)
