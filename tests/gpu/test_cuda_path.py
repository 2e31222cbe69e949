"""The GPU path: runs where CUDA is present (a GPU machine), skipped elsewhere.

    python -m pytest -q tests/gpu        # on the GPU machine, with the bundle's environment

Codec bitstreams encoded on the GPU decode on the CPU (and the reverse) to the same latents at
every quality of a variable-rate model; the compress job runs with a GPU actor and its archive
restores on the CPU; the refiner runs on the GPU.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ncpipe.codec import LearnedCodec
from ncpipe.models.checkpoint import load_codec_model
from tests.conftest import TINY_VBR_LAMBDAS
from tests.factories import kodak_pixels

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _codecs(path):
    return (LearnedCodec(load_codec_model(path).to("cuda"), coder_threads=4),
            LearnedCodec(load_codec_model(path), coder_threads=2))


def _images():
    return [kodak_pixels(n, (256, 384)) for n in (1, 7, 12)]


@pytest.mark.parametrize("quality", range(1, len(TINY_VBR_LAMBDAS) + 1))
def test_bitstreams_cross_gpu_and_cpu_with_identical_latents(tiny_vbr_model_path, quality):
    gpu, cpu = _codecs(tiny_vbr_model_path)
    try:
        images = _images()
        for encoder, decoder in ((gpu, cpu), (cpu, gpu)):
            batch = encoder.analyse(images, quality=quality)
            for i, data in enumerate(encoder.encode_batch(images, ["RGB"] * len(images), quality=quality)):
                header, symbols = decoder.decode_symbols(data)
                np.testing.assert_array_equal(symbols.y, batch.y_symbols[i])
                np.testing.assert_array_equal(symbols.z, batch.z_symbols[i])
                assert header.quality == quality
    finally:
        gpu.close()
        cpu.close()


def test_reconstructions_agree_across_devices(tiny_vbr_model_path):
    gpu, cpu = _codecs(tiny_vbr_model_path)
    try:
        (data,) = gpu.encode_batch([_images()[0]], ["RGB"])
        difference = np.abs(gpu.decode(data)[1].astype(int) - cpu.decode(data)[1].astype(int))
        assert difference.max() <= 1  # float synthesis: at most one 8-bit step of rounding apart
    finally:
        gpu.close()
        cpu.close()


def test_compress_job_with_a_gpu_actor_restores_on_the_cpu(tmp_path, tiny_vbr_model_path):
    from ncpipe.config import ClusterConfig, CompressConfig, DecompressConfig
    from ncpipe.manifest import read_manifest
    from ncpipe.pipeline.jobs import run_compress, run_decompress
    from tests.factories import encoded
    from tests.helpers import tar_bytes

    shard = tmp_path / "in" / "data-000000.tar"
    shard.parent.mkdir()
    shard.write_bytes(tar_bytes([(f"k{i}.png", encoded(image)) for i, image in enumerate(_images())]))
    compressed = run_compress(CompressConfig(inputs=(str(shard),), output=str(tmp_path / "out"),
                                             model=str(tiny_vbr_model_path), device="cuda", quality=3,
                                             cluster=ClusterConfig(workers=1)))
    assert compressed.complete and not compressed.errors
    restored = run_decompress(DecompressConfig(inputs=(str(tmp_path / "out"),), output=str(tmp_path / "restored"),
                                               model=str(tiny_vbr_model_path), device="cpu"))
    assert restored.complete and not restored.errors
    rows = read_manifest(str(tmp_path / "out" / "g0000" / "manifest")).to_pylist()
    assert {r["quality"] for r in rows} == {3} and all(r["status"] == "ok" for r in rows)


def test_refiner_runs_on_the_gpu(tiny_model_path):
    from ncpipe.diffusion.refiner import Refiner, RefinerConfig, TrainedCodec, decoded_batch
    from tests.diffusion.conftest import TINY

    codec = LearnedCodec(load_codec_model(tiny_model_path).to("cuda"), coder_threads=2)
    try:
        images = _images()[:2]
        data = codec.encode_batch(images, ["RGB"] * 2)
        headers, symbols = zip(*(codec.decode_symbols(d) for d in data))
        identity = codec.model.identity
        refiner = Refiner(RefinerConfig(unet=TINY), [TrainedCodec(identity.sha256, identity.arch, identity.rate)])
        refined = refiner.to("cuda").eval().refine(decoded_batch(codec, headers, symbols), steps=2)
        assert all(x.device.type == "cuda" and x.shape == (3, 256, 384) for x in refined)
    finally:
        codec.close()
