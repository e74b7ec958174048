"""Stage 2, video screening: manifest rules, then a VLM look at a few frames.

The rules are cheap and run first: a title or source naming an advert or a
showcase, or a source outside the allowed list, drops the video without
asking the model. The VLM then sees ``frames`` frames spread over the video.
"""
from __future__ import annotations

import re
from typing import Iterable, Optional, Sequence


def manifest_rules(title: str, source: str, blocked_words: Iterable[str],
                   allowed_sources: Sequence[str] = ()) -> Optional[str]:
    """The reason a video is not a tutorial by its manifest, or None."""
    text = f"{title or ''} {source or ''}".lower()
    for w in blocked_words:
        if re.search(rf"\b{re.escape(w.lower())}\b", text):
            return f"manifest: '{w}' in title/source"
    if allowed_sources and (source or "") not in allowed_sources:
        return f"manifest: source '{source}' not allowed"
    return None


def screening_times(duration: float, frames: int) -> list[float]:
    """``frames`` times spread evenly inside (0, duration)."""
    return [round(duration * (k + 0.5) / frames, 3) for k in range(max(1, frames))]
