"""Ray actors: each holds a model resident on its device and runs whole shards.

Actors receive configurations and model *locations* (registry names or paths, and the paths of
diffusion decoders), never weights: each loads its models once, verified against their SHA-256, and
keeps them.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Callable

import ray
import torch

from ncpipe.codec import LearnedCodec
from ncpipe.config import CompressConfig, DecompressConfig, RecompressConfig
from ncpipe.device import resolve_device
from ncpipe.io.storage import job_temporaries
from ncpipe.models.registry import load_model

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerResources:
    """What each codec actor asks Ray for, and the threads it then uses."""

    num_cpus: float
    num_gpus: float

    @property
    def threads(self) -> int:
        return max(1, int(self.num_cpus))


def _progress_reporter(counter_name: str) -> Callable[[int], None]:
    counter = ray.get_actor(counter_name)
    return lambda samples: counter.add.remote(samples)


def _set_threads(threads: int) -> None:
    torch.set_num_threads(threads)
    os.environ.setdefault("NUMBA_NUM_THREADS", str(threads))


@ray.remote
class CompressActor:
    def __init__(self, config: CompressConfig, threads: int, progress_counter: str):
        from ncpipe.pipeline.compress import ShardCompressor

        _set_threads(threads)
        device = resolve_device(config.device)
        model = load_model(config.model).to(device)
        codec = LearnedCodec(model, config.y_chunk_channels, config.coder_threads or threads)
        corrdiff = None
        if config.corrdiff:
            from ncpipe.diffusion.corrdiff import load_corrdiff

            corrdiff = load_corrdiff(config.corrdiff, device, codec_sha256=model.identity.sha256)
        self.worker = ShardCompressor(
            config, codec, config.model, threads, _progress_reporter(progress_counter), corrdiff=corrdiff
        )
        log.info("compress actor ready: %s on %s", model.identity.short, device)

    def run(self, task):
        with job_temporaries(task.job_id):  # its temps carry its job: cleanup removes its own only
            return self.worker.run(task)

    def ping(self) -> bool:
        return True


@ray.remote
class DecompressActor:
    def __init__(self, config: DecompressConfig, threads: int, progress_counter: str):
        from ncpipe.pipeline.decompress import ShardDecompressor

        _set_threads(threads)
        self.worker = ShardDecompressor(
            config, resolve_device(config.device), threads, _progress_reporter(progress_counter)
        )

    def run(self, task):
        with job_temporaries(task.job_id):  # its temps carry its job: cleanup removes its own only
            return self.worker.run(task)

    def ping(self) -> bool:
        return True


@ray.remote
class RecompressActor:
    """Holds the target model, and decodes old bitstreams with the models they name."""

    def __init__(self, config: RecompressConfig, threads: int, progress_counter: str):
        from ncpipe.pipeline.decompress import CodecCache
        from ncpipe.pipeline.recompress import ShardRecompressor

        _set_threads(threads)
        device = resolve_device(config.device)
        codec = LearnedCodec(load_model(config.model).to(device), config.y_chunk_channels,
                             config.coder_threads or threads)
        self.worker = ShardRecompressor(
            config.compress_config(), codec, config.model, threads, _progress_reporter(progress_counter),
            models=CodecCache(device, threads, config.decode_models),
        )

    def run(self, task):
        with job_temporaries(task.job_id):  # its temps carry its job: cleanup removes its own only
            return self.worker.run(task)

    def ping(self) -> bool:
        return True
