"""``ncpipe train corrdiff``: phase 2 of CorrDiff, the diffusion decoder conditioned on a frozen codec's ŷ.

::

    phase 1 (done): the codec, rate-distortion trained and released (models/<name>/model.pt)

    phase 2:  training images ──codec.analyse(q)─> symbols ──entropy_parameters──> ŷ = Δ_q·y_sym + μ (frozen codec,
              (uint8, whole)     (real rounding)                                  kept in memory   real quantization)
                   │
                   └─> aligned random crops (x0, ŷ) ─> x0 ∈ [-1,1] ─> gaussian_training_batch: t ~ U[0,1),
                       x_t = √ᾱ(t)·x0 + √(1−ᾱ(t))·ε
                       loss = ‖CorrDiffDecoder(x_t, t | ŷ) − x0‖²,  Adam, warm-up, one ×0.1 step

x̂ is not an input of the network (it only enters at sampling time, through the correction), so the
decoder learns p(x | ŷ) alone. The decoded training set and the latent-grid-aligned crops are the
refiner trainer's (``decoded_training_set``, ``AlignedCrops``): the same cache serves both. Resumable:
the state is written atomically every ``checkpoint_every`` steps and a re-run with the same
``run_dir`` continues; the released decoder goes to ``<run_dir>/corrdiff.pt``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ncpipe.codec import LearnedCodec
from ncpipe.device import resolve_device
from ncpipe.diffusion.corrdiff import CORRDIFF_FILE, CorrDiffConfig, CorrDiffDecoder, save_corrdiff
from ncpipe.diffusion.objectives import gaussian_training_batch
from ncpipe.diffusion.refiner import TrainedCodec
from ncpipe.diffusion.unet import to_model_range
from ncpipe.models.registry import load_model
from ncpipe.train.diffusion_state import (
    DiffusionTrainOptions,
    RunState,
    provenance,
    release,
    released_network,
    resume_on,
    run_steps,
)
from ncpipe.train.refiner_trainer import AlignedCrops, decoded_training_set, load_initial_weights, training_qualities

log = logging.getLogger(__name__)

TRAIN_STATE_FORMAT = "ncpipe-train-corrdiff/1"
YHAT_SOURCE = (
    "frozen codec on whole training images: LearnedCodec.analyse symbols (round(z - median), exact integer h_s, "
    "round(y - mu)) -> y_hat = y_sym + mu from entropy_parameters; crops aligned to the 16-pixel latent grid"
)
OBJECTIVE = "x0 prediction, Gaussian (cosine alpha-bar, continuous t ~ U[0,1)), L2 in [-1, 1]"


@dataclass(frozen=True)
class CorrDiffTrainConfig(DiffusionTrainOptions):
    codec: str  # registry name or checkpoint path of the frozen phase-1 codec
    data: tuple[str, ...]
    run_dir: str
    latent_features: int = 8
    conditioner_hidden: int = 64
    sample_steps: int = 4  # K the encoder uses by default (stored in the decoder's config)
    coefficient_bits: int = 4  # b the encoder uses by default
    multiscale: bool = False  # the latent-grid features enter every U-Net level too
    coefficient_groups: int = 1  # 3: one coefficient per step and RGB channel
    qualities: tuple[int, ...] = ()  # quality levels of a variable-rate codec to train on (empty: all)

    def corrdiff_config(self, latent_channels: int) -> CorrDiffConfig:
        return CorrDiffConfig(
            latent_channels=latent_channels, unet=self.unet_config(), latent_features=self.latent_features,
            conditioner_hidden=self.conditioner_hidden, steps=self.sample_steps, bits=self.coefficient_bits,
            multiscale=self.multiscale, coefficient_groups=self.coefficient_groups,
        )


def corrdiff_loss(decoder: CorrDiffDecoder, x0: torch.Tensor, y_hat: torch.Tensor, generator: torch.Generator,
                  amp_dtype: torch.dtype | None = None) -> torch.Tensor:
    """‖decoder(x_t, t | ŷ) − x0‖² in the model range for one batch (x0 in [0, 1], t ~ U[0, 1))."""
    batch = gaussian_training_batch(to_model_range(x0), generator)
    with torch.autocast(device_type=x0.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        pred = decoder(batch.x_t, batch.t, y_hat)
    return F.mse_loss(pred.float(), batch.target)


def train_corrdiff(config: CorrDiffTrainConfig) -> Path:
    """Train (or resume) and release; returns the path of ``<run_dir>/corrdiff.pt``."""
    if config.threads:
        torch.set_num_threads(config.threads)
    device, run_dir = resolve_device(config.device), Path(config.run_dir)
    codec = LearnedCodec(load_model(config.codec), coder_threads=1)
    try:
        identity = codec.model.identity
        torch.manual_seed(config.seed)
        decoder = CorrDiffDecoder(config.corrdiff_config(codec.model.adapter.latent_channels),
                                  TrainedCodec(identity.sha256, identity.arch, identity.rate))
        optimizer = torch.optim.Adam(decoder.parameters(), lr=config.lr)
        run = RunState(TRAIN_STATE_FORMAT, {"corrdiff_config": decoder.config.to_dict(),
                                            "codec": asdict(decoder.codec)}, "CorrDiff")
        resumed = resume_on(decoder, optimizer, run_dir, run, device, config, load_initial_weights)
        images = config.training_images(config.data)
        started = time.perf_counter()
        pools = [decoded_training_set(codec, images, config.cache_dir, q)
                 for q in training_qualities(codec, config.qualities)]
        log.info("decoded %d training images in %.1f s", len(images), time.perf_counter() - started)
    finally:
        codec.close()

    def batch_loss(batch, generator, amp_dtype):
        x0, x_hat, y_hat, _ = batch
        # codec_mse: the end-to-end decoder's error on the same crops, in the same range (a scale for the loss)
        codec_mse = F.mse_loss(to_model_range(x_hat), to_model_range(x0)).item()
        return corrdiff_loss(decoder, x0, y_hat, generator, amp_dtype), {"codec_mse": codec_mse}

    crops = AlignedCrops(pools, config.crop, config.seed + resumed.step)
    last_loss = run_steps(decoder, optimizer, crops, config, run_dir, run, device, resumed, batch_loss)
    record = provenance(config, device, len(images), last_loss, yhat_source=YHAT_SOURCE, objective=OBJECTIVE,
                        phase="2 of 2: diffusion decoder on the frozen phase-1 codec's latents",
                        weights="EMA" if resumed.ema is not None else "raw")
    return release(released_network(decoder, resumed), run_dir / CORRDIFF_FILE, record, save_corrdiff, "CorrDiff")
