"""Image files as compress input: grouped into shards on the fly, read as one-image samples.

A compress input may name image files (a folder of JPEGs, a glob, one file; local or any
fsspec URL) instead of tar shards. Consecutive image files of one folder, in sorted order,
form a shard of up to :data:`IMAGES_PER_SHARD`, named ``<folder>/images-NNNNNN`` (no such file
exists: the name identifies the group in manifests and commit markers, and gives the output
shard its stem). Each file becomes a sample whose key is its file name without the extension,
dots replaced by ``_`` (a WebDataset key ends at the first dot), and whose one member is
``<key>.<extension>`` holding the file's bytes unchanged.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from dataclasses import dataclass
from typing import Iterator

from ncpipe.io.storage import is_transient, read_bytes, redacted_error
from ncpipe.io.tar_reader import Sample, TarMember, iter_samples
from ncpipe.io.urls import is_image_name, join_url, redact

IMAGES_PER_SHARD = 1000


@dataclass(frozen=True)
class InputShard:
    """One unit of work: a tar shard (``files`` empty) or a group of image files named ``url``."""

    url: str
    files: tuple[str, ...] = ()


def input_shards(urls: list[str]) -> list[InputShard]:
    """Expanded input URLs -> shards: each tar shard alone, image files grouped per folder."""
    shards: list[InputShard] = []
    group: list[str] = []
    counters: dict[str, int] = {}

    def close_group() -> None:
        if group:
            folder = posixpath.dirname(group[0])
            number = counters.get(folder, 0)
            counters[folder] = number + 1
            shards.append(InputShard(join_url(folder, f"images-{number:06d}"), tuple(group)))
            group.clear()

    for url in urls:
        if not is_image_name(url):
            close_group()
            shards.append(InputShard(url))
            continue
        if group and (posixpath.dirname(url) != posixpath.dirname(group[0]) or len(group) == IMAGES_PER_SHARD):
            close_group()
        group.append(url)
    close_group()
    return shards


def with_grouping(fingerprint: str, shards: list[InputShard]) -> str:
    """``fingerprint`` extended by which image files form which shard, when there are image groups:
    a folder that changed between runs must not resume into shards that hold other files."""
    groups = [[shard.url, *shard.files] for shard in shards if shard.files]
    if not groups:
        return fingerprint
    return hashlib.sha256(json.dumps([fingerprint, groups]).encode()).hexdigest()[:16]


def image_key(url: str) -> str:
    """The sample key of an image file: its name without the extension, dots as ``_``."""
    stem = posixpath.splitext(posixpath.basename(url.split("?", 1)[0]))[0]
    return stem.replace(".", "_")


def iter_shard_samples(url: str, files: tuple[str, ...] = ()) -> Iterator[Sample]:
    """The samples of a tar shard (``files`` empty) or of a group of image files."""
    if not files:
        yield from iter_samples(url)
        return
    seen: set[str] = set()
    for index, file_url in enumerate(files):
        key = image_key(file_url)
        extension = posixpath.splitext(file_url)[1].lstrip(".")
        error = f"duplicate key {key!r} (an earlier file of the folder has the same name)" if key in seen else None
        seen.add(key)
        try:
            data = read_bytes(file_url)
        except Exception as err:  # a transient failure retries the shard; any other is this file's error
            if is_transient(err):
                raise redacted_error(err, f"cannot read {file_url}") from None
            yield Sample(key, (), url, index, redact(f"cannot read {file_url}: {type(err).__name__}: {err}"))
            continue
        yield Sample(key, (TarMember(f"{key}.{extension}", data),), url, index, error)
