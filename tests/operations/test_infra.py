"""infra/: every manifest parses, every ncpipe command it runs exists with the options it passes,
every spec it names exists in jobs/ and loads; the image and the local S3 recipe hold together."""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from ncpipe.cli import build_parser
from ncpipe.operations.jobspec import load_spec

REPO_ROOT = Path(__file__).resolve().parents[2]
INFRA = REPO_ROOT / "infra"
MANIFESTS = sorted(INFRA.rglob("*.yaml")) + sorted(INFRA.rglob("*.yml"))
DOCKERFILE = INFRA / "docker" / "Dockerfile"
IMAGE_ROOT = "/opt/ncpipe"  # the Dockerfile's WORKDIR: the repository's files are copied there
SHELL_BREAKS = {"&&", "||", ";", "|"}


def documents(path: Path) -> list:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def command_lines(node) -> list[list[str]]:
    """Every ``ncpipe ...`` invocation in a manifest, as tokens: entrypoint strings and command/args lists."""
    found: list[list[str]] = []
    if isinstance(node, dict):
        if isinstance(node.get("command"), list):  # a container: its command and args are one command line
            found += invocations([str(item) for item in node["command"] + node.get("args", [])])
        for key, value in node.items():
            if key not in ("command", "args") or not isinstance(node.get("command"), list):
                found += command_lines(value)
    elif isinstance(node, list):
        if node and all(isinstance(item, str) for item in node):
            found += invocations([str(item) for item in node])
        else:
            for item in node:
                found += command_lines(item)
    elif isinstance(node, str) and "ncpipe " in node:
        found += invocations(shlex.split(node))
    return found


def invocations(tokens: list[str]) -> list[list[str]]:
    """The ncpipe invocations in a token list (``ncpipe X`` or ``python -m ncpipe X``), up to a shell break.

    A token that is itself a command line (``bash -c "..."``) is split into its tokens."""
    tokens = [part for token in tokens for part in (shlex.split(token) if " " in token else [token])]
    result = []
    for i, token in enumerate(tokens):
        if token == "ncpipe" or token.endswith("/ncpipe"):
            rest = []
            for item in tokens[i + 1:]:
                if item in SHELL_BREAKS:
                    break
                rest.append(item)
            result.append(rest)
    return result


def subparsers_of(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def check_invocation(tokens: list[str], where: str) -> argparse.ArgumentParser:
    """The (sub)parser the invocation reaches; fails naming an unknown command or option."""
    parser, i = build_parser(), 0
    while i < len(tokens) and subparsers_of(parser) and not tokens[i].startswith("-"):
        commands = subparsers_of(parser)
        assert tokens[i] in commands, f"{where}: 'ncpipe {' '.join(tokens[:i + 1])}' is not a subcommand " \
                                      f"(known: {', '.join(sorted(commands))})"
        parser, i = commands[tokens[i]], i + 1
    assert not subparsers_of(parser), f"{where}: 'ncpipe {' '.join(tokens)}' names no complete subcommand"
    for token in tokens[i:]:
        if token.startswith("--"):
            option = token.split("=", 1)[0]
            assert option in parser._option_string_actions, \
                f"{where}: 'ncpipe {' '.join(tokens[:i])}' has no option {option}"
    return parser


def spec_paths(tokens: list[str]) -> list[Path]:
    """The job specs an invocation names, as repository paths."""
    paths = []
    for token in tokens:
        if token.endswith((".yaml", ".yml")):
            relative = token.removeprefix(IMAGE_ROOT + "/")
            assert not relative.startswith("/"), f"{token}: an absolute path outside the image's {IMAGE_ROOT}"
            paths.append(REPO_ROOT / relative)
    return paths


def test_there_are_manifests():
    names = {path.relative_to(INFRA).as_posix() for path in MANIFESTS}
    assert {"kuberay/raycluster.yaml", "kuberay/rayjob-compress.yaml", "kuberay/cronjob-recompress.yaml"} <= names


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.relative_to(INFRA).as_posix())
def test_every_manifest_parses_and_runs_real_commands_with_real_options(path):
    docs = documents(path)
    assert docs and all(isinstance(doc, dict) and doc.get("kind") and doc.get("apiVersion") for doc in docs)
    where = path.relative_to(REPO_ROOT).as_posix()
    for doc in docs:
        for tokens in command_lines(doc):
            check_invocation(tokens, where)
            for spec in spec_paths(tokens):
                assert spec.is_file(), f"{where}: names {spec.relative_to(REPO_ROOT)}, which does not exist"
                load_spec(spec)


def test_the_kuberay_manifests_run_ncpipe():
    kinds = {}
    for path in MANIFESTS:
        for doc in documents(path):
            kinds.setdefault(doc["kind"], []).extend(command_lines(doc))
    assert kinds["RayJob"][0][:2] == ["run", f"{IMAGE_ROOT}/jobs/compress-s3.yaml"]
    assert kinds["CronJob"][0][0] == "recompress"
    assert "RayCluster" in kinds


def test_the_image_installs_the_pinned_project_with_the_registry_and_specs():
    text = DOCKERFILE.read_text()
    assert re.search(rf"^WORKDIR {IMAGE_ROOT}$", text, re.M)
    assert "python3.11" in text and "pip install --no-deps ." in text
    assert 'project["dependencies"]' in text  # the pins come from pyproject.toml, not a copy of them
    for copied in ("ncpipe", "models", "jobs"):
        assert re.search(rf"^COPY {copied} \./{copied}$", text, re.M)
    assert f"NCPIPE_MODEL_DIRS={IMAGE_ROOT}/models" in text
    ray_pin = next(d for d in tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
                   if d.startswith("ray["))
    assert f'"ray[default]=={ray_pin.split("==")[1]}"' in text  # the Jobs API's extra at the project's Ray version


def test_the_local_s3_recipe_serves_s3_on_loopback(tmp_path):
    env_file = tmp_path / "s3.env"
    server = subprocess.Popen(
        [sys.executable, str(INFRA / "local" / "s3_dev_server.py"), "--port", "0", "--bucket", "dev",
         "--env-file", str(env_file)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    try:
        exports = dict(line.removeprefix("export ").split("=", 1) for line in
                       (server.stdout.readline().strip() for _ in range(6)))
        assert exports["AWS_ENDPOINT_URL_S3"].startswith("http://127.0.0.1:")
        assert env_file.read_text().splitlines()[3] == f"export AWS_ENDPOINT_URL_S3={exports['AWS_ENDPOINT_URL_S3']}"
        import boto3

        client = boto3.client("s3", endpoint_url=exports["AWS_ENDPOINT_URL_S3"], region_name="us-east-1",
                              aws_access_key_id="dev", aws_secret_access_key="dev-secret-key")
        client.put_object(Bucket="dev", Key="a/b.txt", Body=b"hello")
        assert client.get_object(Bucket="dev", Key="a/b.txt")["Body"].read() == b"hello"
    finally:
        server.terminate()
        assert server.wait(timeout=30) == 0


def test_the_image_copies_what_the_package_maps_before_installing_it():
    """pyproject.toml maps models/ and samples/ into the package: they must be there when it is built."""
    text = DOCKERFILE.read_text()
    install = text.index("pip install --no-deps .")
    mapped = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"].values()
    for folder in {"ncpipe", *mapped}:
        assert text.index(f"COPY {folder} ./{folder}") < install, folder
