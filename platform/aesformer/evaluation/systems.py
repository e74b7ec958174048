"""Systems under test and their output cache.

A system is a thinker and an editor. ``thinker`` is a model (a path, hub id
or ``tiny:`` name), one of the job's named models (``trained``: the AesFormer
thinker under test, ``base``: the untrained thinker, ``sft``: the SFT-only
thinker), ``endpoint`` (an OpenAI-compatible server, ``endpoint`` settings in
the job config) or ``none`` (the editor gets ``instruction`` instead of a
plan). ``editor`` is ``base`` or ``identity`` (the output is the poor photo);
``lora`` is ``trained``, ``none`` or a path. ``shuffle_dimensions`` hands the
editor the plan's seven lines in a shuffled order (the paper's ablation).

Outputs are cached by (system, photo, seed) under
``<output>/outputs/<system>/seed<seed>/``: ``images/<photo>.png``,
``plans/<photo>.txt`` and ``results/<photo>.json`` (written last). The
system's resolved spec is kept beside them; a changed spec under the same
name is an error, so a cached output never silently stands for another system.
"""
from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Mapping, Optional

from aesformer.config import ConfigError

GENERIC_INSTRUCTION = ("Reconstruct this photo so that it looks better: improve the composition and framing, "
                       "the camera viewpoint, the subject's placement and pose, focus, colour and light, "
                       "keeping the same subject and scene.")


@dataclass
class SystemSpec:
    name: str = ""
    label: str = ""                 # how the report names it (default: name)
    thinker: str = "trained"        # trained | base | sft | endpoint | none | <model>
    editor: str = "base"            # base | identity
    lora: str = "trained"           # trained | none | <path>
    shuffle_dimensions: bool = False
    instruction: Optional[str] = None   # the editor's instruction when thinker is none
    table: int = 1                  # the paper table this row belongs to (1: systems, 2: stage ablation)
    paper: Optional[str] = None     # the paper's row shown beside it (aesformer.evaluation.paper)

    def describe(self) -> str:
        if self.editor == "identity":
            return "identity (output = poor photo)"
        think = "no thinker" if self.thinker == "none" else f"thinker {self.thinker}"
        lora = "no LoRA" if self.lora == "none" else f"LoRA {self.lora}"
        return f"{think} ▶ editor ({lora})" + (", shuffled dimension order" if self.shuffle_dimensions else "")


# The built-in systems: AesFormer, the paper's plug-in setups, and the identity baseline.
# ``paper`` names the row of the paper's Table 1 that the system stands for with the
# paper's models (profile a40: the editor is Qwen-Image-Edit-2511, the base thinker
# Qwen3-VL-8B).
BUILTIN_SYSTEMS: dict[str, dict] = {
    "aesformer": dict(label="AesFormer", thinker="trained", lora="trained", paper="AesFormer"),
    "editor_only": dict(label="Editor, no thinker", thinker="none", lora="none", paper="Qwen-Image-Edit-2511"),
    "base_thinker_editor": dict(label="Base thinker + editor", thinker="base", lora="none",
                                paper="Qwen-Image-Edit-2511 + Qwen3 thinker"),
    "identity": dict(label="Identity (poor photo)", editor="identity", thinker="none", lora="none"),
}


def parse_systems(catalog: Mapping[str, Any], selected: Optional[list] = None) -> list[SystemSpec]:
    """SystemSpecs from ``{name: {field: value}}``, in catalog order, only
    the ``selected`` names when given. Unknown fields or names are errors."""
    known = {f.name for f in fields(SystemSpec)}
    specs = []
    for name, raw in catalog.items():
        raw = dict(raw or {})
        bad = sorted(set(raw) - known)
        if bad:
            raise ConfigError(f"system '{name}': unknown key(s) {bad}; keys are {sorted(known - {'name'})}")
        spec = SystemSpec(**{**raw, "name": str(name)})
        spec.label = spec.label or spec.name
        if spec.editor not in ("base", "identity"):
            raise ConfigError(f"system '{name}': editor must be base or identity, got '{spec.editor}'")
        specs.append(spec)
    if selected:
        names = [s.name for s in specs]
        missing = [n for n in selected if n not in names]
        if missing:
            raise ConfigError(f"systems {missing} are not defined; defined: {names}")
        specs = [s for s in specs if s.name in selected]
    if not specs:
        raise ConfigError("no system to evaluate")
    return specs


def safe_name(photo_id: str) -> str:
    """A photo id as a file name (letters, digits, ``-_.``)."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in str(photo_id)) or "photo"


def output_dir(root: Path, system: str, seed: int) -> Path:
    return Path(root) / "outputs" / system / f"seed{seed}"


def check_spec(root: Path, spec: SystemSpec, resolved: Mapping[str, Any]) -> None:
    """Record the system's resolved spec beside its outputs; refuse a
    different spec under a name that already has outputs."""
    folder = Path(root) / "outputs" / spec.name
    path = folder / "system.json"
    mine = {**asdict(spec), **resolved}
    mine.pop("label", None), mine.pop("table", None), mine.pop("paper", None)
    if path.exists():
        theirs = json.loads(path.read_text())
        if theirs != mine:
            diff = {k: (theirs.get(k), mine.get(k)) for k in set(theirs) | set(mine) if theirs.get(k) != mine.get(k)}
            raise ConfigError(f"system '{spec.name}' has cached outputs made with another spec {diff}; "
                              f"give it a new name or remove {folder}")
        return
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(mine, indent=1, sort_keys=True))


def finished_outputs(folder: Path) -> dict[str, dict]:
    """{photo: result record} of the outputs already made in one system/seed folder."""
    done = {}
    for p in (Path(folder) / "results").glob("*.json"):
        try:
            rec = json.loads(p.read_text())
            done[rec["name"]] = rec
        except (OSError, ValueError, KeyError):
            continue  # a torn record: the output is made again
    return done


def shuffle_plan(text: str, seed: int) -> str:
    """The plan's seven dimension lines in a shuffled order (reproducible per
    seed and text); text that does not parse is returned as it is."""
    from aesformer.actions import ActionPlan, PlanFormatError

    try:
        lines = ActionPlan.parse(text).lines()
    except PlanFormatError:
        return text
    rng = random.Random(f"{seed}|{text}")
    order = list(range(len(lines)))
    while order == sorted(order):
        rng.shuffle(order)
    return "\n".join(lines[i] for i in order)
