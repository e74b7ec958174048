"""The Ray Serve application: an HTTP ingress (FastAPI) ▶ a Thinker
deployment ▶ an Editor deployment, each with its own resources and
autoscaling (:func:`aesformer.serving.deployment_options`).

- ``Thinker``: the thinker behind the engine interface (transformers on CPU,
  vLLM on GPU). Plans and chat completions go through one ``@serve.batch``
  method, so concurrent requests share a ``generate`` call.
- ``Editor``: the pipeline's editor with the AesEditor LoRA
  (:class:`aesformer.pipeline.AesFormer`), one edit at a time per replica.
- ``Ingress``: the routes, input checks, bearer token, timeouts and queue
  limits; the web page at ``/``.

Models load once per replica, in its constructor. ``build(cfg)`` makes the
application; ``build_app(args)`` is the import path of a Serve config file
(``serve run cluster/serve.yaml``): its args are the job's ``key=value``
overrides.
"""
# No ``from __future__ import annotations`` here: FastAPI reads the routes'
# parameter annotations (``Request``) at run time.
import asyncio
import io
import logging
import os
import threading
import time
from dataclasses import replace
from typing import Any, Optional

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse
from ray import serve
from ray.serve.exceptions import BackPressureError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from aesformer.serving import (ApiError, ChatCall, ServeConfig, check_bearer, deployment_options, fit_pixels,
                               image_edit_response, int_field, local_folder, models_response, parse_chat, parse_size,
                               plan_view, png_b64, png_bytes, read_image, refuse_url, run_chat, timings)

log = logging.getLogger(__name__)


def _model_path(name: str, cfg: ServeConfig, key: str) -> str:
    from aesformer.models import resolve_model

    return resolve_model(local_folder(name, cfg.models.cache_dir), cfg.models.cache_dir, config_key=key)


# -- the thinker -------------------------------------------------------------------------


@serve.deployment
class Thinker:
    """AesThinker behind the engine interface; requests are batched."""

    def __init__(self, cfg: ServeConfig):
        from aesformer.actions import thinker_instruction
        from aesformer.cluster import use_worker_threads
        from aesformer.engines import SamplingSettings, make_engine, resolve_engine_kind

        use_worker_threads()
        t = cfg.think
        self.path = _model_path(cfg.thinker or cfg.models.thinker, cfg, "thinker")
        self.kind = resolve_engine_kind(t.engine)
        if self.kind == "vllm":
            options = dict(dtype=t.dtype, max_pixels=t.max_pixels, tensor_parallel_size=t.tensor_parallel)
        else:
            gpu = t.deployment.num_gpus > 0
            options = dict(dtype=t.dtype if gpu else "float32", device="cuda" if gpu else "cpu",
                           max_pixels=t.max_pixels, batch_size=t.max_batch_size)
        self.engine = make_engine(self.kind, self.path, **options)
        self.instruction = thinker_instruction(t.instruction)
        self.sampling = SamplingSettings(temperature=t.temperature, top_p=t.top_p, max_tokens=t.max_tokens)
        self.model_name = cfg.model_name
        self.lock = threading.Lock()  # one generate at a time on this replica's model
        self.batches: list[int] = []  # sizes of the batches run (the latest 1000)
        self._batched.set_max_batch_size(t.max_batch_size)
        self._batched.set_batch_wait_timeout_s(t.batch_wait_timeout_s)
        log.info("thinker %s loaded (%s engine, batches of up to %d)", self.path, self.kind, t.max_batch_size)

    def ready(self) -> dict:
        return {"model": self.path, "engine": self.kind}

    def batch_sizes(self) -> list[int]:
        return list(self.batches)

    def _run(self, calls: list[ChatCall]) -> list[dict]:
        with self.lock:
            self.batches = (self.batches + [len(calls)])[-1000:]
            return run_chat(self.engine, calls, self.model_name)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _batched(self, calls: list[ChatCall]) -> list[dict]:
        return await asyncio.to_thread(self._run, calls)

    async def chat(self, call: ChatCall) -> dict:
        return await self._batched(call)

    async def plan(self, png: bytes, seed: int) -> str:
        from PIL import Image

        photo = Image.open(io.BytesIO(png)).convert("RGB")
        call = ChatCall({"images": [photo], "text": self.instruction}, replace(self.sampling, n=1, seed=seed),
                        usage=False)
        reply = await self._batched(call)
        return reply["choices"][0]["message"]["content"]


# -- the editor --------------------------------------------------------------------------


@serve.deployment
class Editor:
    """AesEditor: the pipeline's editor with the LoRA; one edit at a time."""

    def __init__(self, cfg: ServeConfig):
        from aesformer.cluster import use_worker_threads
        from aesformer.editor import Editor as EditPipeline
        from aesformer.pipeline import AesFormer

        use_worker_threads()
        e = cfg.edit
        gpu = e.deployment.num_gpus > 0
        name = cfg.editor or cfg.models.editor
        self.path = _model_path(name, cfg, "editor")
        lora = local_folder(cfg.lora, cfg.models.cache_dir) if cfg.lora else None
        editor = EditPipeline.load(self.path, lora=lora, control_area=e.control_area, condition_area=e.condition_area,
                                   dtype=e.dtype if gpu else "float32", device="cuda" if gpu else "cpu", name=name,
                                   offload=e.offload)
        self.aesformer = AesFormer(None, editor, steps=e.steps, true_cfg_scale=e.true_cfg_scale,
                                   negative_prompt=e.negative_prompt, output_area=e.output_area)
        self.lora = cfg.lora
        # a thread lock, not an asyncio one: a request cancelled by its timeout
        # leaves its edit running in the thread, and the next one waits for it
        self.lock = threading.Lock()
        log.info("editor %s loaded (LoRA: %s)", self.path, self.lora)

    def ready(self) -> dict:
        return {"model": self.path, "lora": self.lora}

    def _edit(self, png: bytes, plan: str, seed: int, steps: Optional[int], width: Optional[int],
              height: Optional[int]) -> bytes:
        from PIL import Image

        photo = Image.open(io.BytesIO(png)).convert("RGB")
        with self.lock:
            out = self.aesformer.edit(photo, plan, seed=seed, height=height, width=width, steps=steps)
        return png_bytes(out)

    async def edit(self, png: bytes, plan: str, seed: int = 0, steps: Optional[int] = None,
                   width: Optional[int] = None, height: Optional[int] = None) -> bytes:
        return await asyncio.to_thread(self._edit, png, plan, seed, steps, width, height)


# -- the HTTP ingress --------------------------------------------------------------------

api = FastAPI(title="AesFormer", docs_url=None, redoc_url=None, openapi_url=None)  # no pages with external assets


@api.exception_handler(ApiError)
async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    message = f"no route {request.method} {request.url.path}" if exc.status_code in (404, 405) else str(exc.detail)
    return JSONResponse(ApiError(exc.status_code, message).body(), status_code=exc.status_code,
                        headers=getattr(exc, "headers", None))


@serve.deployment
@serve.ingress(api)
class Ingress:
    def __init__(self, thinker: Any, editor: Any, cfg: ServeConfig):
        from aesformer.serve_page import PAGE

        self.thinker, self.editor, self.cfg, self.http = thinker, editor, cfg, cfg.http
        self.page = PAGE
        env = self.http.api_key_env
        self.token = os.environ.get(env) if env else None
        if env and not self.token:
            log.warning("http.api_key_env names %s, which is not set: the API is open", env)

    # -- plumbing
    def _auth(self, request: Request) -> None:
        check_bearer(request.headers.get("authorization"), self.token)

    def _timeout(self, request: Request) -> float:
        """The request's time limit: ``http.request_timeout_s``, or less when
        the client asks for less with an ``X-Request-Timeout`` header (seconds)."""
        limit = float(self.http.request_timeout_s)
        asked = request.headers.get("x-request-timeout")
        if asked is None:
            return limit
        try:
            value = float(asked)
        except ValueError:
            raise ApiError(400, f"'X-Request-Timeout' must be a number of seconds, got {asked[:40]!r}") from None
        if not value > 0:
            raise ApiError(400, f"'X-Request-Timeout' must be positive, got {value:g}")
        return min(limit, value)

    async def _await(self, response: Any, deadline: float, stage: str) -> Any:
        try:
            return await asyncio.wait_for(response, timeout=max(0.001, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            response.cancel()
            raise ApiError(504, "the request ran past its time limit (in the {stage}) and was cancelled; "
                                "the service goes on".format(stage=stage), "timeout") from None
        except BackPressureError:
            raise ApiError(503, f"the {stage} queue is full; retry later", "overloaded",
                           {"Retry-After": str(self.http.retry_after_s)}) from None

    async def _form(self, request: Request) -> Any:
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != "multipart/form-data":
            raise ApiError(415, f"send multipart/form-data with the image as a file field (got '{ctype or 'none'}')",
                           "unsupported_media_type")
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > self.http.max_image_bytes + (1 << 20):
            raise ApiError(413, f"the request is {length} bytes; images may have at most "
                                f"{self.http.max_image_bytes} bytes", "request_too_large")
        try:
            return await request.form(max_files=4, max_fields=32)
        except StarletteHTTPException as e:
            raise ApiError(400, f"the multipart body does not parse: {e.detail}") from None

    async def _photo(self, form: Any, name: str = "image") -> tuple[Any, dict]:
        value = form.get(name)
        if value is None and name == "image":
            value = form.get("image[]")
        if value is None:
            raise ApiError(400, f"missing the '{name}' file field", param=name)
        if isinstance(value, str):
            refuse_url(value, name)
            raise ApiError(400, f"'{name}' must be a file upload, not a text field", param=name)
        assert isinstance(value, UploadFile)
        data = await value.read()
        photo, info = await asyncio.to_thread(read_image, data, max_bytes=self.http.max_image_bytes,
                                              max_pixels=self.http.max_image_pixels, field_name=name,
                                              content_type=value.content_type)
        photo = fit_pixels(photo, self.http.model_pixels)
        info.update(model_width=photo.width, model_height=photo.height)
        return photo, info

    async def _reconstruct(self, form: Any, *, plan: Optional[str], width: Optional[int],
                           height: Optional[int], timeout: float) -> dict:
        t0 = time.monotonic()
        deadline = t0 + timeout
        seed = int_field(form.get("seed"), "seed", 0, 2**31 - 1, 0)
        steps = int_field(form.get("steps"), "steps", 2, self.cfg.edit.max_steps)
        photo, info = await self._photo(form)
        png = await asyncio.to_thread(png_bytes, photo)
        spent = {"decode": time.monotonic() - t0}
        if plan is None or not plan.strip():
            t = time.monotonic()
            plan = await self._await(self.thinker.plan.remote(png, seed), deadline, "thinker")
            spent["think"] = time.monotonic() - t
        view = plan_view(plan)
        t = time.monotonic()
        out = await self._await(self.editor.edit.remote(png, view["text"], seed, steps, width, height), deadline,
                                "editor")
        spent["edit"] = time.monotonic() - t
        spent["total"] = time.monotonic() - t0
        from PIL import Image

        with Image.open(io.BytesIO(out)) as im:
            size = im.size
        return {"plan": view, "png": out, "size": size, "input": info, "seconds": spent}

    # -- routes
    @api.get("/", response_class=HTMLResponse)
    async def page(self) -> HTMLResponse:
        return HTMLResponse(self.page)

    @api.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok"}

    @api.get("/readyz")
    async def readyz(self) -> JSONResponse:
        try:
            thinker, editor = await asyncio.wait_for(
                asyncio.gather(self.thinker.ready.remote(), self.editor.ready.remote()), timeout=10)
        except Exception as e:  # a deployment without a loaded replica
            return JSONResponse({"ready": False, "reason": f"{type(e).__name__}: {e}"[:500]}, status_code=503)
        return JSONResponse({"ready": True, "thinker": thinker, "editor": editor})

    @api.get("/v1/models")
    async def models(self, request: Request) -> dict:
        self._auth(request)
        return models_response(self.cfg.model_name)

    @api.post("/v1/plan")
    async def plan(self, request: Request) -> dict:
        self._auth(request)
        t0 = time.monotonic()
        form = await self._form(request)
        seed = int_field(form.get("seed"), "seed", 0, 2**31 - 1, 0)
        photo, info = await self._photo(form)
        png = await asyncio.to_thread(png_bytes, photo)
        t = time.monotonic()
        text = await self._await(self.thinker.plan.remote(png, seed), t0 + self._timeout(request), "thinker")
        return {"plan": plan_view(text), "input": info,
                "timings_ms": timings({"think": time.monotonic() - t, "total": time.monotonic() - t0})}

    @api.post("/v1/reconstruct")
    async def reconstruct(self, request: Request) -> dict:
        self._auth(request)
        form = await self._form(request)
        max_side = self.http.max_side
        plan = form.get("plan")
        if plan is not None and not isinstance(plan, str):
            raise ApiError(400, "'plan' must be a text field", param="plan")
        r = await self._reconstruct(form, plan=plan, width=int_field(form.get("width"), "width", 16, max_side),
                                    height=int_field(form.get("height"), "height", 16, max_side),
                                    timeout=self._timeout(request))
        return {"plan": r["plan"], "image": {"b64_png": png_b64(r["png"]), "width": r["size"][0],
                                             "height": r["size"][1]},
                "input": r["input"], "timings_ms": timings(r["seconds"])}

    @api.post("/v1/images/edits")
    async def images_edits(self, request: Request) -> dict:
        """OpenAI's image edits: the prompt, when given, is the plan."""
        self._auth(request)
        form = await self._form(request)
        if form.get("mask") is not None:
            raise ApiError(400, "'mask' is not supported: the plan decides what changes", param="mask")
        n = int_field(form.get("n"), "n", 1, 1, 1)
        fmt = (form.get("response_format") or "b64_json")
        if fmt != "b64_json":
            raise ApiError(400, f"'response_format' {fmt!r} is not supported; use b64_json (no URLs are hosted)",
                           param="response_format")
        out_fmt = (form.get("output_format") or "png")
        if out_fmt != "png":
            raise ApiError(400, f"'output_format' {out_fmt!r} is not supported; use png", param="output_format")
        width, height = parse_size(form.get("size"), self.http.max_side)
        prompt = form.get("prompt")
        r = await self._reconstruct(form, plan=prompt if isinstance(prompt, str) else None, width=width,
                                    height=height, timeout=self._timeout(request))
        assert n == 1
        return image_edit_response(r["png"], r["plan"]["text"], r["seconds"], r["size"])

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> dict:
        self._auth(request)
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != "application/json":
            raise ApiError(415, f"send application/json (got '{ctype or 'none'}')", "unsupported_media_type")
        length = request.headers.get("content-length")
        limit = 4 * self.http.max_image_bytes
        if length and length.isdigit() and int(length) > limit:
            raise ApiError(413, f"the request is {length} bytes, over the limit of {limit}", "request_too_large")
        try:
            body = await request.json()
        except ValueError as e:
            raise ApiError(400, f"the request body is not JSON ({e})") from None
        call = await asyncio.to_thread(parse_chat, body, max_bytes=self.http.max_image_bytes,
                                       max_pixels=self.http.max_image_pixels,
                                       max_tokens_limit=self.cfg.think.max_tokens_limit)
        return await self._await(self.thinker.chat.remote(call), time.monotonic() + self._timeout(request),
                                 "thinker")


# -- the application ---------------------------------------------------------------------


def build(cfg: ServeConfig) -> Any:
    """Ingress ▶ Thinker ▶ Editor, each with its settings from ``cfg``."""
    thinker = Thinker.options(name="Thinker", **deployment_options(cfg.think.deployment)).bind(cfg)
    editor = Editor.options(name="Editor", **deployment_options(cfg.edit.deployment)).bind(cfg)
    return Ingress.options(name="Ingress", **deployment_options(cfg.ingress)).bind(thinker, editor, cfg)


def build_app(args: dict) -> Any:
    """The application for a Serve config file: ``args`` are the job's
    overrides, e.g. ``{profile: a40, lora: /models/aeseditor-lora}``."""
    from aesformer.config import flatten, load_config

    argv = [f"{k}={v}" for k, v in flatten(dict(args or {})).items()]
    return build(load_config(ServeConfig, "serve", argv))
