"""Releasing a trained run into the registry: checkpoint, measured results, card."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ncpipe.evaluation.learned import load_image_set
from ncpipe.evaluation.run import card_evaluation, evaluate_checkpoint
from ncpipe.models.cards import now_utc, write_card
from ncpipe.models.checkpoint import CheckpointError, file_sha256, release_checkpoint, save_checkpoint
from ncpipe.models.registry import CHECKPOINT_NAME, DECODER_FILES, ModelRef, find_by_sha256
from ncpipe.train.codec_trainer import adapter_from_state
from ncpipe.train.loop import load_state

log = logging.getLogger(__name__)


def release_run(
    run_dir: Path,
    models_dir: Path,
    name: str,
    eval_images: list[Path],
    dataset: str,
    command: str,
    summary: str,
    training_facts: dict[str, Any],
    default_quality: int | None = None,
) -> dict[str, Any]:
    """Freeze ``run_dir``'s training state as ``models_dir/name`` and measure it."""
    state = load_state(run_dir)
    if state is None:
        raise FileNotFoundError(f"no training state in {run_dir}")
    adapter = adapter_from_state(state)
    training = {**{k: state["config"][k] for k in ("data", "batch_size", "crop", "lr", "lr_decay_at", "seed")},
                "steps": state["step"], **training_facts}
    checkpoint = release_checkpoint(adapter, state["lambdas"], {"training": training}, default_quality)
    directory = models_dir / name
    sha256 = save_checkpoint(checkpoint, directory / CHECKPOINT_NAME)
    ref = ModelRef(name, directory / CHECKPOINT_NAME, sha256, None)
    results = evaluate_checkpoint(ref, load_image_set(eval_images), "cpu")
    card = {
        "name": name,
        "summary": summary,
        "released": now_utc(),
        "arch": state["arch"],
        "hparams": state["hparams"],
        "rate": checkpoint["rate"],
        **({"quality": checkpoint["quality"]} if "quality" in checkpoint else {}),
        "sha256": sha256,
        "file_sha256": file_sha256(directory / CHECKPOINT_NAME),
        "training": training,
        "evaluations": [card_evaluation(results, dataset, command, "cpu",
                                        checkpoint.get("quality", {}).get("default"))],
    }
    write_card(directory, card)
    log.info("released %s: %s", name, card["evaluations"][0])
    return card



DECODER_FORMATS = {"ncpipe-refiner/1": "refiner", "ncpipe-corrdiff/1": "corrdiff"}


def release_decoder(checkpoint_path: Path, directory: Path, summary: str, command: str,
                    results: Path | None) -> dict[str, Any]:
    """Copy a diffusion decoder (refiner or CorrDiff) into the registry folder ``directory`` with its card.

    ``results`` is an ``evaluate-refiner`` / ``evaluate-corrdiff`` output folder whose ``summary.md``
    (the measured table, with its command, machine and date) goes into the card verbatim.
    """
    import shutil

    from ncpipe.diffusion.refiner import decoder_digest, read_weights_checkpoint

    checkpoint = read_weights_checkpoint(checkpoint_path, tuple(DECODER_FORMATS), CheckpointError,
                                         "diffusion decoder")
    kind = DECODER_FORMATS[checkpoint["format"]]
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / DECODER_FILES[kind]
    shutil.copyfile(checkpoint_path, target)
    card = {
        "name": directory.name, "kind": kind, "summary": summary, "released": now_utc(),
        "sha256": decoder_digest(checkpoint), "file_sha256": file_sha256(target),
        "codecs": [{**c, "name": _registry_name(c["sha256"])} for c in checkpoint["codecs"]],
        "config": checkpoint["config"],
        "provenance": checkpoint.get("provenance", {}), "command": command,
        "measured": (results / "summary.md").read_text() if results else None,
    }
    write_card(directory, card)
    return card


def _registry_name(sha256: str) -> str | None:
    ref = find_by_sha256(sha256)
    return ref.name if ref else None
