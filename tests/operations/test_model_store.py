"""Models from a store given by URL: fetched once per node into a cache, SHA-256 verified, reaching Ray
workers through their runtime env alone, and left out of what `ncpipe submit` uploads."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import fsspec
import pytest
import ray

from ncpipe.models.checkpoint import CheckpointError, file_sha256, model_digest, read_checkpoint
from ncpipe.models.registry import find_by_sha256, list_models, load_model, resolve_model
from ncpipe.models.store import CACHE_ENV, STORE_ENV, ModelStoreError, model_runtime_env
from ncpipe.operations.submission import plan_submission


def _publish(folder: Path, store: str, name: str) -> None:
    fs = fsspec.filesystem("s3")
    for path in folder.iterdir():
        fs.put_file(str(path), f"{store}/{name}/{path.name}")


@pytest.fixture
def model_folder(tmp_path, tiny_model_path) -> Path:
    """A registry folder of the tiny model: model.pt and a card recording both SHA-256s."""
    folder = tmp_path / "models" / "tiny-store"
    folder.mkdir(parents=True)
    shutil.copy(tiny_model_path, folder / "model.pt")
    card = {"arch": "mbt2018-mean", "sha256": model_digest(read_checkpoint(tiny_model_path)),
            "file_sha256": file_sha256(tiny_model_path)}
    (folder / "card.json").write_text(json.dumps(card))
    return folder


@pytest.fixture
def store(s3_bucket, tmp_path, monkeypatch) -> str:
    url = f"{s3_bucket}/models"
    monkeypatch.setenv(STORE_ENV, url)
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    return url


def test_a_model_resolves_from_the_store_once_per_node(model_folder, store, tmp_path):
    _publish(model_folder, store, "tiny-store")
    sha = json.loads((model_folder / "card.json").read_text())["sha256"]
    ref = resolve_model("tiny-store")
    assert ref.from_store and ref.checkpoint.is_file() and (tmp_path / "cache") in ref.checkpoint.parents
    assert load_model("tiny-store").identity.sha256 == sha
    assert "tiny-store" in [r.name for r in list_models()] and find_by_sha256(sha).name == "tiny-store"
    fsspec.filesystem("s3").pipe(f"{store}/tiny-store/model.pt", b"not downloaded again")
    assert resolve_model("tiny-store").checkpoint == ref.checkpoint  # the node's cached copy, not a new download
    assert load_model("tiny-store").identity.sha256 == sha


def test_a_damaged_checkpoint_in_the_store_is_refused_and_not_cached(model_folder, store, tmp_path):
    (model_folder / "model.pt").write_bytes((model_folder / "model.pt").read_bytes()[:-10] + b"0123456789")
    _publish(model_folder, store, "tiny-store")
    with pytest.raises(ModelStoreError, match="has SHA-256 .* but its card records"):
        resolve_model("tiny-store")
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]


def test_a_missing_model_names_where_models_come_from(store):
    with pytest.raises(CheckpointError, match=f"NCPIPE_MODEL_DIRS, or publish it to the model store {STORE_ENV}="):
        resolve_model("no-such-model")


def test_an_unreachable_store_is_one_line_naming_it(monkeypatch, tmp_path):
    monkeypatch.setenv(STORE_ENV, "s3://ncpipe-store/models")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    fsspec.filesystem("s3").clear_instance_cache()
    with pytest.raises(ModelStoreError, match="cannot read the model store s3://ncpipe-store/models"):
        resolve_model("anything")
    fsspec.filesystem("s3").clear_instance_cache()


@ray.remote(num_cpus=0)
def _resolve_on_a_worker(name: str) -> tuple[str, str]:
    model = load_model(name)
    return str(resolve_model(name).checkpoint), model.identity.sha256


def test_a_worker_gets_the_model_from_the_store_through_its_runtime_env(model_folder, store, tmp_path,
                                                                        ray_with_s3_env):
    _publish(model_folder, store, "tiny-store")
    env = model_runtime_env()
    assert env == {"env_vars": {STORE_ENV: store}}
    worker_cache = tmp_path / "worker-cache"
    env["env_vars"][CACHE_ENV] = str(worker_cache)  # the worker's node cache (its own default is ~/.cache)
    path, sha = ray.get(_resolve_on_a_worker.options(runtime_env=env).remote("tiny-store"))
    assert Path(path).parent.parent == worker_cache
    assert sha == json.loads((model_folder / "card.json").read_text())["sha256"]


def test_submit_leaves_out_the_models_the_store_provides(model_folder, store, tmp_path):
    _publish(model_folder, store, "tiny-store")
    working = model_folder.parent.parent
    other = working / "models" / "local-only"
    other.mkdir()
    (other / "card.json").write_text(json.dumps({"sha256": "0" * 64}))
    (other / "model.pt").write_bytes(b"w" * 1000)
    (working / "jobs").mkdir()
    (working / "jobs" / "c.yaml").write_text("kind: compress\nspec: {inputs: [s3://b/x.tar], output: s3://b/a, "
                                             "model: tiny-store}\n")
    plan = plan_submission(working / "jobs" / "c.yaml", working)
    assert "models/tiny-store" in plan.runtime_env["excludes"]
    assert "models/local-only" not in plan.runtime_env["excludes"]
    assert plan.runtime_env["env_vars"] == {STORE_ENV: store}
    sizes = (working / "jobs" / "c.yaml").stat().st_size + 1000 + (other / "card.json").stat().st_size
    assert plan.upload_bytes == sizes
