"""What a restore reads: a generation's shards as its commit markers say, and what each should hold.

A listing of ``shards/`` is not the archive: a committed shard may have been deleted, and a
shard without a commit marker was never finished. The commit markers say which shards exist;
each shard's manifest part says which samples it holds, in the order they were written, with
the SHA-256 of every carried member. A restore matches the tar's samples to those rows, so a
sample missing from the tar (a deleted shard, damage) still gets an error row, a member whose
bytes changed is refused, and an intact sample before damage in the tar is restored.
"""

from __future__ import annotations

import dataclasses
import posixpath
from collections import deque
from dataclasses import dataclass

import pyarrow as pa

from ncpipe.io.storage import list_files
from ncpipe.io.tar_reader import Sample
from ncpipe.manifest import MANIFEST_SCHEMA, STATUS_OK, conform, member_sha256, printable_name, read_part
from ncpipe.pipeline.layout import BITSTREAM_EXTENSION, GenerationLayout


@dataclass(frozen=True)
class ArchiveShard:
    """A bitstream shard to restore, and whether its commit marker exists (shards given by URL count
    as committed)."""

    url: str
    committed: bool = True


def archive_shards(generation: GenerationLayout) -> list[ArchiveShard]:
    """Every shard a generation holds or started: committed ones (by commit marker, whether or not
    their tar is still there) and uncommitted ones (outputs without a marker), by stem."""
    committed = _stems(generation.commits_dir, ".json")
    started = _stems(generation.shards_dir, ".tar") | _stems(generation.manifest_dir, ".parquet")
    return [ArchiveShard(generation.shard(stem), stem in committed) for stem in sorted(committed | started)]


def _stems(directory_url: str, suffix: str) -> set[str]:
    return {posixpath.basename(url)[: -len(suffix)] for url in list_files(directory_url, suffix=suffix)}


@dataclass(frozen=True)
class ExpectedSample:
    """One manifest row of a bitstream shard: the sample and the members the tar holds for it."""

    sample_index: int
    key: str  # printable, as in the manifest
    members: tuple[str, ...]  # printable names: the carried members, and the .ncb of an ok row
    digests: tuple[tuple[str, str], ...] | None  # (carried member, SHA-256); None: a manifest without digests


@dataclass(frozen=True)
class SampleCheck:
    """A sample read from the tar, as it may be handed back, and how it compares with its manifest row."""

    sample: Sample  # members whose digest is wrong left out; clean if only damage after it was found
    expected: ExpectedSample | None  # None: the manifest does not list the sample
    problems: tuple[str, ...]


class ShardExpectations:
    """The samples a manifest part lists, matched in order to the samples read from its tar."""

    def __init__(self, rows: list[dict]):
        self.order = [_expected(row) for row in rows if row["sample_index"] >= 0]
        self.pending: dict[str, deque[ExpectedSample]] = {}
        for expected in self.order:
            self.pending.setdefault(expected.key, deque()).append(expected)
        self.last_error: str | None = None  # the error of the last sample read: damage that ended the tar

    @classmethod
    def read(cls, manifest_url: str) -> "ShardExpectations":
        """From a manifest part; raises one of :data:`MANIFEST_ERRORS` when it is unreadable."""
        return cls(conform(read_part(manifest_url), MANIFEST_SCHEMA).to_pylist())

    def check(self, sample: Sample) -> SampleCheck:
        """Match ``sample`` to the next manifest row with its key, and compare their members."""
        self.last_error = sample.error
        queue = self.pending.get(printable_name(sample.key))
        if not queue:
            return SampleCheck(sample, None, ("the sample is not in the archive manifest",))
        return _compare(sample, queue.popleft())

    def unmatched(self) -> list[ExpectedSample]:
        """Rows no sample of the tar matched, in manifest order."""
        left = {id(e) for queue in self.pending.values() for e in queue}
        return [e for e in self.order if id(e) in left]

    def missing_reason(self) -> str:
        """Why an unmatched row's sample is not there."""
        damage = f": the shard ends in damage ({self.last_error})" if self.last_error else ""
        return f"the sample is in the archive manifest but not in the shard{damage}"


def _expected(row: dict) -> ExpectedSample:
    members = list(row["carried_members"] or [])
    if row["status"] == STATUS_OK:
        members.append(f"{row['key']}.{BITSTREAM_EXTENSION}")
    digests = row.get("carried_sha256")
    pairs = None if digests is None else tuple(zip(row["carried_members"] or [], digests))
    return ExpectedSample(row["sample_index"], row["key"], tuple(members), pairs)


def _compare(sample: Sample, expected: ExpectedSample) -> SampleCheck:
    names = [printable_name(member.name) for member in sample.members]
    missing = [name for name in expected.members if name not in names]
    problems = [f"member {name} is missing from the shard" for name in missing]
    problems += [f"member {name} is not in the archive manifest" for name in names if name not in expected.members]
    wanted: dict[str, set[str]] = {}
    for name, digest in expected.digests or ():
        wanted.setdefault(name, set()).add(digest)
    kept = []
    for name, member in zip(names, sample.members):
        if name in wanted and member_sha256(member.data) not in wanted[name]:
            problems.append(f"member {name}: SHA-256 does not match the manifest (damaged in the archive); "
                            "not restored")
        else:
            kept.append(member)
    sample = dataclasses.replace(sample, members=tuple(kept))
    if sample.cut and sample.members_intact and not missing:
        # The tar broke after this sample, and the manifest shows nothing of it was lost.
        sample = dataclasses.replace(sample, error=None, cut=None)
    return SampleCheck(sample, expected, tuple(problems))


MANIFEST_ERRORS = (OSError, ValueError, KeyError, pa.ArrowException)  # what reading a damaged part raises
