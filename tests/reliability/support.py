"""Test support for the reliability tests: an S3 front that fails on demand."""

from __future__ import annotations

import logging
import re
import threading
from dataclasses import dataclass

FAULT_SECRET = "fault-secret-value-0123456789"
FAULT_ACCESS_KEY_ID = "fault-access-key-id-AKIA0123"
log = logging.getLogger(__name__)


@dataclass
class _Rule:
    method: str
    path: re.Pattern
    status: int
    code: str
    times: int | None  # None: every time


class FaultInjector:
    """WSGI middleware in front of moto: matching requests get an S3 error instead of an answer."""

    def __init__(self, app):
        self.app = app
        self.rules: list[_Rule] = []
        self.requests: list[tuple[str, str, int | None]] = []  # (method, path, injected status or None)
        self.lock = threading.Lock()

    def fail(self, method: str, path_pattern: str, status: int, code: str, times: int | None = None) -> None:
        with self.lock:
            self.rules.append(_Rule(method, re.compile(path_pattern), status, code, times))

    def clear(self) -> None:
        with self.lock:
            self.rules.clear()

    def puts(self, pattern: str) -> list[int | None]:
        """Injected statuses (None: passed to S3) of the PUTs whose path matches ``pattern``."""
        return [status for method, path, status in self.requests if method == "PUT" and re.search(pattern, path)]

    def __call__(self, environ, start_response):
        method, path = environ["REQUEST_METHOD"], environ.get("PATH_INFO", "")
        with self.lock:
            rule = next((r for r in self.rules if r.method == method and r.path.search(path)), None)
            if rule is not None and rule.times is not None:
                rule.times -= 1
                if rule.times == 0:
                    self.rules.remove(rule)
            self.requests.append((method, path, rule.status if rule else None))
        if rule is None:
            return self.app(environ, start_response)
        length = int(environ.get("CONTENT_LENGTH") or 0)
        if length:
            environ["wsgi.input"].read(length)
        # The message names the caller's access key id, as real S3 errors can: it must be redacted.
        authorization = environ.get("HTTP_AUTHORIZATION", "")
        body = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{rule.code}</Code>'
                f"<Message>{rule.code}: injected failure for {authorization[:80]}</Message>"
                "<RequestId>0</RequestId></Error>")
        start_response(f"{rule.status} Injected", [("Content-Type", "application/xml"),
                                                    ("Content-Length", str(len(body)))])
        return [body.encode()]


@dataclass
class FaultyS3:
    endpoint: str
    bucket: str  # s3://<bucket>
    faults: FaultInjector
    env: dict[str, str]  # what a worker process needs to reach this server


