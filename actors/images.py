"""Prompt images in the object store: each one is put once per step (already
decoded and capped to the pools' ``max_pixels``, as a uint8 array that
workers on a node read from shared memory without a copy) and every pool
receives the reference; a worker turns references back into PIL images just
before its engine needs them."""
from __future__ import annotations

from typing import Any, Iterable, Sequence


def put_image(image: Any):
    """The object-store reference of ``image`` (PIL) as an RGB uint8 array."""
    import numpy as np
    import ray

    return ray.put(np.asarray(image.convert("RGB"), dtype=np.uint8))


def _is_ref(x: Any) -> bool:
    import ray

    return isinstance(x, ray.ObjectRef)


def fetch_images(refs: Iterable[Any]) -> dict:
    """{ref: PIL image} for the distinct references in ``refs`` (one ``ray.get``)."""
    import ray
    from PIL import Image

    unique = list({r: None for r in refs if _is_ref(r)})
    arrays = ray.get(unique, timeout=600) if unique else []
    return {r: Image.fromarray(a) for r, a in zip(unique, arrays)}


def resolve_requests(requests: Sequence[dict]) -> list[dict]:
    """The requests with object-store references in ``images`` replaced by
    PIL images (each distinct image fetched once)."""
    pictures = fetch_images(im for r in requests for im in (r.get("images") or ()))
    if not pictures:
        return list(requests)
    return [{**r, "images": [pictures.get(im, im) if _is_ref(im) else im for im in r["images"]]}
            if r.get("images") else r for r in requests]


def resolve_items(items: Sequence[dict], key: str = "image") -> list[dict]:
    """Items whose ``key`` holds a reference, with the PIL image instead."""
    pictures = fetch_images(it.get(key) for it in items)
    if not pictures:
        return list(items)
    return [{**it, key: pictures[it[key]]} if _is_ref(it.get(key)) else it for it in items]
