"""Where a job's outputs live: the one place output names are made.

A compressed archive::

    <archive>/CURRENT                       name of the current generation (written last)
    <archive>/_LOCK                         while a job writes: its writer lock (ncpipe.pipeline.writer_lock)
    <archive>/<generation>/job.json         the configuration that made it
    <archive>/<generation>/shards/<s>.tar   bitstreams + carried members, per input shard
    <archive>/<generation>/manifest/<s>.parquet
    <archive>/<generation>/_commits/<s>.json   commit marker: written after the two above
    <archive>/<generation>/summary.json     job summary, when every shard is committed

Generations (``g0000``, ``g0001``, ...) let a recompression write a complete new archive
beside the old one and switch ``CURRENT`` atomically. Names derive from the input
shard's file name; two inputs with the same name get a short hash of their URL.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import re
from collections import Counter
from dataclasses import dataclass

from ncpipe.io.storage import exists, list_files, read_bytes, remove, remove_tree, write_bytes_atomic
from ncpipe.io.urls import join_url, redact, shard_stem

CURRENT_FILE = "CURRENT"
LOCK_FILE = "_LOCK"
BITSTREAM_EXTENSION = "ncb"  # a coded image's member in a bitstream shard: <key>.ncb
FIRST_GENERATION = "g0000"
JOB_FILE = "job.json"
_GENERATION_NAME = re.compile(r"^g\d{4,}$")


def generation_name(number: int) -> str:
    return f"g{number:04d}"


def takeover_marker(lock_url: str, stale_job_id: str) -> str:
    """Created exclusively by the one job that replaces the stale lock of ``stale_job_id``."""
    return f"{lock_url}.takeover-{stale_job_id}"


def output_stems(input_urls: list[str]) -> dict[str, str]:
    """Input URL -> output stem, unique and deterministic."""
    counts = Counter(shard_stem(url) for url in input_urls)
    return {
        url: shard_stem(url) if counts[shard_stem(url)] == 1
        else f"{shard_stem(url)}-{hashlib.sha256(url.encode()).hexdigest()[:8]}"
        for url in input_urls
    }


def manifest_part_of(shard_url: str) -> str | None:
    """The manifest part beside a generation's bitstream shard (``.../shards/<s>.tar`` ->
    ``.../manifest/<s>.parquet``); None for a shard outside an archive's layout."""
    folder, name = posixpath.split(shard_url.rstrip("/"))
    if posixpath.basename(folder) != "shards":
        return None
    return GenerationLayout(posixpath.dirname(folder)).manifest_part(shard_stem(name))


@dataclass(frozen=True)
class GenerationLayout:
    root: str  # the generation directory URL

    def shard(self, stem: str) -> str:
        return join_url(self.root, "shards", f"{stem}.tar")

    def manifest_part(self, stem: str) -> str:
        return join_url(self.root, "manifest", f"{stem}.parquet")

    def commit_marker(self, stem: str) -> str:
        return join_url(self.root, "_commits", f"{stem}.json")

    @property
    def manifest_dir(self) -> str:
        return join_url(self.root, "manifest")

    @property
    def shards_dir(self) -> str:
        return join_url(self.root, "shards")

    @property
    def commits_dir(self) -> str:
        return join_url(self.root, "_commits")

    @property
    def job_file(self) -> str:
        return join_url(self.root, JOB_FILE)

    @property
    def summary_file(self) -> str:
        return join_url(self.root, "summary.json")


@dataclass(frozen=True)
class ArchiveLayout:
    root: str

    def generation(self, name: str) -> GenerationLayout:
        return GenerationLayout(join_url(self.root, name))

    @property
    def current_file(self) -> str:
        return join_url(self.root, CURRENT_FILE)

    def current_generation(self) -> str | None:
        if not exists(self.current_file):
            return None
        return read_bytes(self.current_file).decode().strip()

    @property
    def lock_file(self) -> str:
        return join_url(self.root, LOCK_FILE)

    def set_current(self, name: str) -> None:
        """Switch readers to generation ``name`` in one atomic write."""
        write_bytes_atomic(self.current_file, f"{name}\n".encode())

    def generation_names(self) -> list[str]:
        """Every generation started in this archive (each has a ``job.json``), in order."""
        parents = {posixpath.basename(posixpath.dirname(url)) for url in list_files(self.root, suffix=JOB_FILE)}
        return sorted(name for name in parents if _GENERATION_NAME.match(name))

    def remove_generations(self, names: list[str]) -> None:
        """Delete generations, ``CURRENT`` first: a reader meanwhile finds no archive, never a partial one."""
        if names:
            remove(self.current_file)
        for name in names:
            remove_tree(self.generation(name).root)


@dataclass(frozen=True)
class RestoreLayout:
    """A decompress job's output: restored shards (or directories), manifest, markers."""

    root: str

    def output(self, stem: str, to: str) -> str:
        return join_url(self.root, f"{stem}.tar" if to == "shards" else stem)

    def manifest_part(self, stem: str) -> str:
        return join_url(self.root, "_restore_manifest", f"{stem}.parquet")

    def commit_marker(self, stem: str) -> str:
        return join_url(self.root, "_commits", f"{stem}.json")

    @property
    def manifest_dir(self) -> str:
        return join_url(self.root, "_restore_manifest")

    @property
    def lock_file(self) -> str:
        return join_url(self.root, LOCK_FILE)

    @property
    def commits_dir(self) -> str:
        return join_url(self.root, "_commits")


def write_commit_marker(url: str, input_url: str, fingerprint: str, job_id: str, **accounting) -> None:
    """A shard's commit marker, written after its outputs: the shard counts as done once it exists."""
    marker = {"input_url": redact(input_url), "fingerprint": fingerprint, "job_id": job_id, **accounting}
    write_bytes_atomic(url, json.dumps(marker, indent=2).encode())


def read_commit_marker(url: str) -> dict:
    return json.loads(read_bytes(url))


def is_committed(marker_url: str, input_url: str, fingerprint: str) -> bool:
    """A shard is done when its commit marker exists and records this configuration."""
    if not exists(marker_url):
        return False
    marker = read_commit_marker(marker_url)
    return marker.get("fingerprint") == fingerprint and marker.get("input_url") == redact(input_url)


def find_generation(url: str) -> GenerationLayout | None:
    """The generation a reader of ``url`` means: an archive root's current one (through ``CURRENT``),
    or ``url`` itself when it is a generation directory; None when it is neither."""
    archive = ArchiveLayout(url)
    current = archive.current_generation()
    for generation in ([archive.generation(current)] if current else []) + [GenerationLayout(url)]:
        if exists(generation.job_file):
            return generation
    return None
