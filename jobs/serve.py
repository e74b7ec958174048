"""Serve AesFormer over HTTP: Ray Serve runs the thinker ▶ editor application
(``aesformer.actors.serve_app``) with its routes, OpenAI-compatible API and
web page. It starts (or joins) Ray, deploys, prints the URL and serves until
Ctrl-C, then shuts the application down.

    python jobs/serve.py                                   # tiny models on this machine
    python jobs/serve.py profile=a40 thinker=/models/aesthinker editor=Qwen/Qwen-Image-Edit-2511 \\
        lora=s3://bucket/aeseditor-lora http.api_key_env=AESFORMER_TOKEN
"""
from __future__ import annotations

if __package__ in (None, ""):
    import _prelude  # noqa: F401  (makes aesformer importable when run as a script)

import logging
import time
from dataclasses import dataclass

from aesformer.cluster import init_ray
from aesformer.job import run_job
from aesformer.serving import ServeConfig

log = logging.getLogger("serve")


@dataclass
class ServeJobConfig(ServeConfig):
    """The job's schema: the application's settings, which live in the
    library because the Serve config file's builder
    (``aesformer.actors.serve_app:build_app``) reads them too."""


def start(cfg: ServeConfig) -> str:
    """Deploy the application and wait until it is ready; returns its URL."""
    from ray import serve

    from aesformer.actors.serve_app import build

    init_ray(cfg.ray)
    serve.start(http_options={"host": cfg.http.host, "port": cfg.http.port})
    serve.run(build(cfg), name=cfg.app_name, route_prefix="/")
    host = "127.0.0.1" if cfg.http.host in ("0.0.0.0", "::") else cfg.http.host
    return f"http://{host}:{cfg.http.port}"


def stop(cfg: ServeConfig) -> None:
    from ray import serve

    serve.delete(cfg.app_name)
    serve.shutdown()


def run(cfg: ServeConfig) -> None:
    """Serve until Ctrl-C, then take the application down."""
    url = start(cfg)
    print(f"AesFormer is serving at {url}/ (API under {url}/v1, OpenAI base_url {url}/v1); Ctrl-C stops it",
          flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        log.info("stopping")
    finally:
        stop(cfg)


def main(argv=None) -> None:
    run_job(ServeJobConfig, "serve", run, argv)


if __name__ == "__main__":
    main()
