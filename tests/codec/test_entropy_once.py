"""The exact integer h_s runs once per image: decoding, synthesis and diffusion decoders share its means,
and the encoder's (CorrDiff included) reuse what analysis derived."""

from contextlib import contextmanager

import numpy as np
import pytest
import torch

from ncpipe.codec import LatentSymbols
from ncpipe.diffusion.corrdiff import encoder_batch
from ncpipe.diffusion.refiner import decoded_batch
from ncpipe.entropy.integer_net import IntegerHyperSynthesis
from tests.factories import kodak_pixels


@contextmanager
def counting_images(monkeypatch):
    """Counts the images the integer h_s is evaluated on (its calls weighted by their batch)."""
    counted = []
    run = IntegerHyperSynthesis.__call__

    def counting(self, x_fixed):
        counted.append(int(x_fixed.shape[0]))
        return run(self, x_fixed)

    monkeypatch.setattr(IntegerHyperSynthesis, "__call__", counting)
    yield counted
    monkeypatch.undo()


def _images():
    return [kodak_pixels(n, (64, 96)) for n in (1, 2, 3)]


def test_decoding_synthesis_and_a_diffusion_decoders_input_run_h_s_once_per_image(codec, monkeypatch):
    data = codec.encode_batch(_images(), ["RGB"] * 3)
    with counting_images(monkeypatch) as counted:
        headers, symbols = zip(*(codec.decode_symbols(d) for d in data))
        x_hat = codec.synthesise(headers, symbols)
        batch = decoded_batch(codec, headers, symbols, x_hat)
    assert sum(counted) == 3
    # what the carried means give is what deriving them afresh gives
    fresh = [LatentSymbols(s.z, s.y) for s in symbols]
    with torch.inference_mode():
        assert torch.equal(batch.y_hat, codec.latents(headers, fresh))
        for got, again in zip(x_hat, codec.synthesise(headers, fresh)):
            assert torch.equal(got, again)


def test_encoding_with_reconstruction_and_corrdiffs_decoder_input_runs_h_s_once_per_image(codec, monkeypatch):
    images = _images()
    with counting_images(monkeypatch) as counted:
        analysed = codec.analyse(images, reconstruct=True)
        encoder_batch(codec, analysed, keys=["a", "b", "c"])
        for i in range(len(images)):
            codec.submit_entropy_coding(analysed, i, "RGB").result()
    assert sum(counted) == len(images)


def test_symbols_without_means_still_decode_identically(codec):
    """Callers that build symbols themselves (verify, training) get the means derived for them."""
    (data,) = codec.encode_batch(_images()[:1], ["RGB"])
    header, symbols = codec.decode_symbols(data)
    with_means = codec.synthesise([header], [symbols])[0]
    without = codec.synthesise([header], [LatentSymbols(symbols.z, symbols.y)])[0]
    assert torch.equal(with_means, without)
    assert np.array_equal(codec.decode(data)[1], (with_means * 255).round().to(torch.uint8).permute(1, 2, 0).numpy())


@pytest.fixture
def shard_of_bitstreams(tmp_path, codec, tiny_model_path):
    from ncpipe.io.tar_writer import TarShardWriter

    data = codec.encode_batch(_images(), ["RGB"] * 3)
    path = tmp_path / "in.tar"
    with open(path, "wb") as handle, TarShardWriter(handle) as writer:
        for i, bitstream in enumerate(data):
            writer.add(f"s{i}.ncb", bitstream)
    return path


def test_a_restore_worker_runs_h_s_once_per_image(shard_of_bitstreams, tiny_model_path, tmp_path, monkeypatch):
    from ncpipe.config import DecompressConfig
    from ncpipe.pipeline.decompress import RestoreTask, ShardDecompressor

    config = DecompressConfig(inputs=(str(shard_of_bitstreams),), output=str(tmp_path / "out"),
                              model=str(tiny_model_path), batch_size=2)
    worker = ShardDecompressor(config, torch.device("cpu"), 2)
    (tmp_path / "out").mkdir()
    task = RestoreTask(input_url=str(shard_of_bitstreams), stem="in", output_url=str(tmp_path / "out" / "in.tar"),
                       manifest_url=str(tmp_path / "out" / "in.parquet"), commit_url=str(tmp_path / "out" / "in.json"),
                       job_id="j", fingerprint="f")
    with counting_images(monkeypatch) as counted:
        stats = worker.run(task)
    assert stats.ok == 3 and sum(counted) == 3
