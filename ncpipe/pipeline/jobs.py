"""Job drivers: plan shards, skip committed ones, run the rest on actors, summarise.

A job is idempotent: re-running it with the same configuration skips every shard whose
commit marker records that configuration, and redoes the rest from scratch (partial
outputs of a killed run were never visible under their final names). A different
configuration over existing outputs is refused unless ``overwrite`` is set.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from ncpipe import __version__
from ncpipe.config import ClusterConfig, CompressConfig, ConfigError, DecompressConfig, RecompressConfig
from ncpipe.io.image_shards import InputShard, input_shards, with_grouping
from ncpipe.io.storage import (
    exists,
    file_sizes,
    read_bytes,
    remove_partials,
    remove_tree,
    size_of,
    write_bytes_atomic,
)
from ncpipe.io.urls import check_output_outside_inputs, expand_inputs, redact, shard_stem
from ncpipe.manifest import RESTORE_SCHEMA, STATUS_ERROR, STATUS_OK, read_manifest
from ncpipe.models.checkpoint import check_quality_level, model_digest, read_checkpoint
from ncpipe.models.registry import describe_sha256, find_by_sha256, resolve_model
from ncpipe.pipeline.committed import ArchiveShard, archive_shards
from ncpipe.pipeline.distributor import (
    PoolOutcome,
    ProgressLog,
    RayCounter,
    SampleCounter,
    connect,
    in_process_threads,
    plan_workers,
    ray_actor,
    run_in_process,
    run_on_actors,
    runs_in_process,
)
from ncpipe.pipeline.layout import (
    FIRST_GENERATION,
    ArchiveLayout,
    GenerationLayout,
    RestoreLayout,
    find_generation,
    generation_name,
    is_committed,
    manifest_part_of,
    output_stems,
)
from ncpipe.pipeline.writer_lock import lock_output, releases_locks

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CompressSummary:
    """What a compress job did; also written as ``summary.json``."""

    output: str
    generation: str
    job_id: str
    shards: int
    shards_skipped: int
    shards_failed: list[str]
    samples: int
    ok: int
    errors: int
    image_bytes: int  # source bytes of the images that were coded
    bitstream_bytes: int  # their bitstreams, container included
    input_shard_bytes: int
    output_shard_bytes: int
    mean_bpp: float | None  # pooled: 8 x all coded bytes / all coded pixels (see pooled_bpp)
    mean_psnr: float | None
    mean_ms_ssim: float | None
    wall_seconds: float
    samples_per_second: float
    model: dict[str, Any] = field(default_factory=dict)
    failure_reasons: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return not self.shards_failed

    def text(self) -> str:
        ratio = f"{self.image_bytes / self.bitstream_bytes:.1f}x" if self.bitstream_bytes else "no image coded"
        lines = [
            f"output      {self.output} (generation {self.generation}, job {self.job_id})",
            f"shards      {self.shards} ({self.shards_skipped} already committed, {len(self.shards_failed)} failed)",
            f"samples     {self.samples}: {self.ok} ok, {self.errors} error rows (see manifest 'error')",
            f"images      {_mb(self.image_bytes)} -> {_mb(self.bitstream_bytes)} bitstreams ({ratio})",
            f"shards      {_mb(self.input_shard_bytes)} in -> {_mb(self.output_shard_bytes)} out",
            f"quality     {_fmt(self.mean_bpp, '.3f')} bpp (all bits / all pixels), mean "
            f"{_fmt(self.mean_psnr, '.2f')} dB PSNR, "
            f"{_fmt(self.mean_ms_ssim, '.4f')} MS-SSIM",
            f"time        {self.wall_seconds:.1f}s wall, {self.samples_per_second:.1f} samples/s this run",
        ]
        lines += [f"FAILED      {reason}" for reason in self.failure_reasons or self.shards_failed]
        return "\n".join(lines)


def _mb(size: int) -> str:
    return f"{size / 1e6:.2f} MB"


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def new_job_id(fingerprint: str) -> str:
    return f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{fingerprint[:8]}"


def model_sha256_of(model: str) -> str:
    ref = resolve_model(model)
    return ref.expected_sha256 or model_digest(read_checkpoint(ref.checkpoint))


def coding_quality(model: str, sha256: str, quality: int | None) -> int:
    """The quality level ``model`` (model SHA-256 ``sha256``) codes at: ``quality``, or the model's default
    (0: a fixed-rate model).

    Checked here, in the driver, so a level the model lacks fails the job at once with one
    :class:`QualityError` naming the model's levels, instead of failing every shard on the actors. Read
    from the checkpoint, without building the model (the driver never imports CompressAI)."""
    checkpoint = read_checkpoint(resolve_model(model).checkpoint)
    levels = checkpoint.get("quality")
    if quality is None:
        return int(levels["default"]) if levels else 0
    check_quality_level(quality, len(levels["lambdas"]) if levels else None, f"{checkpoint['arch']}@{sha256[:12]}")
    return quality


def corrdiff_sha256_of(path: str, codec_sha256: str | None = None) -> str:
    """A CorrDiff decoder's SHA-256, checked here (before any actor starts) to load and, when
    ``codec_sha256`` is given, to have been trained for that codec."""
    from ncpipe.diffusion.corrdiff import load_corrdiff

    return load_corrdiff(path, codec_sha256=codec_sha256).identity()


def prepare_generation(generation: GenerationLayout, job: dict[str, Any], overwrite: bool) -> None:
    """Refuse to mix configurations in one generation; ``overwrite`` clears it first."""
    if exists(generation.job_file):
        previous = json.loads(read_bytes(generation.job_file))
        if previous.get("fingerprint") != job["fingerprint"]:
            if not overwrite:
                raise ConfigError(
                    f"{redact(generation.root)} already holds output made with another configuration "
                    f"(model {previous.get('model', {}).get('sha256', '?')[:12]}..., "
                    f"fingerprint {previous.get('fingerprint')}); pass --overwrite to replace it "
                    "or choose another output"
                )
            log.warning("overwriting %s", redact(generation.root))
            remove_tree(generation.root)
    elif overwrite:
        remove_tree(generation.root)
    for directory in (generation.shards_dir, generation.manifest_dir, generation.commits_dir):
        remove_partials(directory)
    write_bytes_atomic(generation.job_file, json.dumps(job, indent=2).encode())


def replace_later_generations(archive: ArchiveLayout, overwrite: bool) -> None:
    """A compress job writes the first generation, so the generations recompressions built on it
    are out of date: refused without ``overwrite`` (the job would switch readers back to the first),
    removed with it, so that nothing replaced is left behind."""
    later = [name for name in archive.generation_names() if name != FIRST_GENERATION]
    if not later:
        return
    if not overwrite:
        raise ConfigError(
            f"{redact(archive.root)} was recompressed (generations {', '.join(later)}, current "
            f"{archive.current_generation()}): pass --overwrite to replace the whole archive, "
            "or use `ncpipe recompress` to change it"
        )
    log.warning("overwriting %s: removing generations %s", redact(archive.root), ", ".join(later))
    archive.remove_generations(later)


@releases_locks
def run_compress(config: CompressConfig) -> CompressSummary:
    from ncpipe.pipeline.actors import CompressActor
    from ncpipe.pipeline.compress import ShardTask

    started = time.perf_counter()
    check_output_outside_inputs(config.inputs, config.output)
    shards = input_shards(expand_inputs(config.inputs))
    sha256 = model_sha256_of(config.model)
    if config.quality is not None:  # the model's default needs no check (nor loading the model here)
        coding_quality(config.model, sha256, config.quality)
    corrdiff_sha256 = corrdiff_sha256_of(config.corrdiff, sha256) if config.corrdiff else None
    fingerprint = with_grouping(config.coding_fingerprint(sha256, corrdiff_sha256), shards)
    job_id = new_job_id(fingerprint)
    archive = ArchiveLayout(config.output)
    lock_output(archive.lock_file, job_id, "compress")
    generation = archive.generation(FIRST_GENERATION)
    job = {
        "kind": "compress",
        "ncpipe_version": __version__,
        "job_id": job_id,
        "fingerprint": fingerprint,
        "model": {"id": config.model, "sha256": sha256},
        "config": _redacted_config(config),
    }
    if corrdiff_sha256:
        job["corrdiff"] = {"id": redact(config.corrdiff), "sha256": corrdiff_sha256}
    replace_later_generations(archive, config.overwrite)
    prepare_generation(generation, job, config.overwrite)
    stems = output_stems([shard.url for shard in shards])
    tasks = [
        ShardTask(shard.url, stems[shard.url], generation.shard(stems[shard.url]),
                  generation.manifest_part(stems[shard.url]), generation.commit_marker(stems[shard.url]), job_id,
                  fingerprint, FIRST_GENERATION, files=shard.files)
        for shard in shards
        if not is_committed(generation.commit_marker(stems[shard.url]), shard.url, fingerprint)
    ]
    log.info("%d input shards: %d to compress, %d already committed", len(shards), len(tasks), len(shards) - len(tasks))
    outcome = run_tasks(config.cluster, tasks, CompressActor, config, "compress")
    clear_partials(job_id, generation.shards_dir, generation.manifest_dir, generation.commits_dir)
    failed = [redact(f.task.input_url) for f in outcome.failures]
    summary = summarise_compress(
        generation, job, shards, len(shards) - len(tasks), failed, time.perf_counter() - started,
        sum(result.samples for result in outcome.results),
    )
    summary = dataclasses.replace(summary, failure_reasons=[f.describe() for f in outcome.failures])
    if summary.complete:
        write_bytes_atomic(generation.summary_file, json.dumps(asdict(summary), indent=2).encode())
        archive.set_current(FIRST_GENERATION)
    return summary


def clear_partials(job_id: str, *directories: str) -> None:
    """Remove this job's temps left by its writers killed during this run (a retried shard's first
    attempt, say): every task has finished, so none belongs to a live writer."""
    removed = sum(remove_partials(directory, job_id) for directory in directories)
    if removed:
        log.info("removed %d temporary file(s) left by killed writers", removed)


def run_tasks(cluster: ClusterConfig, tasks: list, actor_class, config, label: str) -> PoolOutcome:
    """Run shard tasks on ``actor_class`` actors: one in this process, or a pool of Ray actors sized
    for the connected cluster (``ClusterConfig.executor``)."""
    if not tasks:
        return PoolOutcome([], [])
    describe = lambda task: f"shard {redact(task.input_url)}"  # noqa: E731
    if runs_in_process(cluster, config.device):
        threads = in_process_threads(cluster)
        progress = ProgressLog(len(tasks), label, SampleCounter(), measure=input_bytes)
        log.info("%s: 1 worker in this process, %d thread(s)", label, threads)
        return run_in_process(tasks, lambda: actor_class(config, threads, progress.samples_done), describe, progress)
    connect(cluster)
    count, resources = plan_workers(cluster, config.device)
    counter = RayCounter(label)
    progress = ProgressLog(len(tasks), label, counter, measure=input_bytes)
    log.info("%s: %d Ray worker(s), each %g CPU / %g GPU", label, min(count, len(tasks)),
             resources.num_cpus, resources.num_gpus)

    def make_actor():
        # Ray restarts a crashed actor; the shard it held is retried by the distributor
        # (not by Ray), so retries are counted and bounded in one place.
        return ray_actor(actor_class).options(
            num_cpus=resources.num_cpus, num_gpus=resources.num_gpus, max_restarts=3, max_task_retries=0
        ).remote(config, resources.threads, counter.name)

    return run_on_actors(tasks, make_actor, count, cluster.max_shard_attempts, describe=describe, progress=progress)


def input_bytes(task) -> int:
    """Bytes a shard task reads (its tar, or its image files), for the MB/s of progress reports."""
    try:
        return sum(size_of(url) for url in getattr(task, "files", ()) or (task.input_url,))
    except OSError:  # gone since it ran: the report only loses a figure
        return 0


def summarise_compress(
    generation: GenerationLayout,
    job: dict[str, Any],
    inputs: list[InputShard],
    skipped: int,
    failed: list[str],
    wall_seconds: float,
    samples_this_run: int,
) -> CompressSummary:
    """Summarise from the committed manifest parts, so resumed shards count too."""
    table = read_manifest(generation.manifest_dir)
    ok = table.filter(pc.equal(table["status"], STATUS_OK))
    return CompressSummary(
        output=redact(generation.root),
        generation=generation.root.rstrip("/").rsplit("/", 1)[-1],
        job_id=job["job_id"],
        shards=len(inputs),
        shards_skipped=skipped,
        shards_failed=failed,
        samples=table.num_rows,
        ok=ok.num_rows,
        errors=table.num_rows - ok.num_rows,
        image_bytes=_sum(ok["source_bytes"]),
        bitstream_bytes=_sum(ok["compressed_bytes"]),
        input_shard_bytes=sum(size_of(url) for shard in inputs for url in shard.files or (shard.url,)),
        output_shard_bytes=sum(file_sizes(generation.shards_dir, suffix=".tar").values()),
        mean_bpp=pooled_bpp(ok),
        mean_psnr=_mean(ok["psnr"]),
        mean_ms_ssim=_mean(ok["ms_ssim"]),
        wall_seconds=wall_seconds,
        samples_per_second=samples_this_run / wall_seconds if wall_seconds > 0 else 0.0,
        model=job["model"],
    )


def _sum(column) -> int:
    return int(pc.sum(column).as_py() or 0)


def pooled_bpp(coded: pa.Table) -> float | None:
    """Bits per pixel over all coded images: 8 x their bytes / their pixels (None if there are none).
    Weighted by image size, so a tiny image's container overhead cannot dominate the figure."""
    pixels = _sum(pc.multiply(coded["width"].cast(pa.int64()), coded["height"].cast(pa.int64())))
    return 8.0 * _sum(coded["compressed_bytes"]) / pixels if pixels else None


def _mean(column) -> float | None:
    return pc.mean(column).as_py()


def _redacted_config(config) -> dict[str, Any]:
    """The config as JSON-ready data, with every string passed through ``redact``."""
    def clean(value):
        if isinstance(value, str):
            return redact(value)
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value

    return clean(asdict(config))


@dataclass(frozen=True)
class RestoreSummary:
    output: str
    job_id: str
    shards: int
    shards_skipped: int
    shards_failed: list[str]
    samples: int
    ok: int
    errors: int
    error_examples: list[str]
    wall_seconds: float
    samples_per_second: float
    failure_reasons: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return not self.shards_failed

    def text(self) -> str:
        lines = [
            f"output      {self.output} (job {self.job_id})",
            f"shards      {self.shards} ({self.shards_skipped} already restored, {len(self.shards_failed)} failed)",
            f"samples     {self.samples}: {self.ok} restored, {self.errors} error rows",
            f"time        {self.wall_seconds:.1f}s wall, {self.samples_per_second:.1f} samples/s this run",
        ]
        lines += [f"error       {example}" for example in self.error_examples]
        lines += [f"FAILED      {reason}" for reason in self.failure_reasons or self.shards_failed]
        return "\n".join(lines)


def bitstream_shards(specs: tuple[str, ...]) -> tuple[list[ArchiveShard], dict[str, Any] | None]:
    """Archive root, generation directory or shard specs -> (shards, the archive's job.json). An
    archive's shards are those its commit markers name (and uncommitted ones, to report), never a
    listing of its tars."""
    generation = find_generation(specs[0]) if len(specs) == 1 else None
    if generation is not None:
        return archive_shards(generation), json.loads(read_bytes(generation.job_file))
    return [ArchiveShard(url) for url in expand_inputs(specs)], None


def check_model_available(job: dict[str, Any] | None, model: str | None) -> None:
    """Fail fast, naming the model, when an archive's model cannot be loaded here."""
    if job is None or model is not None:
        return
    sha = job["model"]["sha256"]
    if find_by_sha256(sha) is None:
        raise ConfigError(
            f"this archive was written with model {job['model']['id']!r} ({describe_sha256(sha)}), "
            "which is not in the model registry here; pass --model with that checkpoint, or make it findable "
            "by name (a folder in NCPIPE_MODEL_DIRS, or the model store NCPIPE_MODEL_STORE)"
        )


def check_corrdiff_archive(job: dict[str, Any] | None, config: DecompressConfig) -> None:
    """Refuse the CorrDiff decoder, before any work, for an archive compressed without its coefficients."""
    if config.decoder != "corrdiff" or job is None or job.get("kind") != "compress" or "corrdiff" in job:
        return
    raise ConfigError(
        "this archive was compressed without CorrDiff coefficients: restore it without --decoder corrdiff, "
        "or compress the originals again with --corrdiff DECODER"
    )


def restore_fingerprint(config: DecompressConfig) -> str:
    """What must match for a restored shard to count as done on resume."""
    relevant = {"to": config.to, "model": config.model, "max_pixels": config.max_pixels, "refiner": config.refiner,
                "refine_steps": config.refine_steps, "guidance": config.guidance,
                "image_format": config.image_format, "jpeg_quality": config.jpeg_quality}
    if config.decoder == "corrdiff":  # only then, so restores without CorrDiff keep the fingerprints they had
        relevant["corrdiff"] = {"sha256": corrdiff_sha256_of(config.corrdiff), "perception": config.perception}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


@releases_locks
def run_decompress(config: DecompressConfig) -> RestoreSummary:
    from ncpipe.pipeline.actors import DecompressActor
    from ncpipe.pipeline.decompress import RestoreTask

    started = time.perf_counter()
    shards, job = bitstream_shards(config.inputs)
    if not shards:
        raise ConfigError(f"no bitstream shards found in {[redact(s) for s in config.inputs]}")
    check_corrdiff_archive(job, config)
    check_model_available(job, config.model)
    fingerprint = restore_fingerprint(config)
    job_id = new_job_id(fingerprint)
    restore = RestoreLayout(config.output)
    lock_output(restore.lock_file, job_id, "decompress")
    if config.overwrite:
        remove_tree(config.output, keep=(restore.lock_file,))
    stems = output_stems([shard.url for shard in shards])
    tasks = [
        RestoreTask(shard.url, stems[shard.url], restore.output(stems[shard.url], config.to),
                    restore.manifest_part(stems[shard.url]), restore.commit_marker(stems[shard.url]), job_id,
                    fingerprint, source_manifest_url=manifest_part_of(shard.url), committed=shard.committed)
        for shard in shards
        if not is_committed(restore.commit_marker(stems[shard.url]), shard.url, fingerprint)
    ]
    outcome = run_tasks(config.cluster, tasks, DecompressActor, config, "decompress")
    clear_partials(job_id, restore.root, restore.manifest_dir, restore.commits_dir)
    table = read_manifest(restore.manifest_dir, RESTORE_SCHEMA)
    errors = table.filter(pc.equal(table["status"], STATUS_ERROR))
    wall = time.perf_counter() - started
    return RestoreSummary(
        output=redact(config.output),
        job_id=job_id,
        shards=len(shards),
        shards_skipped=len(shards) - len(tasks),
        shards_failed=[redact(f.task.input_url) for f in outcome.failures],
        samples=table.num_rows,
        ok=table.num_rows - errors.num_rows,
        errors=errors.num_rows,
        error_examples=sorted(set(errors["error"].to_pylist()))[:3],
        wall_seconds=wall,
        samples_per_second=sum(r.samples for r in outcome.results) / wall if wall > 0 else 0.0,
        failure_reasons=[f.describe() for f in outcome.failures],
    )



@dataclass(frozen=True)
class RecompressSummary:
    archive: str
    previous_generation: str
    generation: str | None  # None when there was nothing to do, or for a dry run
    policy: str
    dry_run: bool
    shards: int
    selected: int
    from_originals: int
    transcoded: int
    kept: int  # selected but left as they were (original unusable, old model missing)
    bytes_before: int  # the selected samples' bitstreams before
    bytes_after: int | None  # after (projected from the target model's card for a dry run)
    mean_generation_loss_db: float | None  # mean PSNR of transcoded samples against their old reconstruction
    switched: bool
    shards_failed: list[str]
    wall_seconds: float
    failure_reasons: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return not self.shards_failed

    @property
    def errors(self) -> int:
        """Selected samples that could not be re-encoded (their old bitstreams are kept)."""
        return self.kept

    def text(self) -> str:
        after = "n/a" if self.bytes_after is None else _mb(self.bytes_after)
        saving = _size_change(self.bytes_before, self.bytes_after)
        head = "DRY RUN: nothing written. " if self.dry_run else ""
        lines = [
            f"{head}archive {self.archive}: generation {self.previous_generation}"
            + (f" -> {self.generation}" if self.generation else ""),
            f"policy      {self.policy}",
            f"selected    {self.selected} samples in {self.shards} shards",
        ]
        if not self.selected:
            lines.append("nothing to do: no sample matches the policy")
            return "\n".join(lines)
        lines.append(f"bytes       {_mb(self.bytes_before)} -> {after}{saving}"
                     + (" projected from the target model's card" if self.dry_run else ""))
        if not self.dry_run:
            loss = _fmt(self.mean_generation_loss_db, ".2f")
            lines += [
                f"re-encoded  {self.from_originals} from originals, {self.transcoded} transcoded "
                f"(mean PSNR vs previous reconstruction {loss} dB), {self.kept} kept as they were",
                f"current     {'switched to ' + self.generation if self.switched else 'unchanged'}",
                f"time        {self.wall_seconds:.1f}s",
            ]
        lines += [f"FAILED      {reason}" for reason in self.failure_reasons or self.shards_failed]
        return "\n".join(lines)


@releases_locks
def run_recompress(config: RecompressConfig) -> RecompressSummary:
    from ncpipe.manifest import ManifestRow
    from ncpipe.pipeline.actors import RecompressActor
    from ncpipe.pipeline.recompress import CodingTarget, RecompressPolicy, RecompressTask, is_selected, policy_cutoff

    started = time.perf_counter()
    archive = ArchiveLayout(config.archive)
    current = archive.current_generation()
    if current is None:
        raise ConfigError(f"{redact(config.archive)} has no CURRENT generation: not an ncpipe archive")
    previous = archive.generation(current)
    target_sha = model_sha256_of(config.model)
    target = CodingTarget(target_sha, coding_quality(config.model, target_sha, config.quality))
    policy = RecompressPolicy(config.older_than_model, config.min_psnr, config.max_bpp, config.quality_above)
    cutoff = policy_cutoff(policy)
    table = read_manifest(previous.manifest_dir)
    by_shard: dict[str, list[dict]] = {}
    for row in table.to_pylist():
        by_shard.setdefault(row["output_shard"], []).append(row)
    selection = {
        shard: frozenset(i for i, row in enumerate(rows) if is_selected(row, target, policy, cutoff))
        for shard, rows in by_shard.items()
    }
    chosen = [by_shard[s][i] for s, positions in selection.items() for i in positions]
    base = dict(archive=redact(config.archive), previous_generation=current, policy=policy.describe(),
                shards=sum(1 for p in selection.values() if p), selected=len(chosen),
                bytes_before=sum(r["compressed_bytes"] for r in chosen), shards_failed=[])
    if not chosen or config.dry_run:
        return RecompressSummary(
            **base, generation=None, dry_run=config.dry_run, from_originals=0, transcoded=0, kept=0,
            bytes_after=_projected_bytes(config.model, target.quality, chosen) if chosen else None,
            mean_generation_loss_db=None, switched=False, wall_seconds=time.perf_counter() - started,
        )
    fingerprint = hashlib.sha256(json.dumps(
        {"target": target_sha, "from": current, "policy": policy.fingerprint_fields(),
         "originals": config.originals, "transcode_only": config.transcode_only,
         "coding": config.compress_config().coding_fingerprint(target_sha)}, sort_keys=True,
    ).encode()).hexdigest()[:16]
    job_id = new_job_id(fingerprint)
    lock_output(archive.lock_file, job_id, "recompress")
    if archive.current_generation() != current:  # another job switched it while this one was planning
        raise ConfigError(f"{redact(config.archive)} changed while this recompression was planned; run it again")
    name = generation_name(int(current.lstrip("g")) + 1)
    generation = archive.generation(name)
    job = {"kind": "recompress", "ncpipe_version": __version__, "job_id": job_id, "fingerprint": fingerprint,
           "model": {"id": config.model, "sha256": target_sha}, "previous_generation": current,
           "policy": policy.describe(), "config": _redacted_config(config)}
    # A later generation that is not CURRENT is an interrupted recompression: resume it
    # if it was the same one, replace it otherwise (readers never saw it).
    prepare_generation(generation, job, overwrite=_unfinished_other(generation, fingerprint))
    tasks = []
    for shard_url, rows in by_shard.items():
        stem = shard_stem(shard_url)
        if is_committed(generation.commit_marker(stem), shard_url, fingerprint):
            continue
        tasks.append(RecompressTask(
            shard_url, stem, generation.shard(stem), generation.manifest_part(stem), generation.commit_marker(stem),
            job_id, fingerprint, name, previous_rows=tuple(ManifestRow(**row) for row in rows),
            selected=selection[shard_url], originals=config.originals, transcode_only=config.transcode_only,
        ))
    outcome = run_tasks(config.cluster, tasks, RecompressActor, config, "recompress")
    clear_partials(job_id, generation.shards_dir, generation.manifest_dir, generation.commits_dir)
    failed = [redact(f.task.input_url) for f in outcome.failures]
    # this job's re-encodings: rows kept from earlier recompressions carry a recompress_source too
    new_rows = [r for r in read_manifest(generation.manifest_dir).to_pylist()
                if r["recompress_source"] and r["job_id"] == job_id]
    losses = [r["psnr_vs_previous"] for r in new_rows if r["psnr_vs_previous"] is not None]
    summary = RecompressSummary(
        **{**base, "shards_failed": failed}, generation=name, dry_run=False,
        from_originals=sum(r["recompress_source"] == "original" for r in new_rows),
        transcoded=sum(r["recompress_source"] == "transcoded" for r in new_rows),
        kept=len(chosen) - len(new_rows),
        bytes_after=sum(r["compressed_bytes"] for r in new_rows)
        + sum(r["compressed_bytes"] for r in chosen) - sum(r["previous_compressed_bytes"] for r in new_rows),
        mean_generation_loss_db=sum(losses) / len(losses) if losses else None,
        switched=not failed, wall_seconds=time.perf_counter() - started,
        failure_reasons=[f.describe() for f in outcome.failures],
    )
    if not failed:
        write_bytes_atomic(generation.summary_file, json.dumps(dataclasses.asdict(summary), indent=2).encode())
        archive.set_current(name)
    return summary


def _size_change(before: int, after: int | None) -> str:
    """`` (12.3% less)``, `` (4.0% more)`` or `` (same size)``; empty when there is nothing to compare."""
    if after is None or not before:
        return ""
    if after == before:
        return " (same size)"
    change = 100 * abs(after - before) / before
    return f" ({change:.1f}% {'less' if after < before else 'more'})"


def _unfinished_other(generation: GenerationLayout, fingerprint: str) -> bool:
    if not exists(generation.job_file):
        return False
    return json.loads(read_bytes(generation.job_file)).get("fingerprint") != fingerprint


def _projected_bytes(model: str, quality: int, rows: list[dict]) -> int | None:
    """Bytes the selected samples would take at the target model's measured (card) bpp: its first
    measurement, at ``quality`` for a variable-rate model."""
    card = resolve_model(model).card or {}
    evaluations = card.get("evaluations") or []
    if not evaluations:
        return None
    levels = {q["quality"]: q["bpp"] for q in evaluations[0].get("qualities") or ()}
    bpp = levels.get(quality, evaluations[0]["bpp"])
    return int(sum(r["width"] * r["height"] * bpp / 8 for r in rows))
