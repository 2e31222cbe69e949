"""Job specs: YAML files that name a job kind and its configuration, loaded once into a frozen config.

::

    kind: compress                  # a key of JOB_KINDS
    spec:                           # the fields of that kind's config dataclass
      inputs: [samples/shards]
      output: out/samples-archive
    cluster:                        # optional: ClusterConfig fields, for kinds that run on Ray
      workers: 2

``load_spec`` checks everything before anything runs: an unknown top-level key, an unknown
kind (the known ones are listed), and every field (name, type, range, via
``config_from_mapping``); each error names the file and the field. Relative paths inside a
spec are read relative to the directory the job runs in (for a submitted job: the uploaded
working directory), so specs in ``jobs/`` are written relative to the repository root.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import yaml

from ncpipe.config import ClusterConfig, ConfigError, config_from_mapping


@dataclass(frozen=True)
class JobKind:
    """What a kind is built from and run by, as ``module:attribute`` import paths (imported lazily)."""

    config: str  # a frozen config dataclass
    run: str  # ``run(config) -> result``; a result's ``text()`` is printed, ``complete`` False exits 1


# One line per kind. Run functions are imported only when a job runs (they pull in torch and Ray).
JOB_KINDS: dict[str, JobKind] = {
    "compress": JobKind("ncpipe.config:CompressConfig", "ncpipe.pipeline.jobs:run_compress"),
    "decompress": JobKind("ncpipe.config:DecompressConfig", "ncpipe.pipeline.jobs:run_decompress"),
    "evaluate": JobKind("ncpipe.evaluation.run:EvaluateConfig", "ncpipe.evaluation.run:evaluate_job"),
    "train-codec": JobKind("ncpipe.train.codec_trainer:CodecTrainConfig", "ncpipe.train.codec_trainer:train_codec"),
    "train-refiner": JobKind("ncpipe.train.refiner_trainer:RefinerTrainConfig",
                             "ncpipe.train.refiner_trainer:train_refiner"),
    "recompress": JobKind("ncpipe.config:RecompressConfig", "ncpipe.pipeline.jobs:run_recompress"),
}

TOP_LEVEL_KEYS = ("kind", "spec", "cluster")
CLUSTER_FIELD = "cluster"


@dataclass(frozen=True)
class JobSpec:
    """A loaded, validated job spec."""

    path: str
    kind: str
    config: Any  # an instance of JOB_KINDS[kind].config

    def run_function(self) -> Callable[[Any], Any]:
        return import_path(JOB_KINDS[self.kind].run)


def import_path(path: str) -> Any:
    """The attribute named by ``module:attribute``."""
    module, _, attribute = path.partition(":")
    return getattr(importlib.import_module(module), attribute)


def read_document(path: str | Path) -> Any:
    """The parsed YAML of a spec file; errors name the file (and the line)."""
    try:
        with open(path) as stream:  # a stream, so YAML errors name the file and line
            return yaml.safe_load(stream)
    except FileNotFoundError:
        raise FileNotFoundError(f"job spec {path} does not exist") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None


def spec_fields(path: str | Path, kind: str) -> dict[str, Any]:
    """The ``spec:`` mapping of a file that must be of ``kind`` (for commands whose flags override it)."""
    document = read_document(path)
    if not isinstance(document, Mapping) or document.get("kind") != kind:
        found = document.get("kind") if isinstance(document, Mapping) else None
        raise ConfigError(f"{path}: kind is {found!r}, but this command runs kind {kind!r} specs")
    unknown = [key for key in document if key not in TOP_LEVEL_KEYS]
    fields = document.get("spec")
    if unknown or not isinstance(fields, Mapping):
        raise ConfigError(f"{path}: expected 'kind: {kind}' and a 'spec:' mapping (unknown keys: {unknown})")
    return dict(fields)


def with_output(spec: JobSpec, output: str | None) -> JobSpec:
    """``spec`` writing to ``output`` instead of its own (``--output``); unchanged when None."""
    if output is None:
        return spec
    if "output" not in {f.name for f in dataclasses.fields(spec.config)}:
        raise ConfigError(f"{spec.path}: a {spec.kind} job has no output to replace; leave out --output")
    return dataclasses.replace(spec, config=dataclasses.replace(spec.config, output=output))


def merge_overrides(spec: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``spec`` with each given flag replacing its field; mapping fields are merged key by key."""
    merged = dict(spec)
    for name, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(merged.get(name), Mapping):
            merged[name] = {**merged[name], **value}
        else:
            merged[name] = value
    return merged


def load_spec(path: str | Path) -> JobSpec:
    """Read and validate the job spec at ``path``; errors name the file and the field."""
    where = str(path)
    document = read_document(path)
    try:
        kind, config = parse_spec(document)
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None
    return JobSpec(where, kind, config)


def parse_spec(document: Any) -> tuple[str, Any]:
    """``(kind, config)`` from a parsed spec document."""
    if not isinstance(document, Mapping):
        raise ConfigError(f"expected a mapping with keys {', '.join(TOP_LEVEL_KEYS)}, got {type(document).__name__}")
    for key in document:
        if key not in TOP_LEVEL_KEYS:
            raise ConfigError(f"{key}: unknown top-level key{_suggest(key, TOP_LEVEL_KEYS)}; "
                              f"a spec has {', '.join(TOP_LEVEL_KEYS)}")
    kind = document.get("kind")
    if not isinstance(kind, str) or kind not in JOB_KINDS:
        shown = "missing" if kind is None else f"unknown job kind {kind!r}{_suggest(str(kind), JOB_KINDS)}"
        raise ConfigError(f"kind: {shown}; known kinds: {', '.join(sorted(JOB_KINDS))}")
    config_class = import_path(JOB_KINDS[kind].config)
    fields = document.get("spec")
    if fields is None:
        raise ConfigError(f"spec: missing; it holds the fields of {config_class.__name__}")
    config = config_from_mapping(config_class, fields, "spec")
    if "cluster" in document:
        config = _with_cluster(config, document["cluster"], fields, kind)
    return kind, config


def _with_cluster(config: Any, cluster: Any, fields: Mapping[str, Any], kind: str) -> Any:
    if not cluster_field_of(type(config)):
        raise ConfigError(f"cluster: kind {kind!r} does not run on a Ray cluster configuration")
    if CLUSTER_FIELD in fields:
        raise ConfigError("cluster: given both at the top level and as spec.cluster; keep one")
    return dataclasses.replace(config, **{CLUSTER_FIELD: config_from_mapping(ClusterConfig, cluster, "cluster")})


def cluster_field_of(config_class: type) -> bool:
    """Whether ``config_class`` has a ``cluster: ClusterConfig`` field."""
    hints = typing.get_type_hints(config_class)
    return any(f.name == CLUSTER_FIELD and hints[f.name] is ClusterConfig for f in dataclasses.fields(config_class))


def _suggest(name: str, known: typing.Iterable[str]) -> str:
    guess = difflib.get_close_matches(name, list(known), n=1)
    return f" (did you mean {guess[0]!r}?)" if guess else ""
