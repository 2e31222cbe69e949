"""``ncpipe train codec``: rate-distortion training of a CompressAI architecture.

Loss (Ballé et al. 2018): ``L = λ · 255² · MSE(x, x̂) + bpp``, with the noise proxy
for quantization, plus the entropy bottleneck's auxiliary quantile loss on its own
optimizer. Training state is saved atomically every ``checkpoint_every`` steps and a
re-run with the same ``run_dir`` resumes from it. ``ncpipe.models.release`` turns the
final state into a shipped checkpoint.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ncpipe.config import ConfigError
from ncpipe.models.architectures import HyperpriorAdapter, build_adapter
from ncpipe.train.data import RandomCrops, load_training_images
from ncpipe.train.loop import (
    ProgressLog,
    autocast_dtype,
    load_state,
    resolve_device,
    save_state,
    step_learning_rate,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CodecTrainConfig:
    data: tuple[str, ...]
    run_dir: str
    arch: str = "mbt2018-mean"
    hparams: dict[str, int] = field(default_factory=lambda: {"N": 96, "M": 128})
    lmbda: float = 0.0067
    steps: int = 20000
    batch_size: int = 8
    crop: int = 128
    lr: float = 1e-4
    aux_lr: float = 1e-3
    lr_decay_at: float = 0.85
    clip_grad_norm: float = 1.0
    checkpoint_every: int = 500
    log_every: int = 50
    seed: int = 0
    device: str = "auto"
    amp: bool = True
    threads: int = 0
    init_from: str | None = None

    def __post_init__(self) -> None:
        if not self.data or not self.run_dir:
            raise ConfigError("data and run_dir are required")
        for name in ("steps", "batch_size", "crop", "lr", "aux_lr", "checkpoint_every", "log_every", "lmbda"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}: must be positive, got {getattr(self, name)!r}")
        if not 0.0 < self.lr_decay_at <= 1.0:
            raise ConfigError(f"lr_decay_at: must lie in (0, 1], got {self.lr_decay_at!r}")
        if self.threads < 0:
            raise ConfigError(f"threads: must be >= 0, got {self.threads!r}")


def resume_step(config: CodecTrainConfig) -> int:
    """The step a run resumes from (0: a new run); refuses a run_dir holding a different model."""
    state = load_state(Path(config.run_dir))
    if state is None:
        return 0
    saved = {"arch": state["arch"], "hparams": dict(state["hparams"]), "lmbda": state["lmbda"]}
    wanted = {"arch": config.arch, "hparams": dict(config.hparams), "lmbda": config.lmbda}
    if saved != wanted:
        raise ConfigError(
            f"run_dir {config.run_dir} holds a run of {saved}, not {wanted}: resume it with its own settings, "
            "or choose another run_dir (init_from starts a new run from its weights)"
        )
    return int(state["step"])


def rate_distortion_loss(adapter: HyperpriorAdapter, x: torch.Tensor, lmbda: float, amp_dtype):
    """Returns (loss, bpp, mse) for one batch."""
    out = adapter.forward_train(x, amp_dtype)
    num_pixels = x.shape[0] * x.shape[2] * x.shape[3]
    bits = sum(torch.log(lk).sum() for lk in (out.y_likelihoods, out.z_likelihoods)) / -math.log(2)
    bpp = bits / num_pixels
    mse = torch.mean((out.x_hat - x) ** 2)
    return lmbda * 255.0**2 * mse + bpp, bpp, mse


def _optimizers(adapter: HyperpriorAdapter, config: CodecTrainConfig):
    named = dict(adapter.model.named_parameters())
    aux_names = {n for n in named if n.endswith(".quantiles")}
    main = torch.optim.Adam([p for n, p in named.items() if n not in aux_names], lr=config.lr)
    aux = torch.optim.Adam([named[n] for n in sorted(aux_names)], lr=config.aux_lr)
    return main, aux


def train_codec(config: CodecTrainConfig) -> Path:
    """Train (or resume) and return the path of the saved training state."""
    resume_step(config)
    if config.threads:
        torch.set_num_threads(config.threads)
    device = resolve_device(config.device)
    run_dir = Path(config.run_dir)
    torch.manual_seed(config.seed)
    adapter = build_adapter(config.arch, config.hparams)
    main_opt, aux_opt = _optimizers(adapter, config)
    start = _restore(adapter, main_opt, aux_opt, run_dir, config)
    adapter.model.to(device).train()
    _optimizer_to(main_opt, device)
    _optimizer_to(aux_opt, device)
    crops = RandomCrops(load_training_images(config.data, config.crop), config.crop, config.seed + start)
    amp_dtype = autocast_dtype(device, config.amp)
    progress = ProgressLog(config.steps, config.log_every)
    log.info("training %s %s λ=%g on %s from step %d", config.arch, config.hparams, config.lmbda, device, start)
    for step in range(start, config.steps):
        for group in main_opt.param_groups:
            group["lr"] = step_learning_rate(step, config.steps, config.lr, config.lr_decay_at)
        x = crops.batch(config.batch_size).to(device, non_blocking=True)
        loss, bpp, mse = rate_distortion_loss(adapter, x, config.lmbda, amp_dtype)
        main_opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(adapter.model.parameters(), config.clip_grad_norm)
        main_opt.step()
        aux_loss = adapter.model.aux_loss()
        aux_opt.zero_grad(set_to_none=True)
        aux_loss.backward()
        aux_opt.step()
        psnr = -10 * math.log10(max(mse.item(), 1e-10))
        progress.add(step, loss=loss.item(), bpp=bpp.item(), psnr=psnr, aux=aux_loss.item())
        if (step + 1) % config.checkpoint_every == 0 or step + 1 == config.steps:
            _save(adapter, main_opt, aux_opt, run_dir, config, step + 1)
    return run_dir / "train_state.pt"


def _restore(adapter, main_opt, aux_opt, run_dir: Path, config: CodecTrainConfig) -> int:
    state = load_state(run_dir)
    if state is not None:
        adapter.model.load_state_dict(state["model"])
        main_opt.load_state_dict(state["optimizer"])
        aux_opt.load_state_dict(state["aux_optimizer"])
        log.info("resuming %s at step %d", run_dir, state["step"])
        return int(state["step"])
    if config.init_from:
        adapter.model.load_state_dict(_initial_weights(config.init_from))
        log.info("initialised from %s", config.init_from)
    return 0


def _initial_weights(path: str) -> dict:
    """The weights of another run's train_state.pt or of a released checkpoint (model.pt)."""
    init = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("model", "state_dict"):
        if key in init:
            return init[key]
    raise ConfigError(f"init_from: {path} is neither a training state nor a released checkpoint")


def _save(adapter, main_opt, aux_opt, run_dir: Path, config: CodecTrainConfig, step: int) -> None:
    state = {
        "format": "ncpipe-train-codec/1",
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(config).items()},
        "arch": config.arch,
        "hparams": dict(config.hparams),
        "lmbda": config.lmbda,
        "step": step,
        "model": {k: v.detach().cpu() for k, v in adapter.model.state_dict().items()},
        "optimizer": main_opt.state_dict(),
        "aux_optimizer": aux_opt.state_dict(),
    }
    path = save_state(run_dir, state)
    log.info("saved %s at step %d", path, step)


def _optimizer_to(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    for state in optimizer.state.values():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                state[key] = value.to(device)
