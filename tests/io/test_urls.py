from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import quote

import pytest
from fsspec.implementations.local import LocalFileSystem

from ncpipe.io.urls import (
    InputError,
    check_output_outside_inputs,
    expand_inputs,
    join_url,
    redact,
    shard_stem,
    url_to_fs,
)
from tests.conftest import TEST_SECRET
from tests.helpers import put_bytes


def _touch(root: Path, *names: str) -> list[str]:
    for name in names:
        put_bytes(str(root / name), b"x")
    return [str(root / name) for name in names]


def test_single_brace_glob_and_directory_specs_locally(tmp_path):
    shards = _touch(tmp_path, "data-000000.tar", "data-000001.tar", "data-000002.tar")
    _touch(tmp_path, "sub/b.tar", "sub/deeper/a.tar.gz", "sub/notes.txt")

    assert expand_inputs([shards[1]]) == [shards[1]]
    assert expand_inputs([str(tmp_path / "data-{000000..000002}.tar")]) == shards
    assert expand_inputs([str(tmp_path / "data-*.tar")]) == shards
    nested = [str(tmp_path / "sub/b.tar"), str(tmp_path / "sub/deeper/a.tar.gz")]
    assert expand_inputs([str(tmp_path / "sub")]) == nested


def test_order_is_spec_order_then_sorted_and_duplicates_go(tmp_path):
    a, b, c = _touch(tmp_path, "a.tar", "b.tar", "c.tar")
    assert expand_inputs([c, str(tmp_path / "*.tar"), a]) == [c, a, b]
    assert expand_inputs([str(tmp_path / "{c,a}.tar")]) == [a, c]


def test_relative_and_file_urls(tmp_path, monkeypatch):
    (shard,) = _touch(tmp_path, "d/x.tar")
    monkeypatch.chdir(tmp_path)
    assert expand_inputs(["d/x.tar", "d"]) == [shard]
    assert expand_inputs([f"file://{tmp_path}/d/*.tar"]) == [f"file://{shard}"]


@pytest.mark.parametrize("spec, words", [
    ("missing.tar", "does not exist"),
    ("*.tgz", "matches no file"),
    ("empty", "holds no shard"),
    ("data-{000000..000003}.tar", "data-000003.tar does not exist"),
    ("data-{000000..000001.tar", "Unbalanced"),
])
def test_a_spec_that_names_nothing_is_an_input_error(tmp_path, spec, words):
    _touch(tmp_path, "data-000000.tar", "data-000001.tar", "data-000002.tar")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match=words) as caught:
        expand_inputs([str(tmp_path / "data-000000.tar"), str(tmp_path / spec)])
    assert isinstance(caught.value, ValueError)
    assert str(tmp_path / spec.split("{")[0]) in str(caught.value)


def test_expansion_on_s3(s3_bucket):
    names = ["x/data-000000.tar", "x/data-000001.tar", "x/y/data-000002.tar", "x/readme.md"]
    for name in names:
        put_bytes(f"{s3_bucket}/{name}", b"x")
    first, second, deep = (f"{s3_bucket}/{name}" for name in names[:3])

    assert expand_inputs([f"{s3_bucket}/x/data-{{000000..000001}}.tar"]) == [first, second]
    assert expand_inputs([f"{s3_bucket}/x/*.tar"]) == [first, second]
    assert expand_inputs([f"{s3_bucket}/x/**/*.tar"]) == [first, second, deep]
    assert expand_inputs([f"{s3_bucket}/x"]) == [first, second, deep]
    assert expand_inputs([second]) == [second]
    with pytest.raises(InputError, match=r"data-000002.tar does not exist \(4 missing\)"):
        expand_inputs([f"{s3_bucket}/x/data-{{000000..000005}}.tar"])
    with pytest.raises(InputError, match="does not exist"):
        expand_inputs([f"{s3_bucket}/nothing-here.tar"])


def test_url_to_fs(tmp_path, s3_bucket):
    fs, path = url_to_fs(f"file://{tmp_path}/a.tar")
    assert isinstance(fs, LocalFileSystem) and path == f"{tmp_path}/a.tar"
    fs, path = url_to_fs(f"{s3_bucket}/k/a.tar")
    assert fs.protocol[0] == "s3" and path == f"{s3_bucket.removeprefix('s3://')}/k/a.tar"


@pytest.mark.parametrize("base, parts, joined", [
    ("s3://b", ("x", "y.tar"), "s3://b/x/y.tar"),
    ("s3://b/", ("/x/", "y.tar"), "s3://b/x/y.tar"),
    ("/data/out", ("shards", "a.tar"), "/data/out/shards/a.tar"),
    ("/", ("a",), "/a"),
    ("rel", ("a",), "rel/a"),
    ("s3://b/x", (), "s3://b/x"),
])
def test_join_url(base, parts, joined):
    assert join_url(base, *parts) == joined


@pytest.mark.parametrize("url, stem", [
    ("s3://b/x/data-000001.tar", "data-000001"),
    ("/d/data.tar.gz", "data"),
    ("d/x.TGZ", "x"),
    ("https://h/p/s.tar?X-Amz-Signature=abc", "s"),
    ("a.b.tar", "a.b"),
])
def test_shard_stem(url, stem):
    assert shard_stem(url) == stem


def test_redact_userinfo_and_signed_queries(monkeypatch):
    for name in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID"):
        monkeypatch.delenv(name, raising=False)
    text = redact(
        "failed s3://AKIDEXAMPLE:wJal/rXUt+nF@bucket/k.tar and "
        "https://h.example/k.tar?X-Amz-Algorithm=AWS4&X-Amz-Credential=AKID%2F2024&"
        "X-Amz-Security-Token=FQoG&X-Amz-Signature=f00d&token=t0k&sig=5ig&part=3"
    )
    for secret in ("AKIDEXAMPLE", "wJal/rXUt+nF", "AKID%2F2024", "FQoG", "f00d", "t0k", "5ig"):
        assert secret not in text
    assert "s3://***@bucket/k.tar" in text
    assert "X-Amz-Algorithm=AWS4" in text and "part=3" in text
    assert redact("s3://user@bucket/k") == "s3://***@bucket/k"
    assert redact("aws_secret_access_key = abc123") == "aws_secret_access_key = ***"


def test_redact_keeps_plain_text():
    text = "shard s3://bucket/a/b.tar: 3 samples, http://127.0.0.1:5000/path ok"
    assert redact(text) == text


def test_redact_removes_secrets_from_the_environment(monkeypatch):
    secret = TEST_SECRET + "/with+specials"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    monkeypatch.setenv("AWS_SESSION_TOKEN", "session-token-value")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLEKEY")
    text = redact(f"key AKIAEXAMPLEKEY secret {secret} quoted {quote(secret, safe='')} token session-token-value")
    assert "AKIAEXAMPLEKEY" not in text and "session-token-value" not in text
    assert secret not in text and quote(secret, safe="") not in text and TEST_SECRET not in text
    assert text.count("***") == 4
    assert os.environ["AWS_SECRET_ACCESS_KEY"] == secret


def test_many_brace_names_in_one_directory_are_checked_with_one_listing(tmp_path):
    shards = _touch(tmp_path, *(f"s-{i:03d}.tar" for i in range(20)))
    assert expand_inputs([str(tmp_path / "s-{000..019}.tar")]) == shards
    with pytest.raises(InputError, match=r"s-020.tar does not exist \(2 missing\)"):
        expand_inputs([str(tmp_path / "s-{000..021}.tar")])


def test_a_folder_without_shards_gives_its_image_files(tmp_path):
    images = _touch(tmp_path, "photos/b.JPG", "photos/a.jpg", "photos/sub/c.png")
    _touch(tmp_path, "photos/notes.txt")
    assert expand_inputs([str(tmp_path / "photos")]) == [images[1], images[0], images[2]]
    assert expand_inputs([str(tmp_path / "photos" / "*.jpg")]) == [images[1]]
    assert expand_inputs([images[0]]) == [images[0]]
    shards = _touch(tmp_path, "photos/x.tar")  # a folder with shards gives its shards (previews beside them stay)
    assert expand_inputs([str(tmp_path / "photos")]) == shards


@pytest.mark.parametrize("spec, output", [
    ("IN", "IN/archive"),
    ("IN/", "IN"),
    ("IN/*.tar", "IN/sub/archive"),
    ("file://{root}/IN", "{root}/IN/archive"),
    ("s3://bucket/in", "s3://bucket/in/archive"),
    ("s3://bucket/in/**/*.jpg", "s3://bucket/in/x/archive"),
])
def test_an_output_inside_an_input_is_refused(tmp_path, monkeypatch, spec, output):
    monkeypatch.chdir(tmp_path)
    spec, output = spec.format(root=tmp_path), output.format(root=tmp_path)
    with pytest.raises(InputError, match="inside input .*choose an output outside the input"):
        check_output_outside_inputs([spec], output)


@pytest.mark.parametrize("spec, output", [
    ("IN", "INPUT/archive"),
    ("IN/data-{000..009}.tar", "IN/archive"),  # names its files one by one
    ("IN/a.tar", "out/archive"),
    ("s3://bucket/in", "s3://bucket/out"),
    ("s3://bucket/in", "IN/archive"),
])
def test_an_output_beside_the_inputs_is_accepted(tmp_path, monkeypatch, spec, output):
    monkeypatch.chdir(tmp_path)
    check_output_outside_inputs([spec], output)
