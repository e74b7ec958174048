"""The paper's figures, as data, shown beside ours in the report.

Table 1 compares systems on AesRecon's test split: pairwise win rates (in
percent) of each system's output against the poor and against the good
photo, judged by GPT-4o and by human raters, and three aesthetic scorers
(ArtiMuse 0-100, LAION aesthetic v2 1-10, Q-Align 1-5). Table 2 is the
training-stage ablation: the base editor alone, the SFT thinker (S1a), the
same with the dimension order shuffled, with the action-conditioned editor
(S2), and with GRPO-A (S1b), which is AesFormer. Its rows carry no human
win rates.

Figures are numbers only. A cell that could not be read is ``None`` and the
report prints "n/a", never a guess; see :data:`SOURCE` for where the figures
were read.
"""
from __future__ import annotations

from typing import Optional

CITATION = ("Tianxiang Du, Hulingxiao He, Yuxin Peng. AesFormer: Transform Everyday Photos into Beautiful "
            "Memories. ICML 2026. arXiv:2605.22126. Tables 1 and 2 (AesRecon test split; GPT-4o and human "
            "win rates in percent)")

BIBTEX = """@inproceedings{du2026aesformer,
  title     = {AesFormer: Transform Everyday Photos into Beautiful Memories},
  author    = {Du, Tianxiang and He, Hulingxiao and Peng, Yuxin},
  booktitle = {International Conference on Machine Learning (ICML)},
  year      = {2026},
  note      = {arXiv:2605.22126}
}"""

SOURCE = ("Figures read from a reproduction of the paper's Tables 1 and 2 in a paper-notes summary "
          "(en.papernotes.org, ICML 2026, arXiv:2605.22126), not yet checked cell by cell against the paper's "
          "own tables. Table 1's rows that put a general-purpose planner (Qwen3 or GPT-4o) in front of each open "
          "editor are not reproduced there: their figures show n/a. Nano Banana Pro was judged on a 10% subset "
          "of the test split.")

# column keys shared with our tables, in the paper's order
COLUMNS = ("win_vs_poor", "human_vs_poor", "win_vs_good", "human_vs_good", "artimuse", "laion", "qalign")
COLUMN_TITLES = {"win_vs_poor": "GPT-4o win vs poor (%)", "human_vs_poor": "human win vs poor (%)",
                 "win_vs_good": "GPT-4o win vs good (%)", "human_vs_good": "human win vs good (%)",
                 "artimuse": "ArtiMuse", "laion": "LAION aesthetic", "qalign": "Q-Align"}
TABLE_COLUMNS = {1: COLUMNS, 2: ("win_vs_poor", "win_vs_good", "artimuse", "laion", "qalign")}

def _row(thinker: str, *figures: Optional[float], columns: tuple = COLUMNS) -> dict:
    """A row: its thinker (Table 1's thinker column) and one figure per column, None where unread."""
    if len(figures) != len(columns):
        raise ValueError(f"{len(figures)} figures for {len(columns)} columns {columns}")
    return {"thinker": thinker, **dict.fromkeys(COLUMNS), **dict(zip(columns, figures))}


def _unread(thinker: str) -> dict:
    return _row(thinker, *([None] * len(COLUMNS)))


# Table 1: name -> thinker and figures. Each open editor's rows with a general-purpose
# planner (not reproduced, see SOURCE) are placed after the editor's own row.
_OPEN = {
    # editor: thinker, GPT-4o>poor, human>poor, GPT-4o>good, human>good, ArtiMuse, LAION, Q-Align
    "FLUX.1 Kontext": _row("None", 12.96, 5.88, 2.66, 3.66, 38.34, 5.07, 2.83),
    "Bagel": _row("None", 12.40, 17.65, 7.75, 12.20, 37.69, 4.94, 2.58),
    "Step1X-Edit-v1.1": _row("None", 15.28, 11.76, 13.84, 13.41, 37.14, 5.33, 3.37),
    "Qwen-Image-Edit-2511": _row("None", 16.50, 9.80, 7.64, 12.20, 46.65, 5.44, 3.20),
}
TABLE_1: dict[str, dict] = {
    "Nano Banana Pro": _row("None", 54.44, 72.55, 16.67, 21.95, 50.90, 5.59, 3.24),
    **{name: row for editor, figures in _OPEN.items()
       for name, row in [(editor, figures)] + [(f"{editor} + {p} thinker", _unread(p)) for p in ("Qwen3", "GPT-4o")]},
    "AesFormer": _row("AesThinker", 65.33, 68.63, 26.25, 24.39, 47.76, 5.60, 3.51),
}

# Table 2: the training-stage ablation (S1a: SFT thinker, S1b: GRPO-A, S2: action-conditioned editor);
# it has no thinker column
_T2 = TABLE_COLUMNS[2]
TABLE_2: dict[str, dict] = {
    # row: GPT-4o>poor, GPT-4o>good, ArtiMuse, LAION, Q-Align
    "Baseline (Qwen-Image-Edit-2511)": _row("", 16.50, 7.64, 46.65, 5.44, 3.20, columns=_T2),
    "S1a shuffle": _row("", 58.69, 18.60, 46.16, 5.49, 3.36, columns=_T2),
    "S1a": _row("", 61.04, 24.58, 47.70, 5.58, 3.48, columns=_T2),
    "S1a + S2": _row("", 61.13, 24.14, 47.74, 5.58, 3.46, columns=_T2),
    "S1a + S1b + S2": _row("", 65.33, 26.25, 47.76, 5.60, 3.51, columns=_T2),
}

TABLES = {1: TABLE_1, 2: TABLE_2}


def paper_row(table: int, key: Optional[str]) -> Optional[dict]:
    """The paper's row ``key`` of Table ``table`` (1 or 2), or None."""
    if not key:
        return None
    return TABLES.get(table, {}).get(key)
