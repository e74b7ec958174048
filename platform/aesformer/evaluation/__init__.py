"""Evaluation: judged win rates with intervals, aesthetic scores, human
ratings, and the report that puts them beside the paper's tables.

- :mod:`.systems` — what a system under test is (a thinker and an editor)
  and where its outputs are cached, keyed by (system, photo, seed);
- :mod:`.judge` — the pairwise judge prompt, verdict parsing, A/B order;
- :mod:`.stats` — win rates with ties, bootstrap 95% intervals, position
  bias, Cohen's kappa;
- :mod:`.store` — verdicts, scores and human votes in one SQLite file;
- :mod:`.paper` — the paper's figures as data, with the citation;
- :mod:`.report` — tables (markdown and self-contained HTML), plots, the grid.

Plain functions on strings, numbers and images: no Ray, no model is loaded here.
"""
