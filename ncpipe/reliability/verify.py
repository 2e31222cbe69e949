"""Verifying a compressed archive: every bitstream decodes, every manifest row has its member.

::

    archive ─CURRENT─► generation ─┬─ listing: shards/, manifest/, _commits/ agree; no stray temps
                                   ├─ per shard: commit marker ↔ manifest part ↔ output tar members
                                   │     each carried member: its SHA-256 against carried_sha256
                                   │     each <key>.ncb: header, every chunk's CRC32, rANS decode of
                                   │     every chunk (end-state checks), optionally synthesis (--full)
                                   └─ across shards: (source_url, sample_index) once each; summary.json

Verification runs in-process (no Ray): it writes nothing, so it needs no commit protocol, and
it must not depend on the machinery it checks (actors, retries). Its cost is entropy decoding,
which runs GIL-free (numba rANS, torch float64 h_s) on a thread pool. Every finding is a
:class:`Problem` naming the shard, and for a bitstream the sample key and the damaged chunk.
"""

from __future__ import annotations

import json
import os
import posixpath
import time
from collections import Counter, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import torch

from ncpipe import bitstream as fmt
from ncpipe.codec import LatentSymbols, LearnedCodec, ModelMismatchError
from ncpipe.codec_cache import CodecCache
from ncpipe.config import ConfigError
from ncpipe.device import resolve_device
from ncpipe.entropy import rans
from ncpipe.images import DEFAULT_MAX_PIXELS
from ncpipe.io.storage import exists, read_bytes
from ncpipe.io.tar_reader import ShardUnreadable, iter_samples
from ncpipe.io.urls import redact, url_to_fs
from ncpipe.manifest import (
    MANIFEST_SCHEMA,
    STATUS_OK,
    carried_accounting,
    conform,
    member_sha256,
    part_metadata,
    printable_name,
    read_part,
)
from ncpipe.pipeline.layout import (
    BITSTREAM_EXTENSION,
    ArchiveLayout,
    GenerationLayout,
    find_generation,
    read_commit_marker,
)
from ncpipe.progress import Progress

HEADER_CHUNK = "header"
EXTENSIONS_CHUNK = fmt.EXTENSIONS_PART
_IN_FLIGHT_PER_THREAD = 4  # bitstreams queued per checking thread: bounds memory on big shards
_TRUNCATED_TAR = "truncated or corrupt tar"  # how ncpipe.io.tar_reader reports a broken archive


@dataclass(frozen=True)
class Problem:
    """One finding. ``where`` is a shard stem (or ``archive``); ``key``/``chunk`` when they apply."""

    where: str
    message: str
    key: str | None = None
    chunk: str | None = None

    def text(self) -> str:
        parts = [self.where]
        if self.key is not None:
            parts.append(f"key {self.key!r}")
        if self.chunk is not None:
            parts.append(self.chunk)
        return f"{': '.join(parts)}: {self.message}"


@dataclass
class ShardResult:
    stem: str
    rows: int = 0
    bitstreams: int = 0  # .ncb members checked
    bitstreams_ok: int = 0
    digests_checked: int = 0  # carried members compared with their manifest SHA-256
    undigested: int = 0  # carried members of rows written before digests were recorded
    problems: list[Problem] = field(default_factory=list)


@dataclass(frozen=True)
class VerifyReport:
    archive: str
    generation: str
    model_sha256: str | None
    full_decode: bool
    shards: int
    rows: int
    bitstreams: int
    bitstreams_ok: int
    problems: tuple[Problem, ...]
    seconds: float
    digests_checked: int = 0
    undigested: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    def text(self) -> str:
        checks = "parse + CRC32 + entropy decode" + (" + synthesis" if self.full_decode else "")
        lines = [
            f"archive     {self.archive} (generation {self.generation})",
            f"model       {self.model_sha256 or '?'}",
            f"shards      {self.shards}, manifest rows {self.rows}",
            f"bitstreams  {self.bitstreams_ok}/{self.bitstreams} pass ({checks})",
            f"members     {self.digests_checked} carried members checked against their SHA-256"
            + (f" ({self.undigested} in rows without digests, not checked)" if self.undigested else ""),
            f"time        {self.seconds:.1f}s",
            f"result      {'OK' if self.ok else f'{len(self.problems)} problem(s)'}",
        ]
        return "\n".join(lines + [f"PROBLEM     {problem.text()}" for problem in self.problems])

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


@dataclass(frozen=True)
class VerifyOptions:
    full: bool = False  # also synthesise every image (g_s), as a restore would
    max_pixels: int = DEFAULT_MAX_PIXELS
    threads: int = max(1, os.cpu_count() or 1)


# -- bitstreams -----------------------------------------------------------------------


@dataclass(frozen=True)
class BitstreamCheck:
    """What checking one ``.ncb`` found: its header (when readable), latents, and damage by chunk."""

    header: fmt.BitstreamHeader | None
    symbols: LatentSymbols | None
    damage: tuple[tuple[str, str], ...]  # (chunk name, what is wrong)


def check_bitstream(data: bytes, codec: LearnedCodec | None, max_pixels: int = DEFAULT_MAX_PIXELS) -> BitstreamCheck:
    """Header, every chunk's CRC32, and (with a codec) the rANS decode of every chunk.

    A chunk that fails its CRC is not decoded; y chunks are decoded only when z decodes (their
    tables come from z through the exact h_s). Never raises for bad bytes."""
    try:
        walked = fmt.walk(data, max_pixels)  # the parser's own reading, on past damaged chunks
    except fmt.BitstreamError as err:
        return BitstreamCheck(None, None, ((HEADER_CHUNK, str(err)),))
    header, frames = walked.header, list(walked.chunks)
    damage = [(part.part, part.message) for part in walked.damage]
    if codec is None or len(frames) != 1 + header.num_y_chunks:
        return BitstreamCheck(header, None, tuple(damage))
    try:
        codec.check_model(header)
    except (ModelMismatchError, fmt.BitstreamError) as err:
        return BitstreamCheck(header, None, tuple(damage) + ((HEADER_CHUNK, str(err)),))
    symbols, decode_damage = _entropy_decode(frames, header, codec)
    return BitstreamCheck(header, symbols, tuple(damage + decode_damage))


def _entropy_decode(
    frames: list[tuple[str, bytes | None]], header: fmt.BitstreamHeader, codec: LearnedCodec
) -> tuple[LatentSymbols | None, list[tuple[str, str]]]:
    """rANS-decode every intact chunk; the coder's end-state checks catch what a CRC cannot."""
    (z_name, z_stream), y_frames = frames[0], frames[1:]
    if z_stream is None:
        return None, [(name, "not decoded: its tables come from the damaged hyper-latent")
                      for name, stream in y_frames if stream is not None]
    model = codec.model
    channels, height, width = header.z_shape
    z_tables = np.repeat(np.arange(channels, dtype=np.int32), height * width)
    try:
        z = rans.decode(z_stream, z_tables, model.z_tables).reshape(header.z_shape)
    except rans.EntropyCodingError as err:
        return None, [(z_name, f"rANS decode failed: {err}")]
    indexes, _ = codec.entropy_parameters(torch.from_numpy(z)[None], [header.quality])
    indexes = indexes[0].cpu().numpy()
    damage, y_parts = [], []
    for (name, stream), (start, stop) in zip(y_frames, header.y_chunk_ranges()):
        if stream is None:
            continue
        try:
            y_parts.append(rans.decode(stream, indexes[start:stop], model.y_tables))
        except rans.EntropyCodingError as err:
            damage.append((name, f"rANS decode failed: {err}"))
    if damage or len(y_parts) != header.num_y_chunks:
        return None, damage
    return LatentSymbols(z, np.concatenate(y_parts).reshape(header.y_shape)), damage


def _synthesis_problem(data: bytes, header: fmt.BitstreamHeader, codec: LearnedCodec) -> str | None:
    """The full decode a restore runs (``LearnedCodec.decode``); None if the image comes out right."""
    try:
        _, pixels = codec.decode(data)
    except (fmt.BitstreamError, ModelMismatchError) as err:
        return f"full decode failed: {err}"
    if pixels.shape != (header.height, header.width, 3):
        return f"full decode gave {pixels.shape}, header says {header.height}x{header.width}"
    return None


# -- archive layout ---------------------------------------------------------------------


def locate_generation(url: str) -> tuple[GenerationLayout, dict[str, Any], list[Problem]]:
    """An archive root (read through ``CURRENT``) or a generation directory -> (layout, job.json, problems)."""
    archive = ArchiveLayout(url)
    current = archive.current_generation()
    problems: list[Problem] = []
    generation = find_generation(url)
    if generation is None and current:
        raise ConfigError(f"{redact(url)}: CURRENT names generation {current!r}, which has no job.json")
    if generation is None:
        candidates = sorted(p for p in _relative_files(url)
                            if posixpath.basename(p) == "job.json" and p.count("/") == 1)
        if not candidates:
            raise ConfigError(f"{redact(url)} is not an ncpipe archive (no CURRENT file and no job.json)")
        generation = archive.generation(posixpath.dirname(candidates[-1]))
        problems.append(Problem("archive", f"no CURRENT file: no job over this archive completed; "
                                           f"checking {posixpath.dirname(candidates[-1])}"))
    return generation, json.loads(read_bytes(generation.job_file)), problems


def _relative_files(url: str) -> list[str]:
    """Every file below ``url`` as a path relative to it, temps included (unlike ``list_files``)."""
    fs, root = url_to_fs(url)
    fs.invalidate_cache(root)
    try:
        found = fs.find(root)
    except FileNotFoundError:
        return []
    root = root.rstrip("/")
    return sorted(path[len(root) + 1 :] for path in found if path.startswith(root + "/"))


_LAYOUT_DIRS = {"shards": ".tar", "manifest": ".parquet", "_commits": ".json"}
_LAYOUT_FILES = {"job.json", "summary.json"}


def _stems_and_strays(generation: GenerationLayout) -> tuple[dict[str, set[str]], list[Problem]]:
    """Stems present in each layout directory, and a problem for every file that does not belong."""
    stems: dict[str, set[str]] = {directory: set() for directory in _LAYOUT_DIRS}
    problems = []
    for path in _relative_files(generation.root):
        directory, _, name = path.partition("/")
        if ".partial" in posixpath.basename(path):
            problems.append(Problem("archive", f"stray temporary file {path} (left by a killed or failed writer)"))
        elif path in _LAYOUT_FILES:
            continue
        elif directory in _LAYOUT_DIRS and "/" not in name and name.endswith(_LAYOUT_DIRS[directory]):
            stems[directory].add(name[: -len(_LAYOUT_DIRS[directory])])
        else:
            problems.append(Problem("archive", f"unexpected file {path}"))
    return stems, problems


# -- one shard --------------------------------------------------------------------------


class _ShardVerifier:
    """Reconciles one shard's commit marker, manifest part and output tar, and checks its bitstreams."""

    def __init__(self, stem: str, generation: GenerationLayout, job: dict[str, Any],
                 models: CodecCache, options: VerifyOptions, pool: ThreadPoolExecutor):
        self.stem, self.generation, self.job = stem, generation, job
        self.models, self.options, self.pool = models, options, pool
        self.result = ShardResult(stem)

    def problem(self, message: str, key: str | None = None, chunk: str | None = None) -> None:
        self.result.problems.append(Problem(self.stem, message, key, chunk))

    def run(self) -> tuple[ShardResult, list[dict[str, Any]]]:
        rows = self._manifest_rows()
        self.result.rows = len(rows)
        self._check_marker(rows)
        self._check_rows(rows)
        self._check_members(rows)
        return self.result, rows

    def _manifest_rows(self) -> list[dict[str, Any]]:
        try:
            table = read_part(self.generation.manifest_part(self.stem))
            rows = conform(table, MANIFEST_SCHEMA).to_pylist()  # a column added since the part reads as null
        except (OSError, ValueError, KeyError, pa.ArrowException) as err:
            self.problem(f"manifest part unreadable: {redact(str(err))}")
            return []
        fingerprint = part_metadata(table).get("ncpipe_fingerprint")
        if fingerprint != self.job.get("fingerprint"):
            self.problem(f"manifest part fingerprint {fingerprint} is not the generation's "
                         f"{self.job.get('fingerprint')}")
        return rows

    def _check_marker(self, rows: list[dict[str, Any]]) -> None:
        try:
            marker = read_commit_marker(self.generation.commit_marker(self.stem))
        except (OSError, ValueError) as err:
            self.problem(f"commit marker unreadable: {redact(str(err))}")
            return
        ok = sum(row["status"] == STATUS_OK for row in rows)
        expected = {"samples": len(rows), "ok": ok, "errors": len(rows) - ok,
                    "fingerprint": self.job.get("fingerprint"), "stem": self.stem}
        for name, value in expected.items():
            if marker.get(name) != value:
                self.problem(f"commit marker says {name}={marker.get(name)!r}, manifest/job say {value!r}")
        if "carried_sha256" in marker:  # markers written before digests have no such accounting
            for name, value in carried_accounting(row["carried_sha256"] for row in rows).items():
                if marker.get(name) != value:
                    self.problem(f"commit marker says {name}={marker.get(name)!r}, manifest digests give {value!r}")
        sources = {row["source_url"] for row in rows}
        if self.job.get("kind") == "compress" and rows and sources != {marker.get("input_url")}:
            self.problem(f"manifest rows name source(s) {sorted(sources)}, commit marker {marker.get('input_url')!r}")

    def _check_rows(self, rows: list[dict[str, Any]]) -> None:
        indexes = sorted(row["sample_index"] for row in rows)
        if indexes != list(range(len(rows))) and indexes != [-1]:
            missing = sorted(set(range(max(indexes, default=-1) + 1)) - set(indexes))
            repeated = sorted(i for i, n in Counter(indexes).items() if n > 1)
            self.problem(f"sample indexes are not 0..{len(rows) - 1}: missing {missing[:10]}, repeated {repeated[:10]}")
        for row in rows:
            if row["output_shard"] is not None and posixpath.basename(row["output_shard"]) != f"{self.stem}.tar":
                self.problem(f"row names output shard {row['output_shard']}", key=row["key"])
            if row["status"] == STATUS_OK and not (row["width"] and row["height"] and row["model_sha256"]
                                                   and row["compressed_bytes"] is not None):
                self.problem("ok row without size, model or compressed_bytes", key=row["key"])

    def _expected_members(self, rows: list[dict[str, Any]]) -> tuple[Counter, dict[str, str], dict[str, dict]]:
        """Member names (as the manifest prints them) the tar must hold, their keys, and ok rows by .ncb name."""
        expected: Counter = Counter()
        key_of: dict[str, str] = {}
        coded: dict[str, dict[str, Any]] = {}
        for row in rows:
            names = list(row["carried_members"] or [])
            if row["status"] == STATUS_OK:
                ncb = f"{row['key']}.{BITSTREAM_EXTENSION}"
                if ncb in coded:
                    self.problem(f"two ok rows for bitstream member {ncb}", key=row["key"])
                coded[ncb] = row
                names.append(ncb)
            for name in names:
                expected[name] += 1
                key_of.setdefault(name, row["key"])
        return expected, key_of, coded

    def _expected_digests(self, rows: list[dict[str, Any]]) -> Counter:
        """(member name, SHA-256) pairs the manifest records for carried members."""
        digests: Counter = Counter()
        for row in rows:
            names, recorded = row["carried_members"] or [], row["carried_sha256"]
            if recorded is None:
                self.result.undigested += len(names)
            elif len(recorded) != len(names):
                self.problem(f"row lists {len(names)} carried members but {len(recorded)} digests", key=row["key"])
            else:
                digests.update(zip(names, recorded))
        return digests

    def _check_members(self, rows: list[dict[str, Any]]) -> None:
        expected, key_of, coded = self._expected_members(rows)
        digests = self._expected_digests(rows)
        digested_names = {name for name, _ in digests}
        actual: Counter = Counter()
        found_digests: Counter = Counter()
        checked: set[str] = set()
        window: deque[tuple[dict[str, Any], bytes, Future]] = deque()
        limit = _IN_FLIGHT_PER_THREAD * self.options.threads
        try:
            for name, data in self._tar_members():
                actual[name] += 1
                if name in digested_names:
                    found_digests[(name, member_sha256(data))] += 1
                row = coded.get(name)
                if row is not None and name not in checked:
                    checked.add(name)
                    window.append((row, data, self.pool.submit(self._check_one, data)))
                    while len(window) > limit:
                        self._record(*window.popleft())
        finally:
            while window:
                self._record(*window.popleft())
        for name, count in (expected - actual).items():
            self.problem(f"member {name} is in the manifest but missing from the shard"
                         + (f" ({count} copies missing)" if count > 1 else ""), key=key_of[name])
        for name, count in (actual - expected).items():
            self.problem(f"member {name} is in the shard but not in the manifest"
                         + (f" ({count} extra copies)" if count > 1 else ""), key=_key_of_member(name))
        self.result.digests_checked += sum(found_digests.values())
        for name, _ in found_digests - digests:
            self.problem(f"member {name}: its SHA-256 is not the manifest's (changed since it was written)",
                         key=key_of[name])

    def _tar_members(self) -> Iterator[tuple[str, bytes]]:
        url = self.generation.shard(self.stem)
        try:
            for sample in iter_samples(url):
                for member in sample.members:
                    yield printable_name(member.name), member.data
                if sample.error and _TRUNCATED_TAR in sample.error:
                    self.problem(f"output shard is damaged: {sample.error}")
        except (ShardUnreadable, OSError) as err:
            self.problem(f"output shard unreadable: {redact(str(err))}")

    def _check_one(self, data: bytes) -> tuple[BitstreamCheck, str | None]:
        try:
            codec = self.models.lookup(fmt.parse_header(data, self.options.max_pixels).model_sha256)
        except fmt.BitstreamError:
            codec = None  # check_bitstream reports the header
        check = check_bitstream(data, codec, self.options.max_pixels)
        synthesis = None
        if self.options.full and codec is not None and check.symbols is not None:
            synthesis = _synthesis_problem(data, check.header, codec)
        return check, synthesis

    def _record(self, row: dict[str, Any], data: bytes, future: Future) -> None:
        check, synthesis = future.result()
        key = row["key"]
        self.result.bitstreams += 1
        before = len(self.result.problems)
        if row["compressed_bytes"] != len(data):
            self.problem(f"member is {len(data)} bytes, manifest compressed_bytes says {row['compressed_bytes']}",
                         key=key)
        for chunk, message in check.damage:
            self.problem(message, key=key, chunk=chunk)
        header = check.header
        if header is not None:
            found = (header.width, header.height, header.source_mode, header.model_sha256)
            wanted = (row["width"], row["height"], row["source_mode"], row["model_sha256"])
            if found != wanted:
                self.problem(f"header (width, height, mode, model) {found} does not match the manifest's {wanted}",
                             key=key, chunk=HEADER_CHUNK)
        if synthesis is not None:
            self.problem(synthesis, key=key)
        if len(self.result.problems) == before and check.symbols is not None:
            self.result.bitstreams_ok += 1


def _key_of_member(name: str) -> str:
    directory, base = posixpath.split(name)
    stem = base.partition(".")[0]
    return posixpath.join(directory, stem) if directory else stem


# -- the archive ------------------------------------------------------------------------


def verify_archive(url: str, model: str | None = None, device: str = "cpu",
                   options: VerifyOptions = VerifyOptions()) -> VerifyReport:
    """Check a whole archive (its current generation); see the module docstring for what is checked."""
    started = time.perf_counter()
    generation, job, problems = locate_generation(url)
    stems, strays = _stems_and_strays(generation)
    problems += strays
    models = CodecCache(resolve_device(device), options.threads, (model,) if model else ())
    everything = set().union(*stems.values())
    for stem in sorted(everything - stems["_commits"]):
        present = ", ".join(f"{d}/" for d in _LAYOUT_DIRS if stem in stems[d])
        problems.append(Problem(stem, f"not committed (no commit marker; output in {present}): "
                                      "left by an unfinished or failed run, which a re-run redoes"))
    results, all_rows = [], []
    try:
        with (ThreadPoolExecutor(options.threads, thread_name_prefix="verify") as pool,
              Progress(len(stems["_commits"]), unit="shards", label="verify") as progress):
            for stem in sorted(stems["_commits"]):
                result, rows = _ShardVerifier(stem, generation, job, models, options, pool).run()
                results.append(result)
                all_rows += rows
                progress.update(progress.done + 1, images=len(all_rows))
    finally:
        models.close()
    problems += [Problem("archive", f"{reason}: its bitstreams were parsed and CRC-checked, not entropy-decoded")
                 for reason in models.unavailable.values()]
    problems += [p for result in results for p in result.problems]
    problems += _archive_problems(generation, job, all_rows, len(stems["_commits"]))
    return VerifyReport(
        archive=redact(url), generation=posixpath.basename(generation.root.rstrip("/")),
        model_sha256=job.get("model", {}).get("sha256"), full_decode=options.full,
        shards=len(everything), rows=len(all_rows),
        bitstreams=sum(r.bitstreams for r in results), bitstreams_ok=sum(r.bitstreams_ok for r in results),
        problems=tuple(problems), seconds=time.perf_counter() - started,
        digests_checked=sum(r.digests_checked for r in results), undigested=sum(r.undigested for r in results),
    )


def _archive_problems(generation: GenerationLayout, job: dict[str, Any], rows: list[dict[str, Any]],
                      committed: int) -> list[Problem]:
    """Across shards: each input sample once; a compress job's summary.json agrees with the parts."""
    problems = []
    seen = Counter((row["source_url"], row["sample_index"]) for row in rows)
    for (source, index), count in sorted(seen.items()):
        if count > 1:
            problems.append(Problem("archive", f"input sample {source} #{index} has {count} manifest rows"))
    if not exists(generation.summary_file):
        problems.append(Problem("archive", "no summary.json: the job that wrote this generation did not complete"))
        return problems
    if job.get("kind") != "compress":
        return problems  # other jobs' summaries count other things
    summary = json.loads(read_bytes(generation.summary_file))
    ok = sum(row["status"] == STATUS_OK for row in rows)
    for name, value in {"samples": len(rows), "ok": ok, "errors": len(rows) - ok, "shards": committed}.items():
        if summary.get(name) != value:
            problems.append(Problem("archive",
                                    f"summary.json says {name}={summary.get(name)!r}, the shards hold {value}"))
    return problems
