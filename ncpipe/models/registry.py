"""The model registry: ``models/<name>/`` folders holding a checkpoint and its card.

::

    models/<name>/model.pt     released checkpoint (ncpipe.models.checkpoint)
    models/<name>/card.json    machine-readable card: identity, provenance, measured results
    models/<name>/README.md    the human-readable card

Diffusion decoders live beside the codecs with a card whose ``kind`` is ``refiner`` (file
``refiner.pt``) or ``corrdiff`` (``corrdiff.pt``); a card without ``kind`` is a codec's.

A model is referred to by registry name or by checkpoint path. Registry roots are the
repository's ``models/`` folder plus any folders in ``$NCPIPE_MODEL_DIRS`` (``:``-separated).
Loading by name verifies the checkpoint against the SHA-256 its card records.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ncpipe.models.checkpoint import CheckpointError, CodecModel, load_codec_model

CHECKPOINT_NAME = "model.pt"
CARD_NAME = "card.json"
CODEC_KIND = "codec"
DECODER_FILES = {"refiner": "refiner.pt", "corrdiff": "corrdiff.pt"}  # diffusion decoder kind -> checkpoint file
_REPO_MODELS = Path(__file__).resolve().parents[2] / "models"


@dataclass(frozen=True)
class ModelRef:
    """Where a model is and what it must hash to (None for a bare path)."""

    name: str
    checkpoint: Path
    expected_sha256: str | None
    card: dict[str, Any] | None


def registry_roots() -> list[Path]:
    extra = [Path(p) for p in os.environ.get("NCPIPE_MODEL_DIRS", "").split(os.pathsep) if p]
    return [root for root in [*extra, _REPO_MODELS] if root.is_dir()]


def list_models(kind: str = CODEC_KIND) -> list[ModelRef]:
    """Registry entries of one kind: codecs, or a diffusion decoder kind (``refiner``, ``corrdiff``)."""
    refs = {}
    for root in registry_roots():
        for card in sorted(root.glob(f"*/{CARD_NAME}")):
            ref = _ref_from_dir(card.parent)
            if _kind(ref.card) == kind:
                refs.setdefault(card.parent.name, ref)
    return [refs[name] for name in sorted(refs)]


def _kind(card: dict[str, Any]) -> str:
    return card.get("kind", CODEC_KIND)


def _ref_from_dir(directory: Path) -> ModelRef:
    card = json.loads((directory / CARD_NAME).read_text())
    return ModelRef(directory.name, directory / DECODER_FILES.get(_kind(card), CHECKPOINT_NAME), card["sha256"], card)


def resolve_model(name_or_path: str | Path, kind: str = CODEC_KIND) -> ModelRef:
    """A registry entry of ``kind`` by checkpoint path, registry folder or registry name."""
    path = Path(name_or_path)
    if path.is_file():
        return ModelRef(str(path), path, None, None)
    for folder in [path, *(root / str(name_or_path) for root in registry_roots())]:
        if (folder / CARD_NAME).is_file():
            ref = _ref_from_dir(folder)
            if _kind(ref.card) != kind:
                raise CheckpointError(f"{str(name_or_path)!r} is a {_kind(ref.card)}, not a {kind}")
            return ref
    known = ", ".join(ref.name for ref in list_models(kind)) or "none"
    label = "model" if kind == CODEC_KIND else kind  # codecs are what users call "models" (--model)
    raise CheckpointError(f"no {label} named or at {str(name_or_path)!r}; registry {label}s: {known}")


def find_by_sha256(sha256: str) -> ModelRef | None:
    return next((ref for ref in list_models() if ref.expected_sha256 == sha256), None)


def load_model(name_or_path: str) -> CodecModel:
    ref = resolve_model(name_or_path)
    return load_codec_model(ref.checkpoint, ref.expected_sha256)


def describe_sha256(sha256: str) -> str:
    """Name a model for an error message: its registry name when it is known here."""
    ref = find_by_sha256(sha256)
    return f"registry model {ref.name!r} (sha256 {sha256})" if ref else f"sha256 {sha256} (not in this registry)"
