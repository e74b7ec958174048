"""Action distillation: (poor, good, transcript) → a validated seven-dimension plan.

- :mod:`.measured`   — the measured teacher: geometry (SIFT/ORB + RANSAC
  similarity) and tone changes between the two photos, and the plan written
  from them; also the check the validator holds any plan against
- :mod:`.teachers`   — the teacher interface, prompts, the measured and chat teachers
- :mod:`.chat`       — chat backends: an OpenAI-compatible HTTP client (retries,
  rate limit, spending cap) and a local engine; the Budget
- :mod:`.validator`  — format, coverage, geometry and judge checks, with feedback
- :mod:`.loop`       — the teacher → validator → feedback rounds
- :mod:`.cache`      — the SQLite cache that makes reruns free and runs resumable
- :mod:`.outputs`    — the dataset, rejects, attempts, SFT export and summary, from the cache
- :mod:`.transcript` — subtitles (file or track), Whisper, finding the source video
- :mod:`.settings`   — the job's config sections

The Ray plumbing lives in ``aesformer.actors.distill_actors`` and the job in
``jobs/distill.py``. A local thinker becomes an OpenAI-compatible teacher
through the Serve application (``jobs/serve.py``: ``/v1/chat/completions``).
"""
