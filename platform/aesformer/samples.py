"""Real photographs available offline (scikit-image ships them in its wheel)."""
from __future__ import annotations

from PIL import Image

# name → skimage.data loader; colour photographs with a clear subject
SAMPLE_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "motorcycle_left", "immunohistochemistry")


def sample_photo(name: str) -> Image.Image:
    import numpy as np
    from skimage import data

    if name not in SAMPLE_PHOTOS:
        raise KeyError(f"unknown sample photo '{name}'; available: {', '.join(SAMPLE_PHOTOS)}")
    # the left view of the stereo pair is an ordinary photograph
    arr = data.stereo_motorcycle()[0] if name == "motorcycle_left" else getattr(data, name)()
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, axis=-1)
    return Image.fromarray(arr[..., :3].astype("uint8"), "RGB")


def sample_photos(n: int | None = None) -> list[tuple[str, Image.Image]]:
    """The first ``n`` (default all) sample photos as (name, RGB image)."""
    names = SAMPLE_PHOTOS if n is None else SAMPLE_PHOTOS[:n]
    return [(name, sample_photo(name)) for name in names]
