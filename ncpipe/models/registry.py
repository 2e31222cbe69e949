"""The model registry: ``models/<name>/`` folders holding a checkpoint and its card.

::

    models/<name>/model.pt     released checkpoint (ncpipe.models.checkpoint)
    models/<name>/card.json    machine-readable card: identity, provenance, measured results
    models/<name>/README.md    the human-readable card

Diffusion decoders live beside the codecs with a card whose ``kind`` is ``refiner`` (file
``refiner.pt``) or ``corrdiff`` (``corrdiff.pt``); a card without ``kind`` is a codec's.

A model is referred to by registry name or by checkpoint path. A name is looked up in the
folders of ``$NCPIPE_MODEL_DIRS`` (``:``-separated), then in the models that come with ncpipe
(the repository's ``models/``, or the default model inside an installed wheel:
``ncpipe.resources``), then in the model store at ``$NCPIPE_MODEL_STORE`` (a URL, fetched
once per node: ``ncpipe.models.store``). Loading by name verifies the checkpoint against the
SHA-256 its card records.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ncpipe.io.urls import redact
from ncpipe.models import store
from ncpipe.models.checkpoint import CheckpointError, CodecModel, load_codec_model
from ncpipe.resources import shipped_models_dir

CHECKPOINT_NAME = "model.pt"
CARD_NAME = store.CARD_NAME
CODEC_KIND = "codec"
DECODER_FILES = {"refiner": "refiner.pt", "corrdiff": "corrdiff.pt"}  # diffusion decoder kind -> checkpoint file


@dataclass(frozen=True)
class ModelRef:
    """Where a model is and what it must hash to (None for a bare path)."""

    name: str
    checkpoint: Path
    expected_sha256: str | None
    card: dict[str, Any] | None
    from_store: bool = False  # the checkpoint is the node's cached copy of the model store's (fetched on resolve)


def registry_roots() -> list[Path]:
    """The local registry folders, in lookup order: ``$NCPIPE_MODEL_DIRS``, then the shipped models."""
    extra = [Path(p) for p in os.environ.get("NCPIPE_MODEL_DIRS", "").split(os.pathsep) if p]
    return [root for root in [*extra, shipped_models_dir()] if root is not None and root.is_dir()]


def list_models(kind: str = CODEC_KIND) -> list[ModelRef]:
    """Registry entries of one kind: codecs, or a diffusion decoder kind (``refiner``, ``corrdiff``).

    A store's model is listed from its card; :func:`resolve_model` fetches its checkpoint."""
    refs = {}
    for root in registry_roots():
        for card in sorted(root.glob(f"*/{CARD_NAME}")):
            ref = _ref_from_dir(card.parent)
            if _kind(ref.card) == kind:
                refs.setdefault(card.parent.name, ref)
    for name, card in store.store_cards().items():
        if _kind(card) == kind:
            refs.setdefault(name, _store_ref(name, card))
    return [refs[name] for name in sorted(refs)]


def _kind(card: dict[str, Any]) -> str:
    return card.get("kind", CODEC_KIND)


def _checkpoint_name(card: dict[str, Any]) -> str:
    return DECODER_FILES.get(_kind(card), CHECKPOINT_NAME)


def _ref_from_dir(directory: Path) -> ModelRef:
    card = json.loads((directory / CARD_NAME).read_text())
    return ModelRef(directory.name, directory / _checkpoint_name(card), card["sha256"], card)


def _store_ref(name: str, card: dict[str, Any]) -> ModelRef:
    return ModelRef(name, store.cached_checkpoint(name, card, _checkpoint_name(card)), card["sha256"], card,
                    from_store=True)


def resolve_model(name_or_path: str | Path, kind: str = CODEC_KIND) -> ModelRef:
    """A registry entry of ``kind`` by checkpoint path, registry folder or registry name."""
    path = Path(name_or_path)
    if path.is_file():
        return ModelRef(str(path), path, None, None)
    ref = next((_ref_from_dir(folder) for folder in [path, *(root / str(name_or_path) for root in registry_roots())]
                if (folder / CARD_NAME).is_file()), None)
    if ref is None and (card := store.store_card(str(name_or_path))) is not None:
        ref = _store_ref(str(name_or_path), card)
    if ref is not None:
        if _kind(ref.card) != kind:
            raise CheckpointError(f"{str(name_or_path)!r} is a {_kind(ref.card)}, not a {kind}")
        if ref.from_store:
            store.fetch(ref.name, ref.card, ref.checkpoint.name)
        return ref
    known = ", ".join(ref.name for ref in list_models(kind)) or "none"
    label = "model" if kind == CODEC_KIND else kind  # codecs are what users call "models" (--model)
    raise CheckpointError(
        f"no {label} named or at {str(name_or_path)!r}; registry {label}s: {known}. Give a checkpoint path, add "
        f"the folder holding <name>/{CARD_NAME} to NCPIPE_MODEL_DIRS, or publish it to the model store "
        f"{store.STORE_ENV}={redact(store.store_url() or '(unset)')}"
    )


def find_by_sha256(sha256: str) -> ModelRef | None:
    return next((ref for ref in list_models() if ref.expected_sha256 == sha256), None)


def load_model(name_or_path: str) -> CodecModel:
    ref = resolve_model(name_or_path)
    return load_codec_model(ref.checkpoint, ref.expected_sha256)


def describe_sha256(sha256: str) -> str:
    """Name a model for an error message: its registry name when it is known here."""
    ref = find_by_sha256(sha256)
    return f"registry model {ref.name!r} (sha256 {sha256})" if ref else f"sha256 {sha256} (not in this registry)"
