"""Config sections of the distillation job (composed by ``jobs/distill.py``)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

TEACHER_KINDS = ("measured", "openai", "local")
JUDGE_KINDS = ("none", "openai", "local")


@dataclass
class EndpointConfig:
    """An OpenAI-compatible chat-completions endpoint."""

    # everything before /chat/completions
    base_url: str = "https://api.openai.com/v1"
    model: str = "gpt-4o"
    # the API key is read from this environment variable (never written in config)
    api_key_env: Optional[str] = "OPENAI_API_KEY"
    timeout_s: float = 120.0
    # retries of 429 / 5xx / timeouts / malformed replies, exponential backoff from backoff_s
    max_retries: int = 5
    backoff_s: float = 2.0
    max_backoff_s: float = 60.0
    # request-rate limit (0: none) and requests in flight at once
    requests_per_minute: float = 60.0
    concurrency: int = 4
    # images are sent inline as data URLs, longer side at most image_max_side
    image_format: str = "jpeg"
    image_max_side: int = 1024


@dataclass
class LocalModelConfig:
    """A VLM run in a Ray actor pool through aesformer.engines."""

    # None: models.thinker for the teacher, models.judge for the judge
    model: Optional[str] = None
    # hf (transformers, CPU or one GPU) | vllm (GPU) | auto (vllm when CUDA and vllm are present)
    engine: str = "auto"
    num_actors: int = 1
    num_cpus: float = 1.0
    num_gpus: float = 0.0  # per actor; set to tensor_parallel_size for vllm
    # conversations per actor call (the engine batches them)
    batch_size: int = 8
    tensor_parallel_size: int = 1
    dtype: Optional[str] = None
    max_pixels: Optional[int] = None
    max_model_len: Optional[int] = None
    gpu_memory_utilization: Optional[float] = None


@dataclass
class TeacherConfig:
    # measured | openai | local
    kind: str = "measured"
    openai: EndpointConfig = field(default_factory=EndpointConfig)
    local: LocalModelConfig = field(default_factory=LocalModelConfig)
    temperature: float = 0.7
    top_p: float = 0.95
    max_tokens: int = 768
    # base seed of the sampling (each round adds its number); null: unseeded
    seed: Optional[int] = 0
    # give a model teacher the measured change as hints in its prompt
    hints: bool = True
    # replaces the teacher's instruction; "{format}" is filled with the seven-line template
    instruction: Optional[str] = None
    # longest side the images are measured at (measured teacher and geometry checks)
    measure_max_side: int = 480


@dataclass
class ValidatorConfig:
    # the judge model: none (rules and measured geometry only) | openai | local
    judge: str = "none"
    openai: EndpointConfig = field(default_factory=EndpointConfig)
    local: LocalModelConfig = field(default_factory=LocalModelConfig)
    # the judge's expected score (0..1, i.e. E[digit]/5) a plan needs
    min_score: float = 0.6
    # hold the plan against the measured geometry of the pair
    check_geometry: bool = True
    # True: nothing but the seven tagged lines; False: text around them is ignored
    strict_format: bool = False
    # rounds of teacher → validator → feedback before a pair is rejected
    max_rounds: int = 3


@dataclass
class BudgetConfig:
    """Spending cap over every model request of the run (teacher and judge,
    retries included); 0 = no cap. When reached, the job stops cleanly and
    writes everything finished."""

    max_requests: int = 0
    max_tokens: int = 0


@dataclass
class TranscriptConfig:
    enabled: bool = True
    # where the source videos are (a folder, a manifest or a list file, as
    # given to VCMP); null: read from the pairs' provenance (VCMP's input)
    videos: Optional[str] = None
    # speech recognition when a segment has no subtitles
    asr: bool = True
    model: str = "tiny:whisper"
    num_actors: int = 1
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    batch_size: int = 8
    language: Optional[str] = None
    max_new_tokens: int = 128
