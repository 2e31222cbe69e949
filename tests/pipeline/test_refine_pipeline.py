"""`ncpipe decompress --refiner`: the NC-Diffusion refiner in the restore pipeline, through the CLI."""

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ncpipe.cli import main
from ncpipe.config import CompressConfig
from ncpipe.manifest import RESTORE_SCHEMA, read_manifest
from ncpipe.pipeline.jobs import run_compress
from ncpipe.train.refiner_trainer import RefinerTrainConfig, train_refiner
from tests.factories import BSDS, encoded, kodak_pixels, train_tiny_codec
from tests.helpers import tar_bytes

TINY_REFINER = dict(base_channels=8, channel_mults=(1, 2), time_embed_dim=32, crop=32, batch_size=2, lr=1e-3,
                    warmup_steps=1, log_every=1, device="cpu", threads=1, steps=4, checkpoint_every=4)


def _refiner(codec: Path, run_dir: Path) -> Path:
    data = tuple(str(p) for p in sorted((BSDS / "val").glob("*.jpg"))[:2])
    return train_refiner(RefinerTrainConfig(codecs=(str(codec),), data=data, run_dir=str(run_dir), **TINY_REFINER))


def _pngs(tar_path: Path) -> dict[str, bytes]:
    with tarfile.open(tar_path) as archive:
        return {m.name: archive.extractfile(m).read() for m in archive.getmembers() if m.name.endswith(".png")}


@pytest.fixture(scope="module")
def archive(tmp_path_factory, tiny_model_path):
    root = tmp_path_factory.mktemp("refine")
    members = [(f"r{i}.png", encoded(kodak_pixels(20 + i, (64, 80)))) for i in range(3)]
    (root / "in.tar").write_bytes(tar_bytes(members))
    summary = run_compress(CompressConfig(inputs=(str(root / "in.tar"),), output=str(root / "archive"),
                                          model=str(tiny_model_path)))
    assert summary.complete
    return root


def _restore(archive: Path, out: Path, model: Path, *extra: str) -> int:
    return main(["decompress", str(archive / "archive"), "-o", str(out), "--model", str(model), *extra])


def test_decompress_with_the_refiner_is_recorded_and_deterministic(archive, tiny_model_path):
    refiner = _refiner(tiny_model_path, archive / "refiner-run")
    assert _restore(archive, archive / "plain", tiny_model_path) == 0
    options = ["--refiner", str(refiner), "--steps", "2", "--guidance", "0.5"]
    assert _restore(archive, archive / "refined", tiny_model_path, *options) == 0
    assert _restore(archive, archive / "again", tiny_model_path, *options) == 0
    plain, refined, again = (_pngs(archive / d / "in.tar") for d in ("plain", "refined", "again"))
    assert refined == again  # a restore is reproducible from the bitstream alone
    assert set(refined) == set(plain) and any(refined[k] != plain[k] for k in plain)
    for name in refined:
        assert Image.open(io.BytesIO(refined[name])).size == (80, 64)
    rows = read_manifest(str(archive / "refined" / "_restore_manifest"), RESTORE_SCHEMA).to_pylist()
    assert len(rows) == 3 and all(r["status"] == "ok" for r in rows)
    assert all(r["refine_steps"] == 2 and r["guidance"] == 0.5 and len(r["refiner_sha256"]) == 64 for r in rows)


def test_a_refiner_for_another_codec_leaves_images_unrefined_and_says_so(archive, tiny_model_path, tmp_path):
    other_codec = train_tiny_codec(tmp_path / "other", steps=1)
    refiner = _refiner(other_codec, tmp_path / "other-refiner")
    assert _restore(archive, tmp_path / "r", tiny_model_path, "--refiner", str(refiner), "--allow-errors") == 0
    rows = read_manifest(str(tmp_path / "r" / "_restore_manifest"), RESTORE_SCHEMA).to_pylist()
    assert all(r["status"] == "error" and r["error"].startswith("not refined") for r in rows)
    assert all(r["refiner_sha256"] is None for r in rows)
    restored = _pngs(tmp_path / "r" / "in.tar")
    assert len(restored) == 3 and all(np.asarray(Image.open(io.BytesIO(v))).shape == (64, 80, 3) for v in restored.values())
