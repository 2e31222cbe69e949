"""``ncpipe train codec``: rate-distortion training of a CompressAI architecture.

Loss (Ballé et al. 2018): ``L = λ · 255² · MSE(x, x̂) + bpp``, with the noise proxy
for quantization, plus the entropy bottleneck's auxiliary quantile loss on its own
optimizer. With several ``lambdas`` the model is variable-rate: every crop draws a
quality level, is quantized with that level's steps and weighted by its λ, so one set
of transforms learns every rate.

Training comes in windows (a GPU lease, a CI slot): ``max_minutes`` ends a run cleanly,
the state is saved every ``checkpoint_every`` steps and every ``checkpoint_minutes``,
and a re-run with the same ``run_dir`` resumes. A new ``run_dir`` continues from a
released model with ``init_from`` (``ncpipe.train.release`` freezes the state into one).
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ncpipe.config import ConfigError
from ncpipe.device import autocast_dtype, resolve_device
from ncpipe.models.architectures import HyperpriorAdapter, build_adapter
from ncpipe.train.data import RandomCrops, load_training_images
from ncpipe.train.loop import (
    StepMeans,
    TrainingWindow,
    load_state,
    save_state,
    step_learning_rate,
)

log = logging.getLogger(__name__)

# Quality levels 1..8 of the shipped variable-rate codec: λ doubles from one level to the next.
QUALITY_LAMBDAS = tuple(0.0008 * 2**k for k in range(8))


@dataclass(frozen=True)
class CodecTrainConfig:
    data: tuple[str, ...]
    run_dir: str
    arch: str = "mbt2018-mean"
    hparams: dict[str, int] = field(default_factory=lambda: {"N": 96, "M": 128})
    lambdas: tuple[float, ...] = QUALITY_LAMBDAS  # one λ: a fixed-rate model; several: quality levels 1..n
    steps: int = 20000
    batch_size: int = 8
    crop: int = 128
    lr: float = 1e-4
    aux_lr: float = 1e-3
    lr_decay_at: float = 0.85
    clip_grad_norm: float = 1.0
    checkpoint_every: int = 500
    checkpoint_minutes: float = 5.0
    max_minutes: float | None = None  # stop (saving the state) after this much training time
    part_mib: int | None = None  # write the training state as parts of at most this many MiB
    log_every: int = 50
    seed: int = 0
    device: str = "auto"
    amp: bool = True
    threads: int = 0
    init_from: str | None = None

    def __post_init__(self) -> None:
        if not self.data or not self.run_dir:
            raise ConfigError("data and run_dir are required")
        for name in ("steps", "batch_size", "crop", "lr", "aux_lr", "checkpoint_every", "log_every",
                     "checkpoint_minutes"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}: must be positive, got {getattr(self, name)!r}")
        for name in ("max_minutes", "part_mib"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ConfigError(f"{name}: must be positive, got {getattr(self, name)!r}")
        if not self.lambdas or any(v <= 0 for v in self.lambdas) or list(self.lambdas) != sorted(set(self.lambdas)):
            raise ConfigError(f"lambdas: one or more distinct positive λ in increasing order, got {self.lambdas!r}")
        if not 0.0 < self.lr_decay_at <= 1.0:
            raise ConfigError(f"lr_decay_at: must lie in (0, 1], got {self.lr_decay_at!r}")
        if self.threads < 0:
            raise ConfigError(f"threads: must be >= 0, got {self.threads!r}")


def resume_step(config: CodecTrainConfig) -> int:
    """The step a run resumes from (0: a new run); refuses a run_dir holding a different model."""
    return _resumable_step(config, load_state(Path(config.run_dir)))


def _resumable_step(config: CodecTrainConfig, state: dict | None) -> int:
    if state is None:
        return 0
    saved = {"arch": state["arch"], "hparams": dict(state["hparams"]), "lambdas": list(state.get("lambdas", ()))}
    wanted = {"arch": config.arch, "hparams": dict(config.hparams), "lambdas": list(config.lambdas)}
    if saved != wanted:
        raise ConfigError(
            f"run_dir {config.run_dir} holds a run of {saved}, not {wanted}: resume it with its own settings, "
            "or choose another run_dir (init_from starts a new run from its weights)"
        )
    return int(state["step"])


def rate_distortion_loss(adapter: HyperpriorAdapter, x: torch.Tensor, lambdas: torch.Tensor,
                         levels: torch.Tensor | None, amp_dtype):
    """Returns (loss, bpp, mse), each averaged over the batch; ``lambdas`` (B,) weighs each crop."""
    out = adapter.forward_train(x, amp_dtype, levels)
    pixels = x.shape[2] * x.shape[3]
    bits = sum(torch.log(lk).flatten(1).sum(1) for lk in (out.y_likelihoods, out.z_likelihoods)) / -math.log(2)
    bpp = bits / pixels
    mse = ((out.x_hat - x) ** 2).flatten(1).mean(1)
    return (lambdas * 255.0**2 * mse + bpp).mean(), bpp.mean(), mse.mean()


def _optimizers(adapter: HyperpriorAdapter, config: CodecTrainConfig):
    named = dict(adapter.modules().named_parameters())
    aux_names = {n for n in named if n.endswith(".quantiles")}
    main = torch.optim.Adam([p for n, p in named.items() if n not in aux_names], lr=config.lr)
    aux = torch.optim.Adam([named[n] for n in sorted(aux_names)], lr=config.aux_lr)
    return main, aux


def train_codec(config: CodecTrainConfig) -> Path:
    """Train (or resume) until `steps`, `max_minutes` or Ctrl-C; returns the run_dir holding the saved state."""
    run_dir = Path(config.run_dir)
    state = load_state(run_dir)
    _resumable_step(config, state)
    if config.threads:
        torch.set_num_threads(config.threads)
    device = resolve_device(config.device)
    torch.manual_seed(config.seed)
    weights = initial_weights(config.init_from) if config.init_from and state is None else None
    adapter = build_adapter(config.arch, config.hparams, config.lambdas, _reference_lambda(config, weights))
    main_opt, aux_opt = _optimizers(adapter, config)
    start = _restore(adapter, main_opt, aux_opt, state, weights, config)
    adapter.modules().to(device).train()
    _optimizer_to(main_opt, device)
    _optimizer_to(aux_opt, device)
    crops = RandomCrops(load_training_images(config.data, config.crop), config.crop, config.seed + start, device)
    level_rng = np.random.default_rng(config.seed + start + 1)
    lambdas = torch.tensor(config.lambdas, dtype=torch.float32, device=device)
    amp_dtype = autocast_dtype(device, config.amp)
    progress = StepMeans(config.steps, config.log_every)
    log.info("training %s %s λ=%s on %s from step %d", config.arch, config.hparams,
             ",".join(f"{v:g}" for v in config.lambdas), device, start)
    step = start
    with TrainingWindow(config.steps, config.checkpoint_every, config.checkpoint_minutes,
                        config.max_minutes) as window:
        while step < config.steps:
            for group in main_opt.param_groups:
                group["lr"] = step_learning_rate(step, config.steps, config.lr, config.lr_decay_at)
            levels = torch.from_numpy(level_rng.integers(len(config.lambdas), size=config.batch_size)).to(device)
            values = _train_step(adapter, main_opt, aux_opt, crops.batch(config.batch_size), lambdas, levels,
                                 amp_dtype, config.clip_grad_norm)
            progress.add(step, **values)
            step += 1
            due, end = window.after(step)
            if due:
                _save(adapter, main_opt, aux_opt, run_dir, config, step)
                window.saved()
            if end:
                window.log_end(step)
                break
    return run_dir


def _train_step(adapter, main_opt, aux_opt, x, lambdas, levels, amp_dtype, clip_grad_norm: float) -> dict[str, float]:
    """One optimizer step of each optimizer; returns the values the progress log averages."""
    loss, bpp, mse = rate_distortion_loss(
        adapter, x, lambdas[levels], levels if adapter.quality is not None else None, amp_dtype)
    main_opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(adapter.modules().parameters(), clip_grad_norm)
    main_opt.step()
    aux_loss = adapter.model.aux_loss()
    aux_opt.zero_grad(set_to_none=True)
    aux_loss.backward()
    aux_opt.step()
    psnr = -10 * math.log10(max(mse.item(), 1e-10))
    return {"loss": loss.item(), "bpp": bpp.item(), "psnr": psnr, "aux": aux_loss.item()}


def _restore(adapter, main_opt, aux_opt, state: dict | None, weights: "InitialWeights | None",
             config: CodecTrainConfig) -> int:
    """Load the run's own state (resume) or, for a new run, the ``init_from`` weights; the start step."""
    if state is not None:
        _load_weights(adapter, state["model"], _state_log_steps(adapter, state))
        main_opt.load_state_dict(state["optimizer"])
        aux_opt.load_state_dict(state["aux_optimizer"])
        log.info("resuming %s at step %d", config.run_dir, state["step"])
        return int(state["step"])
    if weights is not None:
        if adapter.quality is not None and weights.log_steps is not None and not np.array_equal(
                np.float32(weights.lambdas), np.float32(config.lambdas)):  # compared as released (float32)
            raise ConfigError(f"init_from: {config.init_from} has quality levels λ={weights.lambdas}, "
                              f"not {config.lambdas}; train with its lambdas to continue it")
        _load_weights(adapter, weights.model, weights.log_steps)
        log.info("initialised from %s", config.init_from)
    return 0


def _state_log_steps(adapter: HyperpriorAdapter, state: dict) -> torch.Tensor | None:
    """A variable-rate run's state always holds its steps (a KeyError otherwise: a torn or foreign state)."""
    return state["quality_log_steps"] if adapter.quality is not None else None


def _load_weights(adapter: HyperpriorAdapter, model: dict, log_steps: torch.Tensor | None) -> None:
    """CompressAI weights, and a variable-rate model's step logarithms when there are any."""
    adapter.model.load_state_dict(model)
    if adapter.quality is not None and log_steps is not None:
        adapter.quality.log_steps.data.copy_(log_steps)


@dataclass(frozen=True)
class InitialWeights:
    """What ``init_from`` provides: the CompressAI weights, and the λ levels and steps when it has them."""

    model: dict[str, torch.Tensor]
    lambdas: tuple[float, ...]
    log_steps: torch.Tensor | None


def initial_weights(path: str) -> InitialWeights:
    """The weights of another run's training state or of a released checkpoint (model.pt)."""
    init = load_state(Path(path)) if Path(path).is_dir() else torch.load(path, map_location="cpu",
                                                                          weights_only=True)
    if init is None or not isinstance(init, dict):
        raise ConfigError(f"init_from: {path} is neither a training state nor a released checkpoint")
    if "model" in init:  # a training state
        return InitialWeights(init["model"], tuple(init.get("lambdas", ())), init.get("quality_log_steps"))
    if "state_dict" in init:  # a released checkpoint: float32 again, steps back to their logarithms
        model = {k: v.float() if v.is_floating_point() else v for k, v in init["state_dict"].items()}
        quality = init.get("quality")
        if quality is None:
            return InitialWeights(model, (init["rate"]["lambda"],), None)
        return InitialWeights(model, tuple(quality["lambdas"]), init["quality_steps"].double().log().float())
    raise ConfigError(f"init_from: {path} is neither a training state nor a released checkpoint")


def adapter_from_state(state: dict) -> HyperpriorAdapter:
    """The trained model a training state holds (variable-rate when it has several λ)."""
    adapter = build_adapter(state["arch"], state["hparams"], tuple(state["lambdas"]))
    _load_weights(adapter, state["model"], _state_log_steps(adapter, state))
    return adapter


def _reference_lambda(config: CodecTrainConfig, weights: InitialWeights | None) -> float | None:
    """The λ the initial weights were trained at (steps start at 1 there); None for a new model."""
    if weights is None or len(config.lambdas) < 2 or not weights.lambdas:
        return None
    return float(np.exp(np.mean(np.log(weights.lambdas))))


def _save(adapter, main_opt, aux_opt, run_dir: Path, config: CodecTrainConfig, step: int) -> None:
    state = {
        "format": "ncpipe-train-codec/1",
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(config).items()},
        "arch": config.arch,
        "hparams": dict(config.hparams),
        "lambdas": list(config.lambdas),
        "step": step,
        "model": {k: v.detach().cpu() for k, v in adapter.model.state_dict().items()},
        "optimizer": main_opt.state_dict(),
        "aux_optimizer": aux_opt.state_dict(),
    }
    if adapter.quality is not None:
        state["quality_log_steps"] = adapter.quality.log_steps.detach().cpu().clone()
    path = save_state(run_dir, state, config.part_mib)
    log.info("saved %s at step %d", path, step)


def _optimizer_to(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    for state in optimizer.state.values():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                state[key] = value.to(device)
