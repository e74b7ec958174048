"""The paper's figures, as data, shown beside ours in the report.

Source: the AesFormer paper (Aesthetic Photo Reconstruction: AesThinker
plans, AesEditor executes), Table 1 (systems: GPT-4o pairwise win rates
against the poor and the good photo, ArtiMuse 0-100, LAION aesthetic v2
1-10, Q-Align 1-5) and Table 2 (training-stage ablation). Only the
figures transcribed here are shown; a cell left ``None`` was not transcribed
and the report prints it as "n/a", never a guess.
"""
from __future__ import annotations

CITATION = ("AesFormer: Aesthetic Photo Reconstruction (AesThinker + AesEditor), Tables 1 and 2; "
            "judge GPT-4o, win rates in percent")

# column keys shared with our tables
COLUMNS = ("win_vs_poor", "win_vs_good", "artimuse", "laion", "qalign")
COLUMN_TITLES = {"win_vs_poor": "win vs poor (%)", "win_vs_good": "win vs good (%)", "artimuse": "ArtiMuse",
                 "laion": "LAION aesthetic", "qalign": "Q-Align"}

TABLE_1: dict[str, dict[str, float | None]] = {
    "AesFormer": {"win_vs_poor": 65.33, "win_vs_good": 26.25, "artimuse": None, "laion": 5.60, "qalign": 3.51},
}

TABLE_2: dict[str, dict[str, float | None]] = {
    "SFT only": dict.fromkeys(COLUMNS),
    "SFT + editor LoRA": dict.fromkeys(COLUMNS),
    "SFT + GRPO-A + editor LoRA": dict.fromkeys(COLUMNS),
    "Shuffled dimension order": dict.fromkeys(COLUMNS),
}


def paper_row(table: int, key: str | None) -> dict[str, float | None] | None:
    if not key:
        return None
    return (TABLE_1 if table == 1 else TABLE_2).get(key)
