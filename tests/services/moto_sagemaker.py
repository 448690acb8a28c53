"""An AWS API (SageMaker, S3, STS, CloudWatch Logs) emulated by ``moto`` server on 127.0.0.1.

The SageMaker backend's tests drive the real ``sagemaker`` SDK (v3, ``ModelTrainer``)
against it. moto runs as its own process (``python -m moto.server``), the way a user would
run it, so the SDK talks HTTP exactly as it would to AWS. What moto does not keep, its
recorder does: :meth:`MotoServer.requests` returns the raw JSON bodies the SDK sent (moto
drops ``Environment`` and replaces ``MetricDefinitions`` in ``DescribeTrainingJob``).

Nothing may leave the machine: :func:`sagemaker_test_env` points every AWS client at the
server, uses dummy credentials, opts the SDK out of telemetry through a user config, and
sends any other HTTP(S) traffic to a dead loopback proxy.

Usage::

    with moto_server(tmp_path) as server:
        server.start_recording()
        os.environ.update(sagemaker_test_env(server.url, tmp_path))
        ...  # SDK calls
        sent = server.requests("SageMaker.CreateTrainingJob")
"""

from __future__ import annotations

import base64
import contextlib
import json
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REGION = "us-east-1"
ACCOUNT_ID = "123456789012"
"""moto's fixed account id (STS GetCallerIdentity)."""
ROLE_ARN = f"arn:aws:iam::{ACCOUNT_ID}:role/SageMakerTestRole"
DEAD_PROXY = "http://127.0.0.1:9"
"""Port 9 (discard) on loopback: nothing listens, so a request that escapes fails at once."""

TELEMETRY_OFF_CONFIG = """\
SchemaVersion: '1.0'
SageMaker:
  PythonSDK:
    Modules:
      TelemetryOptOut: true
"""
"""SageMaker SDK user config that disables its telemetry calls."""

_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class MotoServer:
    """A running moto server and helpers for its control API (``/moto-api``)."""

    url: str
    process: subprocess.Popen
    log_path: Path

    def call(self, path: str, method: str = "GET") -> bytes:
        """One request to the server's control API, bypassing any proxy."""
        request = urllib.request.Request(self.url + path, method=method, data=b"")
        with _NO_PROXY.open(request, timeout=10) as response:
            return response.read()

    def reset(self) -> None:
        """Forget every resource (jobs, buckets, logs) and every recorded request."""
        self.call("/moto-api/reset", "POST")
        self.call("/moto-api/recorder/reset-recording", "POST")

    def start_recording(self) -> None:
        self.call("/moto-api/recorder/reset-recording", "POST")
        self.call("/moto-api/recorder/start-recording", "POST")

    def recorded(self) -> list[dict[str, Any]]:
        """Every request since :meth:`start_recording`: method, url, target, body (bytes)."""
        entries = []
        for line in self.call("/moto-api/recorder/download-recording").decode().splitlines():
            entry = json.loads(line)
            headers = {k.lower(): v for k, v in entry["headers"].items()}
            body = entry.get("body") or ""
            raw = base64.b64decode(body) if entry.get("body_encoded") else body.encode()
            target = headers.get("x-amz-target", "")
            entries.append(
                {"method": entry["method"], "url": entry["url"], "target": target, "body": raw}
            )
        return entries

    def requests(self, target: str) -> list[dict[str, Any]]:
        """JSON bodies of the recorded requests whose ``X-Amz-Target`` is ``target``.

        ``target`` is e.g. ``SageMaker.CreateTrainingJob``; :meth:`start_recording` (the
        ``aws_env`` fixture) starts the capture.
        """
        return [json.loads(e["body"]) for e in self.recorded() if e["target"] == target]

    def _ready(self) -> bool:
        try:
            self.call("/moto-api/")
        except OSError:
            return False
        return True


@contextlib.contextmanager
def moto_server(work_dir: Path, timeout: float = 30.0) -> Iterator[MotoServer]:
    """Start ``moto.server`` on a free 127.0.0.1 port; stop it on exit."""
    port = free_port()
    log_path = work_dir / "moto_server.log"
    env = {
        "PATH": "/usr/bin:/bin",
        "MOTO_RECORDER_FILEPATH": str(work_dir / "moto_recording.jsonl"),
        "HTTP_PROXY": DEAD_PROXY,
        "HTTPS_PROXY": DEAD_PROXY,
        "NO_PROXY": "127.0.0.1,localhost",
    }
    command = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    server = MotoServer(url=f"http://127.0.0.1:{port}", process=process, log_path=log_path)
    try:
        _wait_ready(server, timeout)
        server.reset()
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _wait_ready(server: MotoServer, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not server._ready():
        if server.process.poll() is not None or time.monotonic() > deadline:
            log = server.log_path.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"moto server at {server.url} did not start:\n{log}")
        time.sleep(0.1)


def sagemaker_test_env(endpoint_url: str, work_dir: Path) -> dict[str, str]:
    """Environment that points AWS clients and the SageMaker SDK at ``endpoint_url`` only.

    No retries: moto's errors (HTTP 500 for what it does not implement) are deterministic.
    """
    config = work_dir / "sagemaker_config.yaml"
    config.write_text(TELEMETRY_OFF_CONFIG)
    missing = str(work_dir / "no-such-aws-file")
    return {
        "AWS_ENDPOINT_URL": endpoint_url,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_SESSION_TOKEN": "testing",
        "AWS_DEFAULT_REGION": REGION,
        "AWS_REGION": REGION,
        "AWS_CONFIG_FILE": missing,
        "AWS_SHARED_CREDENTIALS_FILE": missing,
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_MAX_ATTEMPTS": "1",
        "AWS_RETRY_MODE": "standard",
        "SAGEMAKER_ROLE": ROLE_ARN,
        "SAGEMAKER_VALIDATE_ROLE": "false",
        "SAGEMAKER_USER_CONFIG_OVERRIDE": str(config),
        "SAGEMAKER_ADMIN_CONFIG_OVERRIDE": str(config),
        "HTTP_PROXY": DEAD_PROXY,
        "HTTPS_PROXY": DEAD_PROXY,
        "http_proxy": DEAD_PROXY,
        "https_proxy": DEAD_PROXY,
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
    }
