"""Job specs: every kind loads into its frozen config; every mistake is named with its file and field."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import pytest

from ncpipe.cli import main
from ncpipe.config import ClusterConfig, CompressConfig, ConfigError, DecompressConfig
from ncpipe.operations.jobspec import JOB_KINDS, JobKind, import_path, load_spec

REPO_ROOT = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str, name: str = "job.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_compress_spec_loads_with_cluster_settings(tmp_path):
    path = write(tmp_path, """
kind: compress
spec:
  inputs: s3://bucket/in/data-{000..009}.tar   # one string is a one-element list
  output: s3://bucket/archive
  batch_size: 4
  metrics: false
cluster:
  workers: 2
  cpus_per_worker: 3     # an int where a float is expected
""")
    spec = load_spec(path)
    assert spec.kind == "compress" and spec.path == str(path)
    assert spec.config == CompressConfig(
        inputs=("s3://bucket/in/data-{000..009}.tar",), output="s3://bucket/archive", batch_size=4, metrics=False,
        cluster=ClusterConfig(workers=2, cpus_per_worker=3.0),
    )
    assert spec.run_function() is import_path("ncpipe.pipeline.jobs:run_compress")


def test_decompress_spec_loads_and_cluster_may_sit_inside_spec(tmp_path):
    path = write(tmp_path, """
kind: decompress
spec:
  inputs: [out/archive]
  output: out/restored
  to: directory
  model: null
  cluster: {max_shard_attempts: 1}
""")
    spec = load_spec(path)
    assert spec.config == DecompressConfig(inputs=("out/archive",), output="out/restored", to="directory",
                                           cluster=ClusterConfig(max_shard_attempts=1))


def test_quality_fields_load_for_compress_and_recompress(tmp_path):
    compress = load_spec(write(tmp_path, "kind: compress\nspec: {inputs: [a.tar], output: o, quality: 2}"))
    assert compress.config.quality == 2
    recompress = load_spec(write(tmp_path, "kind: recompress\nspec: {archive: a, model: m, quality: 1, "
                                           "quality_above: 2}"))
    assert (recompress.config.quality, recompress.config.quality_above) == (1, 2)
    assert recompress.config.compress_config().quality == 1


@pytest.mark.parametrize("kind", sorted(JOB_KINDS))
def test_every_registered_kind_imports_a_config_dataclass_and_a_run_function(kind):
    config_class = import_path(JOB_KINDS[kind].config)
    assert dataclasses.is_dataclass(config_class) and config_class.__dataclass_params__.frozen
    assert callable(import_path(JOB_KINDS[kind].run))


# Specs whose data is the user's: the field is left out, and the spec says which flag gives it.
NEEDS_ARGUMENT = {"train-codec.yaml": "data", "train-refiner.yaml": "data"}


@pytest.mark.parametrize("path", sorted((REPO_ROOT / "jobs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_spec_in_jobs_loads(path):
    """A spec in jobs/ whose kind is not registered in JOB_KINDS fails here, naming the kind."""
    field = NEEDS_ARGUMENT.get(path.name)
    if field:
        with pytest.raises(ConfigError, match=f"missing required field.*{field}"):
            load_spec(path)
        assert f"--{field}" in path.read_text()
        return
    spec = load_spec(path)
    assert isinstance(spec.config, import_path(JOB_KINDS[spec.kind].config))


@pytest.mark.parametrize("text, expected", [
    ("kind: compress\nspec: {inputs: [a.tar], output: o, batch_sise: 8}",
     "spec.batch_sise: unknown field (did you mean 'batch_size'?)"),
    ("kind: compress\nspec: {inputs: [a.tar], output: o, batch_size: eight}",
     "spec.batch_size: expected int, got 'eight'"),
    ("kind: compress\nspec: {inputs: [a.tar], output: o, batch_size: 0}",
     "spec.batch_size: must be a positive number, got 0"),
    ("kind: compress\nspec: {inputs: [a.tar], output: o, quality: 0}",
     "spec.quality: must be in [1, 255], got 0"),
    ("kind: compress\nspec: {inputs: [a.tar], output: o, quality: 2.5}",
     "spec.quality: expected int, got 2.5"),
    ("kind: recompress\nspec: {archive: a, model: m, quality_above: -1}",
     "spec.quality_above: must be in [0, 255], got -1"),
    ("kind: compress\nspec: {inputs: [a.tar], output: o, metrics: 'no'}",
     "spec.metrics: expected bool, got 'no'"),
    ("kind: compress\nspec: {inputs: [a.tar, 7], output: o}",
     "spec.inputs[1]: expected str, got 7"),
    ("kind: compress\nspec: {output: o}",
     "spec: missing required field(s) inputs"),
    ("kind: decompress\nspec: {inputs: [a], output: o, to: tarballs}",
     "spec.to: must be 'shards' or 'directory', not 'tarballs'"),
    ("kind: compress\nspec: {inputs: [a.tar], output: o}\ncluster: {workers: two}",
     "cluster.workers: expected int, got 'two'"),
    ("kind: compress\nspec: {inputs: [a.tar], output: o}\ncluster: {worker: 2}",
     "cluster.worker: unknown field (did you mean 'workers'?)"),
    ("kind: compress\nspec: {inputs: [a.tar], output: o}\ncluster: [1, 2]",
     "cluster: expected a mapping, got list"),
    ("kind: compress\nspec: {inputs: [a.tar], output: o, cluster: {workers: 1}}\ncluster: {workers: 2}",
     "cluster: given both at the top level and as spec.cluster"),
    ("kind: compress\nspec: [inputs]",
     "spec: expected a mapping, got list"),
    ("kind: compress",
     "spec: missing; it holds the fields of CompressConfig"),
    ("kind: compress\nspecs: {inputs: [a.tar], output: o}",
     "specs: unknown top-level key (did you mean 'spec'?)"),
    ("- kind: compress",
     "expected a mapping with keys kind, spec, cluster, got list"),
    ("spec: {inputs: [a.tar], output: o}",
     "kind: missing; known kinds: " + ", ".join(sorted(JOB_KINDS))),
    ("kind: [compress]\nspec: {}",
     "kind: unknown job kind ['compress']"),
])
def test_errors_name_the_file_and_the_field(tmp_path, text, expected):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_spec(path)
    assert str(caught.value).startswith(f"{path}: ")
    assert expected in str(caught.value)


def test_unknown_kind_lists_the_known_ones(tmp_path):
    path = write(tmp_path, "kind: compres\nspec: {}")
    with pytest.raises(ConfigError, match=r"kind: unknown job kind 'compres' \(did you mean 'compress'\?\); "
                       r"known kinds: compress, decompress"):
        load_spec(path)


def test_cluster_for_a_kind_without_a_cluster_config_is_refused(tmp_path):
    path = write(tmp_path, "kind: train-codec\nspec: {data: [d], run_dir: r}\ncluster: {workers: 1}")
    with pytest.raises(ConfigError, match="cluster: kind 'train-codec' does not run on a Ray cluster configuration"):
        load_spec(path)


def test_invalid_yaml_names_the_file_and_line(tmp_path):
    path = write(tmp_path, "kind: compress\nspec: {inputs: [a.tar}\n")
    with pytest.raises(ConfigError, match=rf"(?s)^{path}: not valid YAML: .*line 2"):
        load_spec(path)


def test_a_missing_spec_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"job spec {tmp_path}/nope.yaml does not exist"):
        load_spec(tmp_path / "nope.yaml")


@dataclass(frozen=True)
class EchoConfig:
    message: str
    complete: bool = True


@dataclass(frozen=True)
class EchoResult:
    message: str
    complete: bool

    def text(self) -> str:
        return f"echo: {self.message}"


def run_echo(config: EchoConfig) -> EchoResult:
    return EchoResult(config.message, config.complete)


@pytest.mark.parametrize("complete, status", [(True, 0), (False, 1)])
def test_a_kind_added_with_one_line_runs_through_ncpipe_run(tmp_path, monkeypatch, capsys, complete, status):
    monkeypatch.setitem(JOB_KINDS, "echo", JobKind(f"{__name__}:EchoConfig", f"{__name__}:run_echo"))
    path = write(tmp_path, f"kind: echo\nspec: {{message: hello, complete: {str(complete).lower()}}}")
    assert main(["run", str(path)]) == status
    assert capsys.readouterr().out == "echo: hello\n"


def test_ncpipe_run_check_prints_the_configuration_and_runs_nothing(tmp_path, capsys):
    path = write(tmp_path, "kind: compress\nspec: {inputs: [missing.tar], output: o}")
    assert main(["run", "--check", str(path)]) == 0
    out = capsys.readouterr().out
    assert '"kind": "compress"' in out and '"missing.tar"' in out and '"batch_size": 8' in out


def test_ncpipe_run_exits_2_naming_the_bad_field(tmp_path, caplog):
    path = write(tmp_path, "kind: compress\nspec: {inputs: [a.tar], output: o, device: [cpu]}")
    with caplog.at_level(logging.ERROR):
        assert main(["run", str(path)]) == 2
    assert f"{path}: spec.device: expected str, got ['cpu']" in caplog.text
