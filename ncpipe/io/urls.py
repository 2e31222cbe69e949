"""Where shards are: expanding input specs into shard URLs, URL helpers, credential redaction.

A URL is a local path, ``file://...`` or any fsspec ``proto://...``. S3 credentials and
endpoints come from the standard AWS environment/config (botocore reads ``AWS_ENDPOINT_URL_S3``,
``AWS_ACCESS_KEY_ID``, ...); nothing here handles credentials, except keeping them out of text.
"""

from __future__ import annotations

import os
import posixpath
import re
from collections import defaultdict
from typing import Sequence
from urllib.parse import quote

import braceexpand
import fsspec
from fsspec.core import split_protocol

from ncpipe.errors import NcpipeError
from ncpipe.images import IMAGE_EXTENSIONS
from ncpipe.io.failures import classify

SHARD_SUFFIXES = (".tar.gz", ".tar.bz2", ".tar.xz", ".tgz", ".tar")
"""What a shard's name ends with; a directory spec picks up every file with one of these."""

_GLOB_CHARS = re.compile(r"[*?\[]")
_QUERY_PROTOCOLS = ("http", "https")  # URLs whose '?' begins a query string
_SECRET_ENV = (
    "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ACCESS_KEY_ID", "RAY_AUTH_TOKEN",
)
_MIN_SECRET_LEN = 4  # replacing shorter values would garble every message and protect nothing
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?:[^\s/@:]*:[^\s@]*|[^\s/@:]+)@")
_QUERY_PARAM = re.compile(r"(?P<head>[?&;](?P<name>[A-Za-z0-9_.-]+)=)(?P<value>[^&\s#\"'<>]*)")
_SECRET_PARAM_WORDS = ("sig", "token", "credential", "secret", "password", "passwd", "auth", "key")
_SECRET_ASSIGNMENT = re.compile(
    r"(?i)(?P<head>\b(?:aws_)?(?:secret_access_key|session_token|security_token)[\"']?\s*[:=]\s*[\"']?)"
    r"(?P<value>[^\s\"',;}]+)"
)
REDACTED = "***"
_LOOKUPS_BEFORE_LISTING = 16  # more brace-expanded names than this in one directory: list it once instead


class InputError(NcpipeError, ValueError):
    """An input spec names no shard (nothing matches, or a listed shard does not exist)."""


def url_to_fs(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and in-filesystem path of ``url`` (``fsspec.core.url_to_fs``)."""
    return fsspec.core.url_to_fs(url)


def join_url(base: str, *parts: str) -> str:
    """``base/part/...`` with single slashes, for local paths and ``proto://`` URLs alike."""
    pieces = [part.strip("/") for part in parts if part.strip("/")]
    if not base or not pieces:
        return "/".join(pieces) or base
    return "/".join([base.rstrip("/"), *pieces])


def shard_stem(url: str) -> str:
    """The shard's basename without its tar suffix: ``s3://b/x/data-000.tar.gz`` -> ``data-000``."""
    name = posixpath.basename(url.split("?", 1)[0].rstrip("/"))
    for suffix in SHARD_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def is_shard_name(path: str) -> bool:
    """Whether ``path`` ends with a shard suffix (``.tar``, ``.tar.gz``, ...)."""
    return path.lower().endswith(SHARD_SUFFIXES)


def is_image_name(path: str) -> bool:
    """Whether ``path`` names an image file (``.jpg``, ``.png``, ...): read as a one-image sample."""
    return posixpath.splitext(path.split("?", 1)[0])[1].lower().lstrip(".") in IMAGE_EXTENSIONS


def expand_inputs(specs: Sequence[str]) -> list[str]:
    """Shard URLs named by ``specs``: in spec order, sorted within a spec, without duplicates.

    A spec is a shard URL, a brace pattern (``data-{000000..000009}.tar``), a glob
    (``dir/*.tar``, ``s3://b/x/**/*.tar``) or a directory/prefix (every shard below it; every
    image file below it when it holds no shard). Image files come back as they are: the job
    groups them into shards (``ncpipe.io.image_files``).
    Local specs come back as absolute paths; others keep their protocol.
    """
    urls: dict[str, None] = {}
    for spec in specs:
        for url in _expand_reachable(spec):
            urls.setdefault(url, None)
    return list(urls)


def _expand_reachable(spec: str) -> list[str]:
    """``_expand_spec``, with storage failures named: fsspec's existence checks answer False when the
    store cannot be reached, so a remote location is first looked up once, and what fails is said."""
    try:
        if split_protocol(spec)[0] not in (None, "file", "local", *_QUERY_PROTOCOLS):
            _look_up(spec)
        return _expand_spec(spec)
    except InputError:
        raise
    except Exception as err:
        named = classify(err, f"input {redact(spec)}")
        if named is None:
            raise
        raise named from None


def _look_up(spec: str) -> None:
    """Raise what reaching ``spec``'s store raises; a missing object is no error here."""
    fs, path = url_to_fs(spec)
    try:
        fs.info(path)
    except FileNotFoundError as err:
        if classify(err, spec) is not None:  # a missing bucket: nothing below it can exist
            raise


def _expand_spec(spec: str) -> list[str]:
    if split_protocol(spec)[0] in _QUERY_PROTOCOLS and "?" in spec:
        # A signed URL names one object; its '?' starts the query (credentials), not a glob.
        # Not probed here: a URL signed for GET may refuse HEAD; a bad one becomes a shard error.
        return [spec]
    if "{" in spec or "}" in spec:
        return _expand_braces(spec)
    fs, path = url_to_fs(spec)
    if _GLOB_CHARS.search(path):
        matches = sorted(p for p, info in fs.glob(path, detail=True).items() if info["type"] == "file")
        if not matches:
            raise InputError(f"input {redact(spec)} matches no file")
        return [url_for(fs, p, spec) for p in matches]
    if fs.isdir(path):
        files = sorted(fs.find(path))
        # Shards if there are any (a folder of shards may hold previews beside them), else image files.
        found = [p for p in files if is_shard_name(p)] or [p for p in files if is_image_name(p)]
        if not found:
            raise InputError(f"input directory {redact(spec)} holds no shard ({', '.join(SHARD_SUFFIXES)}) "
                             f"and no image file (.{', .'.join(sorted(IMAGE_EXTENSIONS))})")
        return [url_for(fs, p, spec) for p in found]
    if not fs.isfile(path):
        raise InputError(f"input {redact(spec)} does not exist")
    return [url_for(fs, path, spec)]


def check_output_outside_inputs(specs: Sequence[str], output: str) -> None:
    """Refuse an output inside a directory, prefix or glob input: the next run would read it back in."""
    out_protocol, out_path = _location(output)
    for spec in specs:
        if "{" in spec or (split_protocol(spec)[0] in _QUERY_PROTOCOLS and "?" in spec):
            continue  # names files one by one: the output cannot match them
        protocol, path = _location(spec)
        base = _GLOB_CHARS.split(path, 1)[0].rsplit("/", 1)[0] if _GLOB_CHARS.search(path) else path
        if protocol == out_protocol and (out_path == base or out_path.startswith(base.rstrip("/") + "/")):
            raise InputError(f"output {redact(output)} is inside input {redact(spec)}: a later run would read "
                             "its own output back in; choose an output outside the input")


def _location(url: str) -> tuple[str, str]:
    """(protocol, normalised path): local paths and ``file://`` URLs made absolute."""
    protocol, path = split_protocol(url)
    if protocol in (None, "file", "local"):
        return "file", os.path.abspath(os.path.expanduser(path))
    return protocol, posixpath.normpath(path)


def _expand_braces(spec: str) -> list[str]:
    """Every expansion must exist (checked per directory: a listing rather than thousands of lookups)."""
    try:
        expanded = list(braceexpand.braceexpand(spec))
    except braceexpand.UnbalancedBracesError as err:
        raise InputError(f"input {redact(spec)}: {err}") from None
    urls: list[str] = []
    by_directory: dict[tuple[str, str], list[tuple[str, str]]] = defaultdict(list)
    for item in expanded:
        if _GLOB_CHARS.search(split_protocol(item)[1]):
            urls.extend(_expand_spec(item))
            continue
        fs, path = url_to_fs(item)
        by_directory[(split_protocol(item)[0] or "file", posixpath.dirname(path))].append((item, path))
    for (_, directory), items in by_directory.items():
        fs, _ = url_to_fs(items[0][0])
        files = _files_in(fs, directory, [path for _, path in items])
        missing = [item for item, path in items if path not in files]
        if missing:
            raise InputError(f"input {redact(spec)}: {redact(missing[0])} does not exist ({len(missing)} missing)")
        urls.extend(url_for(fs, path, item) for item, path in items)
    return sorted(urls)


def _files_in(fs: fsspec.AbstractFileSystem, directory: str, paths: list[str]) -> set[str]:
    """Which of ``paths`` (all in ``directory``) are files: one listing, or a few lookups if there are few."""
    if len(paths) <= _LOOKUPS_BEFORE_LISTING:
        return {path for path in paths if fs.isfile(path)}
    try:
        entries = fs.ls(directory, detail=True)
    except (FileNotFoundError, NotADirectoryError):
        return set()
    return {entry["name"].rstrip("/") for entry in entries if entry["type"] == "file"}


def url_for(fs: fsspec.AbstractFileSystem, path: str, like: str) -> str:
    """``path`` on ``fs`` as a URL in the style of ``like``: a plain path if ``like`` has no protocol."""
    if split_protocol(like)[0] is None:
        return path
    return fs.unstrip_protocol(path)


def redact(text: str) -> str:
    """``text`` without credentials: URL userinfo, secret-looking query values, AWS secrets from the env."""
    text = str(text)
    for name in _SECRET_ENV:
        value = os.environ.get(name, "")
        if len(value) >= _MIN_SECRET_LEN:
            for form in {value, quote(value, safe=""), quote(value, safe="/")}:
                text = text.replace(form, REDACTED)
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{REDACTED}@", text)
    text = _QUERY_PARAM.sub(_redact_param, text)
    return _SECRET_ASSIGNMENT.sub(lambda m: f"{m['head']}{REDACTED}", text)


def _redact_param(match: re.Match[str]) -> str:
    name = match["name"].lower()
    if any(word in name for word in _SECRET_PARAM_WORDS):
        return f"{match['head']}{REDACTED}"
    return match[0]
