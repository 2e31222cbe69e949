"""Codec actors: each holds a model resident on its device and runs whole shards.

An actor runs as a Ray actor in its own worker process (the distributor makes these classes remote),
or, for a job of one worker on this machine, in the job's own process (the in-process executor).
Actors receive configurations and model *locations* (registry names or paths, and the paths of
diffusion decoders), never weights: each loads its models once, verified against their SHA-256, and
keeps them.
"""

from __future__ import annotations

import logging
import os
from typing import Callable

import ray
import torch

from ncpipe.allocator import retain_freed_memory
from ncpipe.codec import LearnedCodec
from ncpipe.config import CompressConfig, DecompressConfig, RecompressConfig
from ncpipe.device import resolve_device
from ncpipe.errors import NcpipeError
from ncpipe.io.storage import job_temporaries
from ncpipe.models.registry import load_model

log = logging.getLogger(__name__)


def _progress_reporter(counter_name: str) -> Callable[[int], None]:
    counter = ray.get_actor(counter_name)
    return lambda samples: counter.add.remote(samples)


def _prepare_process(threads: int) -> None:
    """Before a worker builds its models: its threads, and freed memory kept for the next batch."""
    torch.set_num_threads(threads)
    os.environ.setdefault("NUMBA_NUM_THREADS", str(threads))
    retain_freed_memory()


class ShardActor:
    """What every codec actor does: set up once (``setup``), then run shards.

    A configuration error while setting up (no such device, a model missing on this node) is kept
    and raised by :meth:`ready` and :meth:`run`, as the error itself: raised from ``__init__``, Ray
    would report a dead actor, and the distributor would retry every shard on it as a lost worker.
    """

    def __init__(self, config, threads: int, progress: str | Callable[[int], None]):
        """``progress``: what the worker reports finished samples to: the name of the job's Ray
        progress counter, or (in-process) a callable."""
        _prepare_process(threads)
        on_progress = progress if callable(progress) else _progress_reporter(progress)
        self.setup_error: NcpipeError | None = None
        self.worker = None
        try:
            self.worker = self.setup(config, threads, on_progress)
        except NcpipeError as err:
            self.setup_error = err

    def setup(self, config, threads: int, on_progress: Callable[[int], None]):
        raise NotImplementedError

    def ready(self) -> bool:
        """True once set up; the setup's configuration error otherwise."""
        if self.setup_error is not None:
            raise self.setup_error
        return True

    def run(self, task):
        self.ready()
        with job_temporaries(task.job_id):  # its temps carry its job: cleanup removes its own only
            return self.worker.run(task)

    def ping(self) -> bool:
        return True

    def close(self) -> None:
        """Stop the worker's thread pools (a Ray actor's end with its process)."""
        if self.worker is not None:
            self.worker.close()


class CompressActor(ShardActor):
    def setup(self, config: CompressConfig, threads: int, on_progress: Callable[[int], None]):
        from ncpipe.pipeline.compress import ShardCompressor

        device = resolve_device(config.device)
        model = load_model(config.model).to(device)
        codec = LearnedCodec(model, config.y_chunk_channels, config.coder_threads or threads)
        corrdiff = None
        if config.corrdiff:
            from ncpipe.diffusion.corrdiff import load_corrdiff

            corrdiff = load_corrdiff(config.corrdiff, device, codec_sha256=model.identity.sha256)
        log.info("compress actor ready: %s on %s", model.identity.short, device)
        return ShardCompressor(config, codec, config.model, threads, on_progress, corrdiff=corrdiff)


class DecompressActor(ShardActor):
    def setup(self, config: DecompressConfig, threads: int, on_progress: Callable[[int], None]):
        from ncpipe.pipeline.decompress import ShardDecompressor

        return ShardDecompressor(config, resolve_device(config.device), threads, on_progress)


class RecompressActor(ShardActor):
    """Holds the target model, and decodes old bitstreams with the models they name."""

    def setup(self, config: RecompressConfig, threads: int, on_progress: Callable[[int], None]):
        from ncpipe.codec_cache import CodecCache
        from ncpipe.pipeline.compress import ShardCompressor
        from ncpipe.pipeline.recompress import PreviousGeneration

        device = resolve_device(config.device)
        codec = LearnedCodec(load_model(config.model).to(device), config.y_chunk_channels,
                             config.coder_threads or threads)
        source = PreviousGeneration(CodecCache(device, threads, config.decode_models), config.max_pixels)
        return ShardCompressor(config.compress_config(), codec, config.model, threads, on_progress, source=source)
