"""CompressAI zoo weights from a local file or the torch hub cache, released into the registry.

ncpipe never downloads: the file must already be on disk (``--file``), or where CompressAI's
own zoo caches it (``torch.hub.get_dir()/checkpoints/<arch>-<quality>-<hash>.pth.tar``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from compressai.zoo.image import cfgs, model_urls
from compressai.zoo.pretrained import load_pretrained

from ncpipe.config import ConfigError
from ncpipe.models.architectures import HyperpriorAdapter, architecture
from ncpipe.models.checkpoint import CheckpointError, file_sha256, release_checkpoint

# CompressAI's zoo models (MSE) were trained with these λ per quality (loss λ·255²·MSE + bpp):
# CompressAI documentation, "Image compression" zoo page, section "Training".
ZOO_MSE_LAMBDAS = {1: 0.0018, 2: 0.0035, 3: 0.0067, 4: 0.0130, 5: 0.0250, 6: 0.0483, 7: 0.0932, 8: 0.1800}
# CompressAI's zoo file names: <arch>-<quality>-<first hex digits of the file's SHA-256>.pth.tar
_ZOO_FILE_NAME = re.compile(r"^(?P<arch>[A-Za-z0-9_-]+?)-(?P<quality>\d+)-(?P<hash>[0-9a-f]{6,64})\.pth\.tar$")


def find_zoo_file(arch: str, quality: int, cache_dir: Path | None = None) -> Path:
    """The one CompressAI zoo file for (arch, MSE, quality) in the torch hub cache; never downloads."""
    cache_dir = cache_dir or Path(torch.hub.get_dir()) / "checkpoints"
    pattern = f"{arch}-{quality}-*.pth.tar"
    matches = sorted(p for p in cache_dir.glob(pattern) if _zoo_name(p.name) == (arch, quality))
    if not matches:
        raise FileNotFoundError(
            f"no CompressAI zoo file {pattern} in {cache_dir} (the torch hub cache; TORCH_HOME moves it). "
            "ncpipe never downloads weights: copy the file there, or pass --file PATH"
        )
    if len(matches) > 1:
        raise ConfigError(f"several zoo files match {pattern} in {cache_dir}: {[p.name for p in matches]}; pass --file")
    return matches[0]


def _zoo_name(file_name: str) -> tuple[str, int] | None:
    match = _ZOO_FILE_NAME.match(file_name)
    return (match["arch"], int(match["quality"])) if match else None


def import_zoo_weights(
    arch: str, quality: int, path: Path, lmbda: float | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(released checkpoint, source facts) of a CompressAI weights file, after checking its name and sizes."""
    spec = architecture(arch)
    if lmbda is None and quality not in ZOO_MSE_LAMBDAS:
        raise ConfigError(f"--quality: CompressAI's zoo has qualities 1..8, not {quality}")
    source_sha256 = file_sha256(path)
    named = _ZOO_FILE_NAME.match(path.name)
    if named and (named["arch"], int(named["quality"])) != (arch, quality):
        raise ConfigError(f"{path.name} is CompressAI's {named['arch']} quality {named['quality']}, "
                          f"not {arch} quality {quality}")
    if named and not source_sha256.startswith(named["hash"]):
        raise CheckpointError(f"{path} has SHA-256 {source_sha256}, but its zoo name says it starts with "
                              f"{named['hash']}: the file is damaged or not the one published under that name")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a bad file; all mean "unreadable"
        raise CheckpointError(f"{path} is not a loadable weights-only file: {err}") from None
    state_dict = loaded.get("state_dict", loaded) if isinstance(loaded, dict) else None
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors")
    try:
        model = spec.builder.from_state_dict(load_pretrained(state_dict))
    except (KeyError, RuntimeError) as err:
        raise CheckpointError(f"{path} is not a CompressAI {arch} state dict: {err}") from None
    adapter = HyperpriorAdapter(spec, model)
    sizes = (adapter.hyper_channels, adapter.latent_channels)
    official = model_urls.get(arch, {}).get("mse", {}).get(quality, "").rsplit("/", 1)[-1]
    if named and sizes != tuple(cfgs[arch][quality]):
        raise CheckpointError(f"{path} has N, M = {sizes}, but CompressAI's {arch} quality {quality} has "
                              f"{tuple(cfgs[arch][quality])}")
    source = {
        "kind": "compressai-zoo", "arch": arch, "quality": quality, "metric": "mse", "file": str(path),
        "file_sha256": source_sha256, "zoo_file_name": bool(named), "compressai_release": path.name == official,
        "lambda": "given" if lmbda is not None else "CompressAI zoo training λ for this quality",
    }
    # float32 kept: an imported model reproduces CompressAI's published weights exactly
    checkpoint = release_checkpoint(adapter, [lmbda if lmbda is not None else ZOO_MSE_LAMBDAS[quality]],
                                    {"source": source}, half_precision=False)
    return checkpoint, source
