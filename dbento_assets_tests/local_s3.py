"""A local S3 server for tests: moto's server mode on 127.0.0.1, reached only through the
standard AWS environment variables, as a user of an S3-compatible store would configure it.

:class:`LocalS3` can also be told to refuse every upload (HTTP 403 AccessDenied) to prove
that a failed upload leaves the previous object as it was. :func:`running_s3` starts one,
points ``AWS_*`` at it for the block and creates a bucket. Import this module only after
``pytest.importorskip("moto.moto_server.threaded_moto_server")``.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

import boto3
import pytest
import requests
import s3fs
from moto.moto_server.threaded_moto_server import MotoRequestHandler, ThreadedMotoServer
from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
from werkzeug.serving import make_server

REJECTED = b"""<?xml version="1.0" encoding="UTF-8"?>
<Error><Code>AccessDenied</Code><Message>Access Denied</Message></Error>"""


class LocalS3(ThreadedMotoServer):
    """moto's S3 server on 127.0.0.1 that can be told to refuse every upload (HTTP 403)."""

    def __init__(self) -> None:
        super().__init__(ip_address="127.0.0.1", port=0, verbose=False)
        self.refuse_uploads = False
        self.uploads = 0

    def _server_entry(self) -> None:
        app = DomainDispatcherApplication(create_backend_app)

        def guarded(environ, start_response):
            if environ["REQUEST_METHOD"] in ("PUT", "POST") and environ["PATH_INFO"].count("/") > 1:
                self.uploads += 1
                if self.refuse_uploads:
                    start_response("403 Forbidden", [("Content-Type", "application/xml")])
                    return [REJECTED]
            return app(environ, start_response)

        self._server = make_server(
            self._ip_address, self._port, guarded, True, request_handler=MotoRequestHandler
        )
        self._server_ready_event.set()
        self._server.serve_forever()

    @property
    def endpoint(self) -> str:
        host, port = self.get_host_and_port()
        return f"http://{host}:{port}"


def aws_env(endpoint: str) -> dict[str, str]:
    """What a user puts in .env to use an S3-compatible server."""
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "test-key",
        "AWS_SECRET_ACCESS_KEY": "test-secret",
        "AWS_DEFAULT_REGION": "us-east-1",
        # Keep the machine's own AWS settings out of the test.
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        "AWS_EC2_METADATA_DISABLED": "true",
    }


@contextlib.contextmanager
def running_s3(bucket: str) -> Iterator[LocalS3]:
    """A started :class:`LocalS3` with ``bucket`` created and ``AWS_*`` pointing at it."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = LocalS3()
    server.start()
    # moto keeps its buckets in process-wide state: start every server empty.
    requests.post(f"{server.endpoint}/moto-api/reset", timeout=10).raise_for_status()
    with pytest.MonkeyPatch.context() as mp:
        for name in [n for n in os.environ if n.startswith("AWS_")]:
            mp.delenv(name)
        for name, value in aws_env(server.endpoint).items():
            mp.setenv(name, value)
        s3fs.S3FileSystem.clear_instance_cache()
        boto3.client("s3").create_bucket(Bucket=bucket)
        try:
            yield server
        finally:
            s3fs.S3FileSystem.clear_instance_cache()
            server.stop()


def objects(bucket: str, prefix: str) -> dict[str, bytes]:
    """Every object under ``bucket/prefix/``, read with boto3 (no s3fs cache in the way)."""
    client = boto3.client("s3")
    listing = client.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/").get("Contents", [])
    return {
        item["Key"].removeprefix(f"{prefix}/"): client.get_object(Bucket=bucket, Key=item["Key"])[
            "Body"
        ].read()
        for item in listing
    }
