"""VCMP, video-based corpus mining: tutorial videos → AesRecon pairs.

One small, separately testable module per stage; the Ray plumbing lives in
``aesformer.actors.vcmp_actors`` and ``jobs/vcmp.py``.

- :mod:`.settings`  — the stage configs (dataclasses the job composes)
- :mod:`.ingest`    — list inputs, read a manifest, hash, dedupe, probe (quarantine)
- :mod:`.decode`    — lazy frame decoding with seeking and rotation metadata
- :mod:`.screen`    — manifest rules and the tutorial question for the VLM
- :mod:`.segment`   — shot boundaries from frame differences, shot merging
- :mod:`.sample`    — sampling a segment at N fps by timestamp
- :mod:`.prefilter` — cheap CPU checks: overlays/text bands, sharpness, stability
- :mod:`.judge`     — prompts and the 0–5 first-token reading shared by VLM stages
- :mod:`.pairs`     — coarse pairs (first frame × good frames), ids, the split
- :mod:`.quality`   — image-quality and aesthetic scorers behind one interface
- :mod:`.overlays`  — overlay removal attempts and their verification
- :mod:`.align`     — geometric overlap check (ORB + RANSAC)
- :mod:`.rows`      — the segment row schema passed between stages
- :mod:`.state`     — resumable per-video progress log
- :mod:`.recorder`  — the driver writing pairs and frames as rows arrive, durable per video
- :mod:`.report`    — funnel report, table, truth evaluation
"""
