"""Storage failures told apart: endpoint unreachable, credentials missing or refused, access denied,
bucket or object missing. Each is an :class:`NcpipeError` (and the builtin ``OSError`` kind callers
already handle) whose one-line message names the location and what to do.

Error types are recognised by name, so that botocore and aiohttp are not imported to check them.
"""

from __future__ import annotations

import os
from typing import Iterator

from ncpipe.errors import NcpipeError

_NO_CREDENTIALS = frozenset({"NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError",
                             "NoAuthTokenError"})
_REFUSED_CREDENTIALS = frozenset({"InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken",
                                  "TokenRefreshRequired", "AuthFailure", "UnrecognizedClientException"})
_DENIED = frozenset({"AccessDenied", "AllAccessDisabled", "Forbidden", "403"})
_UNREACHABLE = frozenset({"EndpointConnectionError", "ConnectTimeoutError", "ConnectionClosedError",
                          "ClientConnectorError", "ServerDisconnectedError", "ConnectionRefusedError",
                          "gaierror"})
_ENDPOINT_ENV = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
_CREDENTIAL_SOURCES = ("set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE, or run where an "
                       "instance or pod role applies")


class StorageError(NcpipeError, OSError):
    """A storage operation failed (message redacted)."""


class StorageUnreachableError(StorageError, ConnectionError):
    """No connection to the storage endpoint."""


class CredentialsError(StorageError, PermissionError):
    """No credentials were found, or the store refused them."""


class AccessDeniedError(StorageError, PermissionError):
    """The credentials in use may not do this."""


class BucketMissingError(StorageError, FileNotFoundError):
    """The bucket named in a URL does not exist."""


def classify(err: BaseException, where: str) -> StorageError | None:
    """``err`` as one of the errors above, its message starting with ``where`` (what was being done, the
    URL's credentials already redacted: ``input s3://b/x``), or None when it is none of them."""
    for cause in _chain(err):
        name, code = type(cause).__name__, _error_code(cause)
        if name in _NO_CREDENTIALS:
            return CredentialsError(f"{where}: no storage credentials found: {_CREDENTIAL_SOURCES}")
        if code in _REFUSED_CREDENTIALS:
            return CredentialsError(f"{where}: the store refused the credentials ({code}): check AWS_ACCESS_KEY_ID/"
                                    "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) and that they belong to this endpoint")
        if code in _DENIED:
            return AccessDeniedError(f"{where}: access denied ({code}): the credentials in use may not do this; "
                                     "check the bucket policy or role, or use other credentials (AWS_PROFILE)")
        if code == "NoSuchBucket":
            return BucketMissingError(f"{where}: no such bucket at endpoint {_endpoint(cause)}: check the URL "
                                      "and AWS_ENDPOINT_URL_S3")
        if name in _UNREACHABLE:
            return StorageUnreachableError(f"{where}: cannot connect to the storage endpoint {_endpoint(cause)}: "
                                           "check that it is running and AWS_ENDPOINT_URL_S3 (or the network)")
    return None


def _chain(err: BaseException) -> Iterator[BaseException]:
    """``err`` and its causes (s3fs wraps a botocore error as the ``__cause__`` of an OSError)."""
    current: BaseException | None = err
    for _ in range(8):
        if current is None:
            return
        yield current
        current = current.__cause__ or current.__context__


def _error_code(err: BaseException) -> str:
    response = getattr(err, "response", None)
    if isinstance(response, dict):  # botocore ClientError
        error = response.get("Error", {})
        return str(error.get("Code", "") or response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
    return ""


def _endpoint(err: BaseException) -> str:
    """The endpoint tried, as ``scheme://host:port`` (no user information, path or query)."""
    kwargs = getattr(err, "kwargs", None)  # botocore errors keep their message fields here
    endpoint = kwargs.get("endpoint_url") if isinstance(kwargs, dict) else None
    endpoint = endpoint or next((os.environ[name] for name in _ENDPOINT_ENV if os.environ.get(name)), None)
    if not endpoint:
        return "(the AWS default)"
    scheme, _, rest = str(endpoint).partition("://")
    return f"{scheme}://{rest.split('/', 1)[0].rsplit('@', 1)[-1]}" if rest else str(endpoint)
