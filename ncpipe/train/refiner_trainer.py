"""``ncpipe train refiner``: train an NC-Diffusion refiner (or the Gaussian-start baseline) for frozen codecs.

::

    training images ──codec.analyse(q)──> symbols ──entropy_parameters, synthesise──> (x, x̂, ŷ, λ_q) per image
    (uint8, whole)    (real rounding,       (the decoder's exact path, on the      and quality, kept in memory
                       every quality q)      training device)
         │
         └─> aligned random crops (x0, x̂, ŷ, λ) ─> [-1,1] ─> RefinerConfig.training_batch:
                 bridge, η = continuous_eta(u), u ~ U[0,1] (or η from the T-step schedule), or Gaussian
             loss = ‖Refiner(x_t, t | x̂, ŷ, log λ) − x0‖² (or L1),  Adam, step LR with warm-up, EMA of the weights

x̂ is what a decoder reconstructs from each training image's bitstream (the codec's real quantization,
not the uniform-noise proxy), computed once per whole image and quality as deployment decodes whole
images; crops are aligned to the 16-pixel latent grid so the ŷ crop is exactly the crop's latents.
Every crop draws one (codec, quality) pool at random: all qualities of a variable-rate codec by
default, conditioned on log λ_q when ``rate_conditioning``. Training comes in windows
(``max_minutes``; ``diffusion_state``): at every save the EMA weights are scored on a fixed
validation batch and released to ``<run_dir>/refiner.pt`` when they beat the best so far, so the
file is always the run's best released weights; ``init_from`` starts a new run from them.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ncpipe.bitstream import LATENT_STRIDE
from ncpipe.codec import LearnedCodec
from ncpipe.config import ConfigError
from ncpipe.device import resolve_device
from ncpipe.diffusion.refiner import Refiner, RefinerConfig, TrainedCodec, decoded_batch, save_refiner
from ncpipe.diffusion.unet import to_model_range
from ncpipe.models.checkpoint import save_torch
from ncpipe.models.registry import load_model
from ncpipe.train.diffusion_state import DiffusionTrainOptions, RunState, provenance, resume_on, run_steps
from ncpipe.train.loop import load_state

log = logging.getLogger(__name__)

TRAIN_STATE_FORMAT = "ncpipe-train-refiner/1"
VALIDATION_SEED = 1_000_003  # the fixed validation crops and draws: the same for every save of a run
REFINER_FILE = "refiner.pt"
XHAT_SOURCE = (
    "decoder path on whole training images: LearnedCodec.analyse symbols (round(z - median), exact integer "
    "h_s, round(y - mu)) -> entropy_parameters -> synthesise (clamped), crops aligned to the latent grid"
)


@dataclass(frozen=True)
class RefinerTrainConfig(DiffusionTrainOptions):
    codecs: tuple[str, ...]  # registry names or checkpoint paths, one per rate point
    data: tuple[str, ...]
    run_dir: str
    process: str = "bridge"  # "gaussian": the CDC-style Gaussian-start baseline (same U-Net)
    latent_features: int = 0
    rate_conditioning: bool = False
    schedule: str = "geometric"
    eta_min: float = 0.05
    eta_power: float = 1.0
    train_schedule_steps: int = 4
    train_levels: str = "continuous"  # or "discrete": η only from the T-step schedule
    kappa: float = 0.0
    parameterization: str = "auto"  # residual for the bridge, x0 for the Gaussian start
    loss: str = "l2"
    qualities: tuple[int, ...] = ()  # quality levels of a variable-rate codec to train on (empty: all)
    validation_crops: int = 16  # size of the fixed batch the released weights are chosen on

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.codecs:
            raise ValueError("name at least one codec checkpoint to train the refiner for")
        if self.loss not in ("l1", "l2"):
            raise ValueError(f"loss must be l1 or l2, got {self.loss!r}")
        if self.validation_crops < 1:
            raise ValueError("validation_crops must be >= 1")

    def refiner_config(self, latent_channels: int) -> RefinerConfig:
        param = self.parameterization
        if param == "auto":
            param = "residual" if self.process == "bridge" else "x0"
        return RefinerConfig(
            unet=self.unet_config(), process=self.process, parameterization=param, schedule=self.schedule,  # type: ignore[arg-type]
            eta_min=self.eta_min, eta_power=self.eta_power, train_schedule_steps=self.train_schedule_steps,
            train_levels=self.train_levels, kappa=self.kappa, rate_conditioning=self.rate_conditioning,
            latent_features=self.latent_features,
            latent_channels=latent_channels if self.latent_features else 0,
        )


@dataclass(frozen=True)
class DecodedImage:
    """One training image and what the decoder reconstructs from its bitstream."""

    x: torch.Tensor  # (3, h, w) uint8 original
    x_hat: torch.Tensor  # (3, h, w) float32 in [0, 1]
    y_hat: torch.Tensor  # (M, hy, wy) float32
    rate: float


def decode_training_images(codec: LearnedCodec, images: Sequence[np.ndarray],
                           quality: int | None = None) -> list[DecodedImage]:
    """Each image through the real quantization path at ``quality`` (default: the codec's) and the
    decoder's x̂ / ŷ computation, on the codec's device (no rANS: it is lossless)."""
    decoded = []
    for pixels in images:
        batch = codec.analyse([pixels], quality=quality)
        header = codec.header_for(pixels.shape[0], pixels.shape[1], "RGB", batch.quality)
        batch_in = decoded_batch(codec, [header], [batch.symbols(0)])
        decoded.append(DecodedImage(
            x=torch.from_numpy(np.array(pixels, dtype=np.uint8)).permute(2, 0, 1).contiguous(),
            x_hat=batch_in.x_hat[0].cpu().clone(), y_hat=batch_in.y_hat[0].cpu().clone(), rate=batch_in.rates[0],
        ))
    return decoded


def decoded_training_set(
    codec: LearnedCodec, images: Sequence[np.ndarray], cache_dir: str | None, quality: int | None = None
) -> list[DecodedImage]:
    """``decode_training_images``, read from / written to ``cache_dir`` when given.

    The cache file is named by a SHA-256 of the codec's identity, the quality and every image's
    pixels, so a changed codec, quality or image set never reads a stale cache.
    """
    if cache_dir is None:
        return decode_training_images(codec, images, quality)
    digest = hashlib.sha256(codec.model.identity.sha256.encode())
    if quality is not None:
        digest.update(f"quality {quality}|".encode())
    for pixels in images:
        digest.update(f"{pixels.shape}|".encode())
        digest.update(np.ascontiguousarray(pixels).tobytes())
    path = Path(cache_dir) / f"decoded-{digest.hexdigest()[:24]}.pt"
    if path.is_file():
        log.info("reading the decoded training set from %s", path)
        stored = torch.load(path, map_location="cpu", weights_only=True)
        return [DecodedImage(**item) for item in stored["images"]]
    decoded = decode_training_images(codec, images, quality)
    save_torch({"codec_sha256": codec.model.identity.sha256, "images": [asdict(d) for d in decoded]}, path)
    return decoded


class AlignedCrops:
    """Random square crops of (x0, x̂, ŷ) at positions on the latent grid, from a seeded generator."""

    def __init__(self, pools: Sequence[Sequence[DecodedImage]], crop: int, seed: int) -> None:
        self.pools, self.crop = [list(p) for p in pools], crop
        self.rng = np.random.default_rng(seed)
        for pool in self.pools:
            if not pool or any(min(d.x.shape[-2:]) < crop for d in pool):
                raise ValueError(f"every training image must have both sides >= crop {crop}")

    def batch(self, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x0, x̂) (size, 3, c, c) in [0, 1], ŷ (size, M, c/16, c/16), λ (size,)."""
        x0, x_hat, y_hat, rates = [], [], [], []
        s, c = LATENT_STRIDE, self.crop
        for _ in range(size):
            pool = self.pools[self.rng.integers(len(self.pools))]
            item = pool[self.rng.integers(len(pool))]
            top = s * self.rng.integers((item.x.shape[1] - c) // s + 1)
            left = s * self.rng.integers((item.x.shape[2] - c) // s + 1)
            x0.append(item.x[:, top : top + c, left : left + c])
            x_hat.append(item.x_hat[:, top : top + c, left : left + c])
            y_hat.append(item.y_hat[:, top // s : (top + c) // s, left // s : (left + c) // s])
            rates.append(item.rate)
        return (torch.stack(x0).float().div_(255.0), torch.stack(x_hat), torch.stack(y_hat),
                torch.tensor(rates, dtype=torch.float32))


class BatchLoss(NamedTuple):
    loss: torch.Tensor  # the training loss, in the model range [-1, 1]
    identity: torch.Tensor  # the same loss for x0_hat = x_t (what the untrained residual refiner scores)


def refiner_loss(refiner: Refiner, x0: torch.Tensor, x_hat: torch.Tensor, y_hat: torch.Tensor, rates: torch.Tensor,
                 generator: torch.Generator, loss: str = "l2", amp_dtype: torch.dtype | None = None) -> BatchLoss:
    """The training loss of one batch ([0, 1] inputs): x0 target, L2 or L1 in the model range."""
    x0m, xhm = to_model_range(x0), to_model_range(x_hat)
    cfg = refiner.config
    batch = cfg.training_batch(x0m, xhm, generator)
    with torch.autocast(device_type=x0.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        pred = refiner(batch.x_t, batch.t, xhm, y_hat if cfg.latent_features else None,
                       rates if cfg.rate_conditioning else None)
    def reduce(error: torch.Tensor) -> torch.Tensor:
        return error.square().mean() if loss == "l2" else error.abs().mean()

    return BatchLoss(reduce(pred.float() - batch.target), reduce(batch.x_t.detach() - batch.target))


def train_refiner(config: RefinerTrainConfig) -> Path:
    """Train (or resume) one window; returns ``<run_dir>/refiner.pt``, the best weights released so far."""
    if config.threads:
        torch.set_num_threads(config.threads)
    device, run_dir = resolve_device(config.device), Path(config.run_dir)
    codecs = [LearnedCodec(load_model(name).to(device), coder_threads=1) for name in config.codecs]
    try:
        trained_for = [TrainedCodec(c.model.identity.sha256, c.model.identity.arch, c.model.identity.rate)
                       for c in codecs]
        torch.manual_seed(config.seed)
        refiner = Refiner(config.refiner_config(codecs[0].model.adapter.latent_channels), trained_for)
        _check_codecs(codecs)
        optimizer = torch.optim.Adam(refiner.parameters(), lr=config.lr)
        run = RunState(TRAIN_STATE_FORMAT, {"refiner_config": refiner.config.to_dict(),
                                            "codecs": [asdict(c) for c in refiner.codecs]}, "refiner")
        resumed = resume_on(refiner, optimizer, run_dir, run, device, config, load_initial_weights)
        images = config.training_images(config.data)
        started = time.perf_counter()
        pools = [decoded_training_set(codec, images, config.cache_dir, q)
                 for codec in codecs for q in training_qualities(codec, config.qualities)]
        log.info("decoded %d training images into %d (codec, quality) pools in %.1f s", len(images), len(pools),
                 time.perf_counter() - started)
    finally:
        for codec in codecs:
            codec.close()

    def batch_loss(batch, generator, amp_dtype):
        x0, x_hat, y_hat, rates = batch
        loss, identity = refiner_loss(refiner, x0, x_hat, y_hat, rates, generator, config.loss, amp_dtype)
        return loss, {"identity_loss": identity.item(), "codec_psnr": _psnr(x_hat, x0)}

    validation = tuple(t.to(device) for t in AlignedCrops(pools, config.crop, VALIDATION_SEED).batch(
        config.validation_crops))
    path = run_dir / REFINER_FILE

    def release_best(network: Refiner, step: int, best: float) -> float:
        score = validation_loss(network.to(device), validation, config.loss)
        if score >= best:
            log.info("step %d: validation loss %.6g, not below the released %.6g", step, score, best)
            return best
        record = provenance(config, device, len(images), score, xhat_source=XHAT_SOURCE, released_at_step=step,
                            validation_loss=score, weights="EMA" if resumed.ema is not None else "raw",
                            rates=sorted({pool[0].rate for pool in pools}))
        sha256 = save_refiner(network.cpu().eval(), path, record)
        log.info("step %d: validation loss %.6g: released %s (sha256 %s)", step, score, path, sha256)
        return score

    crops = AlignedCrops(pools, config.crop, config.seed + resumed.step)
    run_steps(refiner, optimizer, crops, config, run_dir, run, device, resumed, batch_loss, release_best)
    return path


def training_qualities(codec: LearnedCodec, wanted: Sequence[int]) -> list[int | None]:
    """The quality levels a refiner trains on for ``codec``: ``wanted`` (default: every level) of a
    variable-rate codec; [None] (its one rate) for a fixed-rate codec."""
    levels = codec.model.quality
    if levels is None:
        if wanted:
            raise ConfigError(f"qualities: {codec.model.identity.arch} is a fixed-rate codec; it has no quality levels")
        return [None]
    for quality in wanted:
        codec.model.check_quality(quality)
    return list(wanted) or list(range(1, len(levels.lambdas) + 1))


@torch.no_grad()
def validation_loss(refiner: Refiner, batch: Sequence[torch.Tensor], loss: str) -> float:
    """The training loss of ``refiner`` on a fixed batch with fixed draws (levels, noise): comparable across saves."""
    was_training = refiner.training
    refiner.eval()
    generator = torch.Generator().manual_seed(VALIDATION_SEED)
    x0, x_hat, y_hat, rates = batch
    value = refiner_loss(refiner, x0, x_hat, y_hat, rates, generator, loss).loss.item()
    refiner.train(was_training)
    return value


def load_initial_weights(network: torch.nn.Module, source: str) -> None:
    """Weights of a released network (refiner.pt, corrdiff.pt) or of a run directory's state (its EMA when
    it has one) into ``network``; the architectures must match."""
    path = Path(source)
    if path.is_dir():
        state = load_state(path)
        if state is None:
            raise ConfigError(f"init_from: {source} holds no training state")
        weights = state["ema"]["shadow"] if "ema" in state else state["model"]
    elif path.is_file():
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
            raise ConfigError(f"init_from: {source} is not a released refiner or CorrDiff checkpoint")
        weights = checkpoint["state_dict"]
    else:
        raise ConfigError(f"init_from: {source} does not exist")
    current = network.state_dict()
    if set(weights) != set(current) or any(weights[k].shape != current[k].shape for k in current):
        raise ConfigError(f"init_from: {source} holds another network's weights; train with its size and options")
    network.load_state_dict({k: v.to(current[k].dtype) for k, v in weights.items()})


def _psnr(x_hat: torch.Tensor, x0: torch.Tensor) -> float:
    return -10.0 * math.log10(max(F.mse_loss(x_hat, x0).item(), 1e-10))


def _check_codecs(codecs: Sequence[LearnedCodec]) -> None:
    shapes = {(c.model.identity.arch, c.model.adapter.latent_channels) for c in codecs}
    if len(shapes) != 1:
        raise ValueError(f"one refiner serves the rate points of one architecture; got {sorted(shapes)}")
    if len({c.model.identity.sha256 for c in codecs}) != len(codecs):
        raise ValueError("the same codec was named twice")
