"""Stage settings of VCMP; ``jobs/vcmp.py`` composes them into its config
(defaults in conf/vcmp.yaml, profile blocks under ``jobs.vcmp``)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from aesformer.vcmp.ingest import DEFAULT_EXTENSIONS


@dataclass
class PoolConfig:
    """One actor pool of a model-heavy stage."""

    size: int = 1
    # grow to this many actors while its input queues (null: always `size`); a
    # second actor near the end of a run keeps a core from idling while one actor
    # works off the last videos
    max_size: Optional[int] = None
    num_gpus: float = 0.0
    num_cpus: float = 1.0
    # rows (videos or segments) per call
    batch_size: int = 4


@dataclass
class PoolsConfig:
    screen: PoolConfig = field(default_factory=PoolConfig)
    good_frame: PoolConfig = field(default_factory=PoolConfig)
    quality: PoolConfig = field(default_factory=PoolConfig)
    overlay: PoolConfig = field(default_factory=PoolConfig)
    align: PoolConfig = field(default_factory=PoolConfig)
    # stages good_frame to align in one pool (fuse_pair_stages: true)
    pairs: PoolConfig = field(default_factory=PoolConfig)


@dataclass
class IngestConfig:
    extensions: List[str] = field(default_factory=lambda: list(DEFAULT_EXTENSIONS))
    min_duration_s: float = 2.0
    max_duration_s: float = 4 * 3600.0
    # also decode a frame near the end (catches truncated files with their index up front)
    check_tail: bool = True
    # threads hashing and probing files (I/O-bound)
    workers: int = 8


@dataclass
class ScreenConfig:
    # frames shown to the VLM, spread over the video
    frames: int = 4
    # keep a video when E[score]/5 of "is this a photography tutorial" is at least this
    vlm_threshold: float = 0.5
    # manifest rules: a title or source containing any of these words is not a tutorial
    blocked_words: List[str] = field(default_factory=lambda: ["sponsored", "advert", "promo", "showcase",
                                                                "portfolio", "unboxing", "giveaway"])
    # sources allowed (empty: any)
    allowed_sources: List[str] = field(default_factory=list)


@dataclass
class SegmentConfig:
    # frames are compared as small grey thumbnails of this width and colour histograms
    analysis_width: int = 64
    # a cut: colour-histogram distance to the previous frame above this …
    cut_threshold: float = 0.35
    # … and this many times the median distance around it
    cut_ratio: float = 4.0
    # adjacent shots whose mean histograms are at least this similar (intersection) merge
    merge_similarity: float = 0.45
    # shots shorter than this merge into their more similar neighbour
    min_shot_s: float = 0.6
    # adjacent shots whose last frames (decoded at this width) match as one scene (ORB + RANSAC)
    # merge too: a cut or fade from the poor view to the result; 0: by colour only
    match_width: int = 192


@dataclass
class SampleConfig:
    fps: float = 2.0
    # format of the frames kept as images ("png" lossless or "jpeg")
    image_format: str = "png"
    # frames are downscaled to this longest side (0: keep)
    max_side: int = 1440
    # strip uniform black borders (letterboxing) before judging and storing
    trim_letterbox: bool = True


@dataclass
class PrefilterConfig:
    # overlay score (0..1: grid lines, text/UI bands) above this: not a clean frame
    overlay_max: float = 0.75
    # variance of the Laplacian (at 256 px wide) below this: blurred
    min_sharpness: float = 30.0
    # and at least this fraction of the sharpest frame of the segment
    rel_sharpness: float = 0.6
    # mean absolute change to the previous decoded frame (0..1) above this: moving/transition
    # (a hand-held camera screen moves; a shown result is held still)
    max_motion: float = 0.005
    # coarse detail (prefilter.detail: tile-wise Laplacian energy at 64 px, which captions and grid
    # lines cannot fake) below this: a blurred still (with edges from a caption: narration B-roll)
    min_detail: float = 60.0
    # and at least this fraction of the segment's most detailed frame and of the poor view's
    rel_detail: float = 0.025


@dataclass
class GoodFrameConfig:
    # keep a plausible frame when the VLM's P(clean photo-like result) is at least this
    vlm_threshold: float = 0.5
    # pairs per segment (best scores first, at least min_gap_s apart)
    max_per_segment: int = 2
    min_gap_s: float = 1.0
    # a good frame must come at least this long after the poor (first) frame
    min_after_poor_s: float = 1.0


@dataclass
class ImprovementConfig:
    """A pair must show an improvement: a good frame that shows the poor
    frame's own view (same shot held, jitter, noise, compression, a new
    caption) gives no pair."""

    # features of both frames matching under a transform this close to identity: the same view
    min_inliers: int = 8
    max_scale_change: float = 0.05
    max_rotation_deg: float = 2.0
    # move of the frame centre, as a fraction of the diagonal
    max_shift: float = 0.04
    # too few features (a blurred still): blurred thumbnails differing by less than this (median, 0..1)
    min_change: float = 0.03


@dataclass
class QualityConfig:
    # scorer names: "classical:iqa", "classical:aesthetic" or a path to a TorchScript regressor
    iqa: str = "classical:iqa"
    aesthetic: str = "classical:aesthetic"
    iqa_min: float = 0.35
    aesthetic_min: float = 0.25
    # VLM "is this sharp, without blur or ghosting" (E[score]/5) at least this
    vlm_threshold: float = 0.5


@dataclass
class OverlayConfig:
    prompt: str = ("Remove the subtitles, the camera app interface and the grid lines. "
                   "Keep the photo itself exactly as it is.")
    attempts: int = 3
    steps: int = 40
    true_cfg_scale: float = 4.0
    negative_prompt: Optional[str] = " "
    # editor sizes (see aesformer.editor); null: the model's defaults
    control_area: Optional[int] = None
    condition_area: Optional[int] = None
    # verification: judge P(no overlays left) at least this …
    judge_threshold: float = 0.5
    # … the cheap detector's overlay score at most this …
    detector_max: float = 0.5
    # … and the edit still shows the same photo (structural similarity outside the overlays)
    fidelity_min: float = 0.5
    # when every attempt fails: keep the original poor frame (recorded) instead of dropping the pair
    keep_original_on_failure: bool = False


@dataclass
class AlignConfig:
    # judge P(same person, scene and event, nothing new) at least this
    judge_threshold: float = 0.5
    # ORB + RANSAC: matches consistent with one similarity transform
    min_inliers: int = 8
    min_inlier_ratio: float = 0.2
    # fraction of the good image that the poor view also covers (a too-tight poor shot of a
    # portrait, taken sideways, covers about a quarter of it)
    min_overlap: float = 0.2
    # a camera-like transform: scale change and tilt within these
    min_scale: float = 0.3
    max_scale: float = 3.0
    max_rotation_deg: float = 30.0
    orb_features: int = 1500
    # images are matched at this longest side
    match_side: int = 320


@dataclass
class SplitConfig:
    # fraction of videos held out as test (by a hash of the video id, so a pair's
    # split never changes when more videos arrive)
    test_fraction: float = 0.1
    salt: str = "aesrecon"
