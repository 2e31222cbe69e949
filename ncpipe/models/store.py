"""A model store: registry folders at a URL, fetched once per node into a local cache.

``NCPIPE_MODEL_STORE`` names the store: a local folder, ``file://...`` or any fsspec URL
(``s3://bucket/models``, with the AWS environment the data uses). It holds registry folders
as ``models/`` does (``<name>/card.json`` and the checkpoint the card's kind names), so
publishing a model is copying its folder there. A cluster's workers set the variable (an
embedded Ray's workers inherit it; ``--address`` and ``ncpipe submit`` pass it on) and load
models by name from the store instead of from a checkout.

A checkpoint is downloaded into ``$NCPIPE_MODEL_CACHE`` (default ``~/.cache/ncpipe/models``)
under ``<name>-<sha256 prefix>/``, checked against the SHA-256 of its file that the card
records (``file_sha256``), and moved into place with one rename: actors of one node that
load it at once never read a partial file, and later loads on that node read the cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from ncpipe.errors import NcpipeError
from ncpipe.io.storage import read_bytes, write_bytes_atomic
from ncpipe.io.urls import join_url, redact, url_to_fs

STORE_ENV = "NCPIPE_MODEL_STORE"
CACHE_ENV = "NCPIPE_MODEL_CACHE"
CARD_NAME = "card.json"


class ModelStoreError(NcpipeError):
    """The model store cannot be read, or a checkpoint from it does not match its card."""


def store_url() -> str | None:
    return os.environ.get(STORE_ENV) or None


def model_runtime_env() -> dict[str, dict[str, str]] | None:
    """A Ray runtime env naming this process's model store to workers on other nodes (None: no store).
    Only the store travels: a local registry folder or cache path means nothing on another node."""
    store = store_url()
    return {"env_vars": {STORE_ENV: store}} if store else None


def provided_by_store(models_dir: Path) -> list[str]:
    """Names of the models in ``models_dir`` that the store holds identically (same SHA-256)."""
    cards = store_cards()
    provided = []
    for name, card in cards.items():
        local = models_dir / name / CARD_NAME
        if local.is_file() and json.loads(local.read_text()).get("sha256") == card.get("sha256"):
            provided.append(name)
    return provided


def cache_root() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ncpipe" / "models"
    return Path(os.environ.get(CACHE_ENV) or default)


def store_cards() -> dict[str, dict[str, Any]]:
    """Name -> card of every model in the store (empty without a store)."""
    store = store_url()
    if store is None:
        return {}
    with _store_errors(store):
        fs, root = url_to_fs(store)
        paths = sorted(fs.glob(f"{root.rstrip('/')}/*/{CARD_NAME}"))
        return {posixpath.basename(posixpath.dirname(p)): json.loads(fs.cat_file(p)) for p in paths}


def store_card(name: str) -> dict[str, Any] | None:
    """The card of model ``name`` in the store, or None (no store, or no such model there)."""
    store = store_url()
    if store is None or "/" in name or name in ("", ".", ".."):
        return None
    url = join_url(store, name, CARD_NAME)
    with _store_errors(store):
        fs, path = url_to_fs(url)
        return json.loads(fs.cat_file(path)) if fs.isfile(path) else None


def cached_checkpoint(name: str, card: dict[str, Any], checkpoint_name: str) -> Path:
    """Where this node keeps the store's checkpoint of ``name`` (present once fetched)."""
    return cache_root() / f"{name}-{card['sha256'][:16]}" / checkpoint_name


def fetch(name: str, card: dict[str, Any], checkpoint_name: str) -> Path:
    """The local copy of the store's checkpoint of ``name``: downloaded and verified on first use."""
    target = cached_checkpoint(name, card, checkpoint_name)
    if target.is_file():
        return target
    store = store_url()
    with _store_errors(store):
        data = read_bytes(join_url(store, name, checkpoint_name))
    expected = card.get("file_sha256")
    actual = hashlib.sha256(data).hexdigest()  # as models.checkpoint.file_sha256 digests the file
    if expected and actual != expected:
        raise ModelStoreError(
            f"{redact(join_url(store, name, checkpoint_name))} has SHA-256 {actual}, but its card records "
            f"{expected}: the store's copy is damaged or was replaced; publish the model folder again")
    write_bytes_atomic(str(target), data)  # loaders on this node see the whole file or none
    return target


@contextmanager
def _store_errors(store: str | None) -> Iterator[None]:
    """Whatever the storage client raises while reading the store, as one line naming the store."""
    try:
        yield
    except NcpipeError:
        raise
    except Exception as err:  # connection, credentials, permission, missing object, bad JSON
        raise ModelStoreError(redact(
            f"cannot read the model store {store} ({STORE_ENV}): {type(err).__name__}: {err}; "
            "check the URL and the storage credentials/endpoint")) from None
