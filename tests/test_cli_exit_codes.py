"""Exit statuses a script can trust: 0 only when every sample is ok, 3 for error rows (unless
--allow-errors), 1 for a failed shard, 2 for what the user must fix (one line; a traceback with -v)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from ncpipe.cli import main
from ncpipe.cli.exit_status import EXIT_FAILED, EXIT_OK, EXIT_SAMPLE_ERRORS, EXIT_USAGE, job_exit_status
from ncpipe.config import ClusterConfig
from ncpipe.pipeline.distributor import connect
from ncpipe.pipeline.jobs import CompressSummary, RecompressSummary
from tests.factories import encoded, kodak_pixels
from tests.helpers import tar_bytes


def _compress_summary(**changes) -> CompressSummary:
    values = dict(output="out", generation="g0000", job_id="j", shards=1, shards_skipped=0, shards_failed=[],
                  samples=4, ok=4, errors=0, image_bytes=1000, bitstream_bytes=100, input_shard_bytes=2000,
                  output_shard_bytes=300, mean_bpp=0.5, mean_psnr=30.0, mean_ms_ssim=0.95, wall_seconds=1.0,
                  samples_per_second=4.0)
    return CompressSummary(**{**values, **changes})


def _recompress_summary(**changes) -> RecompressSummary:
    values = dict(archive="a", previous_generation="g0000", generation="g0001", policy="every sample", dry_run=False,
                  shards=1, selected=4, from_originals=4, transcoded=0, kept=0, bytes_before=1000, bytes_after=500,
                  mean_generation_loss_db=None, switched=True, shards_failed=[], wall_seconds=1.0)
    return RecompressSummary(**{**values, **changes})


def test_the_policy_over_job_summaries():
    assert job_exit_status(_compress_summary()) == EXIT_OK
    with_errors = _compress_summary(ok=3, errors=1)
    assert job_exit_status(with_errors) == EXIT_SAMPLE_ERRORS
    assert job_exit_status(with_errors, allow_errors=True) == EXIT_OK
    assert job_exit_status(_compress_summary(shards_failed=["a.tar"]), allow_errors=True) == EXIT_FAILED
    nothing = _compress_summary(samples=0, ok=0, image_bytes=0, bitstream_bytes=0)
    assert job_exit_status(nothing, allow_errors=True) == EXIT_SAMPLE_ERRORS
    assert "nan" not in nothing.text() and "no image coded" in nothing.text()
    assert job_exit_status(_recompress_summary(kept=1, from_originals=3)) == EXIT_SAMPLE_ERRORS
    assert job_exit_status(_recompress_summary(selected=0, generation=None, switched=False)) == EXIT_OK


def test_recompress_summary_says_more_or_less_sensibly():
    assert "(50.0% less)" in _recompress_summary().text()
    grown = _recompress_summary(bytes_before=1000, bytes_after=2971).text()
    assert "(197.1% more)" in grown and "less" not in grown
    assert "(same size)" in _recompress_summary(bytes_after=1000).text()


@pytest.fixture(scope="module")
def ray_started():
    connect(ClusterConfig())  # the session's embedded Ray (another package's fixture may have started it)


def test_decompress_of_a_file_that_is_no_tar_exits_3(tmp_path, capsys):
    stray = tmp_path / "x.ncb"
    stray.write_bytes(b"NCB\x00 not a tar")
    status = main(["decompress", str(stray), "-o", str(tmp_path / "restored")])
    out = capsys.readouterr().out
    assert status == EXIT_SAMPLE_ERRORS, out
    assert "0 restored, 1 error rows" in out
    assert main(["decompress", str(stray), "-o", str(tmp_path / "restored"), "--allow-errors"]) == EXIT_OK


def _codec_only_archive(root: Path) -> Path:
    """What `compress` without --corrdiff leaves: job.json has no corrdiff entry."""
    generation = root / "archive" / "g0000"
    (generation / "shards").mkdir(parents=True)
    (generation / "shards" / "a.tar").write_bytes(b"")
    (generation / "job.json").write_text(json.dumps({"kind": "compress", "model": {"id": "m", "sha256": "0" * 64}}))
    (root / "archive" / "CURRENT").write_text("g0000\n")
    return root / "archive"


def test_corrdiff_decoder_on_a_codec_only_archive_is_refused_before_any_work(tmp_path, caplog):
    archive = _codec_only_archive(tmp_path)
    status = main(["decompress", str(archive), "-o", str(tmp_path / "restored"), "--decoder", "corrdiff",
                   "--corrdiff", str(tmp_path / "decoder.pt")])
    assert status == EXIT_USAGE
    (record,) = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert "without CorrDiff coefficients" in record.getMessage() and "\n" not in record.getMessage()
    assert not (tmp_path / "restored").exists()


def test_user_errors_are_one_line_and_a_traceback_only_with_verbose(tmp_path, caplog):
    missing = str(tmp_path / "nothing-here")
    assert main(["compress", missing, "-o", str(tmp_path / "out")]) == EXIT_USAGE
    (record,) = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert "does not exist" in record.getMessage() and not record.exc_info
    caplog.clear()
    assert main(["-v", "compress", missing, "-o", str(tmp_path / "out")]) == EXIT_USAGE
    (record,) = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert record.exc_info and record.exc_info[0] is not None


def test_bad_arguments_exit_2():
    with pytest.raises(SystemExit) as exit_info:
        main(["compress", "--no-such-flag"])
    assert exit_info.value.code == EXIT_USAGE


@pytest.mark.parametrize("executor, says", [("in-process", "CUDA is not available here"), ("ray", "needs a GPU")])
def test_cuda_on_a_machine_without_gpus_fails_once_before_any_work(tmp_path, ray_started, caplog, executor, says):
    shard = tmp_path / "in" / "data-000000.tar"
    shard.parent.mkdir()
    shard.write_bytes(tar_bytes([("a.png", encoded(kodak_pixels(1, (32, 32))))]))
    caplog.clear()
    assert main(["compress", str(shard), "-o", str(tmp_path / "out"), "--device", "cuda",
                 "--executor", executor]) == EXIT_USAGE
    (record,) = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert says in record.getMessage() and "--device cpu" in record.getMessage()
    assert not list((tmp_path / "out").rglob("*.tar"))
