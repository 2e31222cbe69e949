"""A development S3 endpoint on 127.0.0.1: moto in server mode, in memory, gone when it stops.

    .venv/bin/python infra/local/s3_dev_server.py --port 9000 --bucket dev --env-file out/s3-dev.env
    source out/s3-dev.env          # in the shell that runs ncpipe (before it starts Ray)
    ncpipe compress samples/shards -o s3://dev/archive

It binds to loopback only, accepts any credentials, and writes the AWS environment that points
ncpipe (botocore, through s3fs) at it. Ctrl-C or SIGTERM stops it. Needs moto[server]
(``pip install -e '.[test]'``).
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path

DEV_ENV = {
    "AWS_ACCESS_KEY_ID": "dev",
    "AWS_SECRET_ACCESS_KEY": "dev-secret-key",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def environment(endpoint: str) -> dict[str, str]:
    """The variables a shell needs to use the endpoint (and nothing from ~/.aws)."""
    return DEV_ENV | {
        "AWS_ENDPOINT_URL_S3": endpoint,
        "AWS_CONFIG_FILE": "/dev/null",
        "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=9000, help="port on 127.0.0.1 (0: a free one; default 9000)")
    parser.add_argument("--bucket", action="append", default=[], help="create this bucket (repeatable)")
    parser.add_argument("--env-file", type=Path, help="also write the export lines to this file")
    args = parser.parse_args(argv)

    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=args.port, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = environment(f"http://{host}:{port}")
    client = boto3.client(
        "s3", endpoint_url=env["AWS_ENDPOINT_URL_S3"], region_name=env["AWS_DEFAULT_REGION"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"], aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
    )
    for bucket in args.bucket:
        client.create_bucket(Bucket=bucket)
    exports = "".join(f"export {name}={value}\n" for name, value in env.items())
    if args.env_file:
        args.env_file.parent.mkdir(parents=True, exist_ok=True)
        args.env_file.write_text(exports)
    sys.stdout.write(exports)
    sys.stdout.flush()
    print(f"# S3 on {env['AWS_ENDPOINT_URL_S3']}, buckets: {', '.join(args.bucket) or 'none'}; Ctrl-C stops it",
          file=sys.stderr, flush=True)

    stopped = threading.Event()
    for number in (signal.SIGINT, signal.SIGTERM):
        signal.signal(number, lambda *_: stopped.set())
    stopped.wait()
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
