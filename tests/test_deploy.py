"""The deployment files in cluster/ are rendered by the tools that consume them.

- the gateway server config is loaded by dask-gateway-server's own config machinery,
  its options go through the backend's own option processing, and the same file runs
  a real server on loopback whose idle timeout stops an abandoned cluster;
- the Helm values' extraConfig, run the way the chart runs it, agrees with it;
- the Slurm configs render job scripts with dask-jobqueue;
- the Kubernetes resources are validated against the dask operator's CRD schemas and
  rendered into Deployments with the operator's own functions;
- the image installs exactly the pinned requirements, which are complete and are the
  versions installed here.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import gc
import importlib.metadata as md
import importlib.resources
import os
import re
import shlex
import socket
import subprocess
import sys
import time
import tomllib
import urllib.request
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
GATEWAY_PY = CLUSTER / "gateway" / "dask_gateway_config.py"
VALUES = CLUSTER / "gateway" / "values.yaml"
K8S = CLUSTER / "kubernetes" / "daskcluster.yaml"
SLURM = CLUSTER / "slurm" / "jobqueue.yaml"
SLURM_GPU = CLUSTER / "slurm" / "jobqueue-gpu.yaml"
DOCKERFILE = CLUSTER / "Dockerfile"
REQUIREMENTS = CLUSTER / "requirements.txt"

#: extras of aether-scale that the image carries (cluster/requirements.txt's header)
IMAGE_EXTRAS = ("gateway", "cloud")
#: image dependencies deliberately left unpinned (not installed where the tests run)
UNPINNED = {"gcsfs"}

GIB = 2**30


# --------------------------------------------------------------------------------------
# Dask Gateway: cluster/gateway/dask_gateway_config.py and values.yaml
# --------------------------------------------------------------------------------------

def _clean_aether_env(monkeypatch):
    for k in list(os.environ):
        if k.startswith("AETHER_GATEWAY_") or k in ("AETHER_IMAGE", "AETHER_CUDA_IMAGE"):
            monkeypatch.delenv(k)


def _load_gateway(path, monkeypatch, env=None):
    """The config file as dask-gateway-server loads it (DaskGateway.load_config_file)."""
    app_mod = pytest.importorskip("dask_gateway_server.app", reason="install the 'dev' extra")
    _clean_aether_env(monkeypatch)
    for k, v in (env or {}).items():
        monkeypatch.setenv(k, v)
    app = app_mod.DaskGateway()
    app.load_config_file(str(path))
    return app


def _cluster_config(app, request):
    """The per-cluster config the server would build for ``request`` (the options a
    client sends): the backend's own process_cluster_options, handler included."""
    from dask_gateway_server.models import User

    backend = app.backend_class(parent=app, log=app.log)
    _, config = asyncio.run(backend.process_cluster_options(User("alice"), request))
    return config


def test_gateway_config_defaults_are_production_shaped(monkeypatch):
    app = _load_gateway(GATEWAY_PY, monkeypatch)
    cfg = app.config
    assert cfg.DaskGateway.backend_class == "dask_gateway_server.backends.local.LocalBackend"
    assert cfg.DaskGateway.authenticator_class.endswith("JupyterHubAuthenticator")
    assert cfg.DaskGateway.address.startswith("127.0.0.1:")  # private API on loopback
    assert (cfg.Proxy.address, cfg.Proxy.tcp_address) == (":8000", ":8786")
    assert cfg.ClusterConfig.scheduler_cmd == ["dask", "scheduler"]
    assert cfg.ClusterConfig.worker_cmd == ["dask", "worker"]
    assert cfg.ClusterConfig.idle_timeout > 0
    assert app.backend_class.__name__ == "LocalBackend"


def test_gateway_config_refuses_simple_auth_without_password(monkeypatch):
    # SimpleAuthenticator with no password accepts anyone: the file must not allow it
    with pytest.raises(ValueError, match="AETHER_GATEWAY_PASSWORD"):
        _load_gateway(GATEWAY_PY, monkeypatch, {"AETHER_GATEWAY_AUTH": "simple"})


def test_gateway_config_env_overrides(monkeypatch, tmp_path):
    app = _load_gateway(GATEWAY_PY, monkeypatch, {
        "AETHER_GATEWAY_BACKEND": "unsafe-local",
        "AETHER_GATEWAY_AUTH": "simple",
        "AETHER_GATEWAY_PASSWORD": "pw",
        "AETHER_GATEWAY_HTTP_ADDRESS": "127.0.0.1:1234",
        "AETHER_GATEWAY_TCP_ADDRESS": "127.0.0.1:1235",
        "AETHER_GATEWAY_SCHEDULER_CMD": "/opt/venv/bin/dask scheduler",
        "AETHER_GATEWAY_WORKER_CMD": "'/opt/my venv/bin/dask' worker",
        "AETHER_GATEWAY_IDLE_TIMEOUT": "5",
        "AETHER_GATEWAY_MAX_WORKERS": "3",
        "AETHER_GATEWAY_CLUSTERS_DIR": str(tmp_path),
    })
    cfg = app.config
    assert app.backend_class.__name__ == "UnsafeLocalBackend"
    assert cfg.SimpleAuthenticator.password == "pw"
    assert (cfg.Proxy.address, cfg.Proxy.tcp_address) == ("127.0.0.1:1234", "127.0.0.1:1235")
    assert cfg.ClusterConfig.scheduler_cmd == ["/opt/venv/bin/dask", "scheduler"]
    assert cfg.ClusterConfig.worker_cmd == ["/opt/my venv/bin/dask", "worker"]
    assert cfg.LocalBackend.clusters_directory == str(tmp_path)
    c = _cluster_config(app, {})
    assert (c.idle_timeout, c.cluster_max_workers) == (5.0, 3)


def test_gateway_options_on_a_local_backend(monkeypatch):
    app = _load_gateway(GATEWAY_PY, monkeypatch, {"AETHER_GATEWAY_BACKEND": "unsafe-local"})
    c = _cluster_config(app, {})  # defaults: 2 cores, 8 GiB, no GPU
    assert (c.worker_cores, c.worker_threads, c.worker_memory) == (2, 2, 8 * GIB)
    assert c.worker_cmd == ["dask", "worker"]
    assert c.idle_timeout == 3600
    assert c.cluster_max_workers == 64
    c = _cluster_config(app, {"worker_cores": 16, "worker_memory": 32, "gpu": True})
    assert (c.worker_cores, c.worker_threads, c.worker_memory) == (16, 16, 32 * GIB)
    assert c.worker_cmd == ["dask", "worker", "--resources", "GPU=1"]
    # the core cap (257, scheduler included) allows (257 - 1) // 16 workers of 16 cores
    assert c.cluster_max_workers == 16
    assert not c.has_trait("image")  # the local backend runs no images


def test_gateway_options_are_bounded(monkeypatch):
    from dask_gateway_server.backends.base import PublicException

    app = _load_gateway(GATEWAY_PY, monkeypatch, {"AETHER_GATEWAY_BACKEND": "unsafe-local"})
    for bad in ({"worker_cores": 64}, {"worker_memory": 1}, {"workers": 3}):
        with pytest.raises(PublicException):
            _cluster_config(app, bad)


def _kube_samples():
    return [
        {},
        {"worker_cores": 4, "worker_memory": 16},
        {"worker_cores": 4, "worker_memory": 16, "gpu": True},
        {"image": "registry.example/aether:dev", "gpu": True},
    ]


def test_gateway_options_on_kubernetes(monkeypatch):
    pytest.importorskip("kubernetes_asyncio", reason="the kubernetes backend needs it")
    from dask_gateway_server.backends.kubernetes.controller import KubeController

    app = _load_gateway(GATEWAY_PY, monkeypatch, {"AETHER_GATEWAY_BACKEND": "kubernetes"})
    assert app.backend_class.__name__ == "KubeBackend"
    cpu = _cluster_config(app, {})
    assert cpu.image == "ghcr.io/your-org/aether-scale:0.1.0"
    assert cpu.worker_extra_container_config == {}
    gpu = _cluster_config(app, {"worker_cores": 4, "worker_memory": 16, "gpu": True})
    assert gpu.image == "ghcr.io/your-org/aether-scale:0.1.0-cuda"  # CUDA torch for GPUs
    assert _cluster_config(app, {"image": "x/y:z", "gpu": True}).image == "x/y:z"
    # the worker pod as the gateway's kube-controller renders it
    pod = KubeController(config=app.config).make_pod("aether", "c1", gpu, is_worker=True)
    (container,) = pod["spec"]["containers"]
    assert container["image"] == gpu.image
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["resources"]["requests"] == {"cpu": "4.000", "memory": str(16 * GIB)}
    assert container["resources"]["limits"]["cpu"] == "4.000"
    assert container["args"][:4] == ["dask", "worker", "--resources", "GPU=1"]
    assert container["args"][container["args"].index("--nthreads") + 1] == "4"
    assert {"name": "HF_HUB_OFFLINE", "value": "1"} in container["env"]
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["spec"]["tolerations"])


#: gateway.backend keys of the dask-gateway chart -> the KubeClusterConfig trait the
#: chart's generated config sets from each (templates/gateway/configmap.yaml)
CHART_BACKEND_FIELDS = {
    ("scheduler", "cores", "request"): "scheduler_cores",
    ("scheduler", "cores", "limit"): "scheduler_cores_limit",
    ("scheduler", "memory", "request"): "scheduler_memory",
    ("scheduler", "memory", "limit"): "scheduler_memory_limit",
    ("scheduler", "extraContainerConfig"): "scheduler_extra_container_config",
    ("scheduler", "extraPodConfig"): "scheduler_extra_pod_config",
    ("worker", "cores", "request"): "worker_cores",
    ("worker", "cores", "limit"): "worker_cores_limit",
    ("worker", "memory", "request"): "worker_memory",
    ("worker", "memory", "limit"): "worker_memory_limit",
    ("worker", "threads"): "worker_threads",
    ("worker", "extraContainerConfig"): "worker_extra_container_config",
    ("worker", "extraPodConfig"): "worker_extra_pod_config",
    ("image", "pullPolicy"): "image_pull_policy",
    ("environment",): "environment",
    ("namespace",): "namespace",
}
CHART_GATEWAY_KEYS = {"replicas", "annotations", "resources", "prefix", "loglevel", "image",
                      "imagePullSecrets", "service", "auth", "livenessProbe", "readinessProbe",
                      "backend", "nodeSelector", "affinity", "tolerations", "extraConfig"}
AUTH_CLASSES = {"simple": "SimpleAuthenticator", "kerberos": "KerberosAuthenticator",
                "jupyterhub": "JupyterHubAuthenticator"}


def _leaf_paths(d, prefix=()):
    for k, v in d.items():
        if isinstance(v, dict) and v and k not in ("environment", "extraContainerConfig",
                                                   "extraPodConfig"):
            yield from _leaf_paths(v, (*prefix, k))
        else:
            yield (*prefix, k)


def _chart_config_file(values: dict, tmp_path: Path) -> Path:
    """The dask_gateway_config.py the chart generates from ``values``, for the parts
    these values use: backend class and image, forwarded backend fields, auth, then
    gateway.extraConfig's code blocks in key order."""
    gw = values["gateway"]
    assert set(gw) <= CHART_GATEWAY_KEYS, set(gw) - CHART_GATEWAY_KEYS
    backend = gw.get("backend", {})
    unknown = [p for p in _leaf_paths(backend) if p not in CHART_BACKEND_FIELDS
               and p not in (("image", "name"), ("image", "tag"), ("imagePullSecrets",))]
    assert not unknown, f"gateway.backend keys the chart does not forward: {unknown}"
    lines = [
        'c.DaskGateway.backend_class = "dask_gateway_server.backends.kubernetes.KubeBackend"',
        'c.KubeBackend.gateway_instance = "aether-gateway"',
        'c.KubeController.gateway_instance = "aether-gateway"',
        'c.KubeBackend.api_url = "http://api-aether-gateway.aether:8000/api"',
    ]
    image = backend.get("image", {})
    if image.get("name"):
        ref = f"{image['name']}:{image['tag']}" if image.get("tag") else image["name"]
        lines.append(f"c.KubeClusterConfig.image = {ref!r}")
    for path, trait in CHART_BACKEND_FIELDS.items():
        value = backend
        for k in path:
            value = value.get(k) if isinstance(value, dict) else None
        if value is not None:
            lines.append(f"c.KubeClusterConfig.{trait} = {value!r}")
    auth = gw.get("auth", {}).get("type", "simple")
    lines.append(f'c.DaskGateway.authenticator_class = '
                 f'"dask_gateway_server.auth.{AUTH_CLASSES[auth]}"')
    extra = gw.get("extraConfig", {})
    blocks = [extra] if isinstance(extra, str) else [extra[k] for k in sorted(extra)]
    path = tmp_path / "dask_gateway_config.py"
    path.write_text("\n".join(lines) + "\n\n" + "\n\n".join(blocks))
    return path


#: the per-cluster settings both deployments must agree on
AGREED_FIELDS = ("image", "worker_cores", "worker_cores_limit", "worker_threads",
                 "worker_memory", "worker_memory_limit", "worker_cmd", "scheduler_cmd",
                 "worker_extra_container_config", "worker_extra_pod_config", "idle_timeout",
                 "cluster_max_workers", "cluster_max_cores", "cluster_max_memory",
                 "scheduler_cores", "scheduler_memory", "environment")


def test_helm_values_agree_with_the_server_config(monkeypatch, tmp_path):
    pytest.importorskip("kubernetes_asyncio", reason="the kubernetes backend needs it")
    from dask_gateway_server.backends.kubernetes.controller import KubeController

    values = yaml.safe_load(VALUES.read_text())
    assert values["gateway"]["auth"]["type"] in AUTH_CLASSES
    chart = _load_gateway(_chart_config_file(values, tmp_path), monkeypatch)
    ours = _load_gateway(GATEWAY_PY, monkeypatch, {"AETHER_GATEWAY_BACKEND": "kubernetes"})
    assert chart.backend_class is ours.backend_class
    spec = chart.config.Backend.cluster_options.get_specification()
    assert spec == ours.config.Backend.cluster_options.get_specification()
    assert [f["field"] for f in spec] == ["worker_cores", "worker_memory", "image", "gpu"]
    for request in _kube_samples():
        a, b = _cluster_config(chart, request), _cluster_config(ours, request)
        for field in AGREED_FIELDS:
            assert getattr(a, field) == getattr(b, field), (request, field)
    # a worker asking for more than the chart's defaults keeps limit >= request
    gpu = _cluster_config(chart, {"worker_cores": 4, "worker_memory": 16, "gpu": True})
    pod = KubeController(config=chart.config).make_pod("aether", "c1", gpu, is_worker=True)
    res = pod["spec"]["containers"][0]["resources"]
    assert float(res["limits"]["cpu"]) >= float(res["requests"]["cpu"]) == 4.0
    assert int(res["limits"]["memory"]) >= int(res["requests"]["memory"]) == 16 * GIB
    assert res["limits"]["nvidia.com/gpu"] == 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.gateway
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_gateway_config_runs_on_loopback_and_stops_abandoned_clusters(tmp_path):
    """The same file runs a real server (env overrides only); a cluster whose client
    goes away without shutting it down is stopped by the idle timeout."""
    pytest.importorskip("dask_gateway_server", reason="install the 'dev' extra")
    from dask_gateway import BasicAuth, Gateway

    bindir = Path(sys.executable).parent
    http, tcp = _free_port(), _free_port()
    dask_exe = shlex.quote(str(bindir / "dask"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("AETHER_GATEWAY_")}
    env.update({
        "AETHER_GATEWAY_BACKEND": "unsafe-local",
        "AETHER_GATEWAY_AUTH": "simple",
        "AETHER_GATEWAY_PASSWORD": "s3cret",
        "AETHER_GATEWAY_HTTP_ADDRESS": f"127.0.0.1:{http}",
        "AETHER_GATEWAY_TCP_ADDRESS": f"127.0.0.1:{tcp}",
        "AETHER_GATEWAY_API_ADDRESS": f"127.0.0.1:{_free_port()}",
        "AETHER_GATEWAY_SCHEDULER_CMD": f"{dask_exe} scheduler",
        "AETHER_GATEWAY_WORKER_CMD": f"{dask_exe} worker",
        "AETHER_GATEWAY_CLUSTERS_DIR": str(tmp_path / "clusters"),
        "AETHER_GATEWAY_IDLE_TIMEOUT": "2",
    })
    exe = bindir / "dask-gateway-server"
    log_path = tmp_path / "gateway.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([str(exe), "-f", str(GATEWAY_PY)], stdout=log,
                                stderr=subprocess.STDOUT, cwd=tmp_path, env=env)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{http}/api/health",
                                            timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail("dask-gateway-server did not start:\n" + log_path.read_text())
            time.sleep(0.2)
        kw = {"address": f"http://127.0.0.1:{http}", "proxy_address": f"gateway://127.0.0.1:{tcp}"}
        with Gateway(**kw, auth=BasicAuth("mallory", "guess")) as intruder:
            with pytest.raises(Exception, match="(?i)unauthorized|401"):
                intruder.list_clusters()
        with Gateway(**kw, auth=BasicAuth("alice", "s3cret")) as gw:
            opts = gw.cluster_options()
            assert list(opts) == ["worker_cores", "worker_memory", "image", "gpu"]
            assert (opts.worker_cores, opts.worker_memory, opts.gpu) == (2, 8.0, False)
            cluster = gw.new_cluster(worker_cores=1, worker_memory=2, shutdown_on_close=False)
            name = cluster.name
            assert name in [c.name for c in gw.list_clusters()]
            cluster.close()  # the client goes away, as a crashed one would
            del cluster
            gc.collect()  # (dask-gateway's Gateway.__del__ fails on a closed client)
            deadline = time.monotonic() + 30
            while name in [c.name for c in gw.list_clusters()]:
                if time.monotonic() > deadline:
                    gw.stop_cluster(name)
                    pytest.fail("the idle timeout did not stop the abandoned cluster")
                time.sleep(0.25)
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()


# --------------------------------------------------------------------------------------
# Slurm: cluster/slurm/jobqueue*.yaml
# --------------------------------------------------------------------------------------

def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key))
        else:
            out[key] = v
    return out


def _job_script(path: Path, monkeypatch, tmp_path) -> tuple[dict, str]:
    """The job script SLURMCluster() writes with ``path`` as the dask config (each key
    set over jobqueue's defaults, as dask merges a user config file)."""
    pytest.importorskip("dask_jobqueue", reason="install the 'hpc' extra")
    import dask
    from dask_jobqueue import SLURMCluster

    conf = yaml.safe_load(path.read_text())
    monkeypatch.chdir(tmp_path)  # jobqueue creates log-directory where it runs
    with dask.config.set(_flatten(conf)):
        # the scheduler it starts stays on loopback
        with SLURMCluster(scheduler_options={"host": "127.0.0.1", "dashboard_address": ":0"}) as cl:
            script = cl.job_script()
    return conf["jobqueue"]["slurm"], script


def _seconds(text: str) -> float:
    import dask.utils

    if re.fullmatch(r"\d+:\d\d:\d\d", text):
        h, m, s = map(int, text.split(":"))
        return h * 3600 + m * 60 + s
    return dask.utils.parse_timedelta(text)


def _check_job_script(conf: dict, script: str) -> list[str]:
    import dask.utils

    directives = [ln.removeprefix("#SBATCH ").strip() for ln in script.splitlines()
                  if ln.startswith("#SBATCH")]
    assert f"--cpus-per-task={conf['cores']}" in directives
    mem_g = -(-dask.utils.parse_bytes(conf["memory"]) // 2**30)  # jobqueue rounds up to GiB
    assert f"--mem={mem_g}G" in directives
    assert f"-t {conf['walltime']}" in directives
    for extra in conf["job-extra-directives"]:
        assert extra in directives
    lines = script.splitlines()
    (worker,) = [i for i, ln in enumerate(lines) if "distributed.cli.dask_worker" in ln]
    activate = [i for i, ln in enumerate(lines) if "bin/activate" in ln]
    assert activate and activate[0] < worker, "the venv must be active before the worker starts"
    cmd = shlex.split(lines[worker], posix=False)
    # the venv's python, not this test's interpreter
    assert cmd[:3] == ["python", "-m", "distributed.cli.dask_worker"]
    threads = conf["cores"] // conf["processes"]
    assert cmd[cmd.index("--nthreads") + 1] == str(threads)
    if conf["processes"] > 1:
        assert cmd[cmd.index("--nworkers") + 1] == str(conf["processes"])
    assert cmd[cmd.index("--local-directory") + 1] == "$TMPDIR"
    # workers retire before the walltime kills them, stagger included
    life = _seconds(cmd[cmd.index("--lifetime") + 1])
    stagger = _seconds(cmd[cmd.index("--lifetime-stagger") + 1])
    assert life + stagger < _seconds(conf["walltime"])
    return directives


def test_slurm_job_script(monkeypatch, tmp_path):
    conf, script = _job_script(SLURM, monkeypatch, tmp_path)
    directives = _check_job_script(conf, script)
    assert "--cpus-per-task=8" in directives and "-t 04:00:00" in directives
    assert "--mem=32G" in directives
    assert not any("gres" in d for d in directives)
    assert "--nthreads 2" in script and "--memory-limit 8.00GiB" in script
    assert 'source "${AETHER_VENV:-$HOME/aether-scale/.venv}/bin/activate"' in script


def test_slurm_gpu_job_script(monkeypatch, tmp_path):
    conf, script = _job_script(SLURM_GPU, monkeypatch, tmp_path)
    directives = _check_job_script(conf, script)
    assert "--gres=gpu:1" in directives
    assert conf["processes"] == 1  # one process owns the GPU
    assert "--resources GPU=1" in script
    assert "bin/activate" in script


# --------------------------------------------------------------------------------------
# Kubernetes: cluster/kubernetes/daskcluster.yaml against the dask operator
# --------------------------------------------------------------------------------------

@functools.cache
def _crd(kind: str) -> dict:
    """The operator's CRD for ``kind``, with its full openAPIV3Schema, as shipped in
    dask-kubernetes (the operator Helm chart's crds/, one file per kind)."""
    pytest.importorskip("dask_kubernetes", reason="install the 'kubernetes' extra")
    path = (importlib.resources.files("dask_kubernetes.operator") / "deployment" / "helm"
            / "dask-kubernetes-operator" / "crds" / f"{kind.lower()}.yaml")
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the schemas are large
    crd = yaml.load(path.read_text(), Loader=loader)
    assert crd["spec"]["names"]["kind"] == kind
    return crd


def _schema_errors(value, schema: dict, path: str = "$") -> list[str]:
    """Where ``value`` breaks an OpenAPI v3 structural schema as the API server reads
    it (types, required, enums, patterns; unknown fields are errors, as kubectl's
    strict validation makes them). None counts as absent."""
    if value is None:
        return []
    if schema.get("x-kubernetes-int-or-string"):
        if isinstance(value, bool) or not isinstance(value, int | str):
            return [f"{path}: int or string expected, got {value!r}"]
        if isinstance(value, str) and "pattern" in schema and not re.search(schema["pattern"], value):
            return [f"{path}: {value!r} does not match {schema['pattern']}"]
        return []
    if "anyOf" in schema:
        if all(_schema_errors(value, s, path) for s in schema["anyOf"]):
            return [f"{path}: {value!r} matches none of anyOf"]
    errors: list[str] = []
    t = schema.get("type")
    if t == "object":
        if not isinstance(value, dict):
            return [f"{path}: object expected, got {type(value).__name__}"]
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        errors += [f"{path}: missing {r!r}" for r in schema.get("required", []) if r not in value]
        for k, v in value.items():
            if k in props:
                errors += _schema_errors(v, props[k], f"{path}.{k}")
            elif isinstance(extra, dict):
                errors += _schema_errors(v, extra, f"{path}.{k}")
            elif not (extra is True or schema.get("x-kubernetes-preserve-unknown-fields")):
                errors.append(f"{path}: unknown field {k!r}")
    elif t == "array":
        if not isinstance(value, list):
            return [f"{path}: array expected, got {type(value).__name__}"]
        for i, v in enumerate(value):
            errors += _schema_errors(v, schema.get("items", {}), f"{path}[{i}]")
    elif t == "string":
        if not isinstance(value, str):
            errors.append(f"{path}: string expected, got {value!r}")
        elif "pattern" in schema and not re.search(schema["pattern"], value):
            errors.append(f"{path}: {value!r} does not match {schema['pattern']}")
    elif t == "integer":
        if isinstance(value, bool) or not isinstance(value, int):
            errors.append(f"{path}: integer expected, got {value!r}")
    elif t == "number":
        if isinstance(value, bool) or not isinstance(value, int | float):
            errors.append(f"{path}: number expected, got {value!r}")
    elif t == "boolean" and not isinstance(value, bool):
        errors.append(f"{path}: boolean expected, got {value!r}")
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{path}: {value!r} not in {schema['enum']}")
    return errors


def _resource_errors(doc: dict) -> list[str]:
    crd = _crd(doc["kind"])
    errors = []
    versions = {f"{crd['spec']['group']}/{v['name']}": v for v in crd["spec"]["versions"]}
    if doc.get("apiVersion") not in versions:
        return [f"apiVersion {doc.get('apiVersion')!r} not served by the CRD: {list(versions)}"]
    schema = versions[doc["apiVersion"]]["schema"]["openAPIV3Schema"]
    if not doc.get("metadata", {}).get("name"):
        errors.append("metadata.name missing")
    body = {k: v for k, v in doc.items() if k not in ("apiVersion", "kind", "metadata")}
    return errors + _schema_errors(body, schema)


def _k8s_docs() -> dict[str, dict]:
    docs = [d for d in yaml.safe_load_all(K8S.read_text()) if d]
    kinds = [d["kind"] for d in docs]
    assert sorted(kinds) == ["DaskCluster", "DaskWorkerGroup"], kinds
    return {d["kind"]: d for d in docs}


def test_kubernetes_resources_match_the_operator_crds():
    from dask_kubernetes.operator import make_cluster_spec, make_worker_spec
    from dask_kubernetes.operator.validation import validate_cluster_name

    docs = _k8s_docs()
    for doc in docs.values():
        assert _resource_errors(doc) == [], doc["kind"]
    validate_cluster_name(docs["DaskCluster"]["metadata"]["name"])
    # the validator accepts what dask-kubernetes itself generates ...
    ref = make_cluster_spec("aether", image="x/y:1", n_workers=2, idle_timeout=60)
    assert _resource_errors(ref) == []
    assert _resource_errors({"apiVersion": "kubernetes.dask.org/v1", "kind": "DaskWorkerGroup",
                             "metadata": {"name": "g"},
                             "spec": {"cluster": "aether", "worker": make_worker_spec()}}) == []
    # ... and rejects broken copies of ours
    broken = copy.deepcopy(docs["DaskCluster"])
    broken["spec"]["worker"]["replicas"] = "16"
    broken["spec"]["worker"]["spec"]["containers"][0]["resourcez"] = {}
    errors = _resource_errors(broken)
    assert any("replicas" in e for e in errors) and any("resourcez" in e for e in errors)
    broken = copy.deepcopy(docs["DaskWorkerGroup"])
    del broken["spec"]["cluster"]
    assert any("'cluster'" in e for e in _resource_errors(broken))
    # same shape as the operator's own template for a DaskCluster
    ours = docs["DaskCluster"]
    assert ours["apiVersion"] == ref["apiVersion"]
    assert set(ours["spec"]) == set(ref["spec"])
    ref_svc = make_cluster_spec(ours["metadata"]["name"])["spec"]["scheduler"]["service"]
    assert ours["spec"]["scheduler"]["service"]["selector"] == ref_svc["selector"]
    assert ours["spec"]["idleTimeout"] > 0


def _container_env(container: dict) -> dict:
    return {e["name"]: e.get("value") for e in container.get("env") or []}


def test_kubernetes_operator_renders_cpu_and_gpu_workers():
    pytest.importorskip("kopf", reason="the operator's controller needs kopf")
    import dask.utils
    from dask_kubernetes.operator.controller import controller as op

    docs = _k8s_docs()
    cluster, gpu_group = docs["DaskCluster"], docs["DaskWorkerGroup"]
    name, ns = cluster["metadata"]["name"], "aether"
    assert gpu_group["spec"]["cluster"] == name  # the group joins this cluster
    sched = op.build_scheduler_deployment_spec(name, cluster["spec"]["scheduler"]["spec"], {}, {})
    svc = op.build_scheduler_service_spec(name, cluster["spec"]["scheduler"]["service"], {}, {})
    # the service selects the scheduler pod the operator creates, on its named ports
    pod_labels = sched["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    (sched_container,) = sched["spec"]["template"]["spec"]["containers"]
    port_names = {p["name"] for p in sched_container["ports"]}
    assert {p["targetPort"] for p in svc["spec"]["ports"]} <= port_names
    comm_port = next(p["port"] for p in svc["spec"]["ports"] if p["name"] == "tcp-comm")

    default_group = op.build_default_worker_group_spec(name, cluster["spec"]["worker"], {}, {})
    rendered = {}
    for group in (default_group, gpu_group):
        dep = op.build_worker_deployment_spec(
            worker_group_name=group["metadata"]["name"], namespace=ns,
            cluster_name=group["spec"]["cluster"], uuid="0123456789",
            pod_spec=group["spec"]["worker"]["spec"], annotations={}, labels={})
        pod = dep["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        env = _container_env(container)
        assert env["DASK_SCHEDULER_ADDRESS"] == (
            f"tcp://{svc['metadata']['name']}.{ns}.svc.cluster.local:{comm_port}")
        args = container["args"]
        assert args[:2] == ["dask", "worker"] and not any("tcp://" in a for a in args)
        assert "$(DASK_WORKER_NAME)" in args
        limits = container["resources"]["limits"]
        # the dask limit leaves room for the nanny inside the container's limit
        assert (dask.utils.parse_bytes(args[args.index("--memory-limit") + 1])
                < dask.utils.parse_bytes(limits["memory"]))
        assert int(args[args.index("--nthreads") + 1]) <= float(limits["cpu"])
        assert env.get("HF_HUB_OFFLINE") == "1"
        rendered[group["metadata"]["name"]] = (pod, container)

    cpu_pod, cpu = rendered[f"{name}-default"]
    assert "nvidia.com/gpu" not in cpu["resources"]["limits"]
    gpu_pod, gpu = rendered[gpu_group["metadata"]["name"]]
    # a string: the operator's CRD types resource quantities as strings
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert gpu["args"][gpu["args"].index("--resources") + 1] == "GPU=1"
    assert any(t["key"] == "nvidia.com/gpu" for t in gpu_pod["tolerations"])
    assert gpu["image"] != cpu["image"] and gpu["image"].endswith("-cuda")


# --------------------------------------------------------------------------------------
# Image: cluster/Dockerfile and cluster/requirements.txt
# --------------------------------------------------------------------------------------

PIN = re.compile(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([A-Za-z0-9][A-Za-z0-9.+!_-]*)")


def _pins() -> dict:
    from packaging.utils import canonicalize_name
    from packaging.version import Version

    pins = {}
    for n, line in enumerate(REQUIREMENTS.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = PIN.fullmatch(line)
        assert m, f"requirements.txt:{n}: {line!r} is not name==version"
        key = canonicalize_name(m[1])
        assert key not in pins, f"requirements.txt:{n}: {m[1]} pinned twice"
        pins[key] = Version(m[2])
    return pins


def _image_roots():
    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in IMAGE_EXTRAS:
        reqs += project["optional-dependencies"][extra]
    return [Requirement(r) for r in reqs]


def _installed_closure(roots) -> set[str]:
    """Everything ``roots`` pull in, from the installed packages' metadata."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    seen: dict[str, set[str]] = {}
    stack = [(r.name, set(r.extras)) for r in roots]
    while stack:
        name, extras = stack.pop()
        key = canonicalize_name(name)
        if key in UNPINNED:
            continue
        if key in seen and extras <= seen[key]:
            continue
        seen[key] = seen.get(key, set()) | extras
        for spec in md.distribution(name).requires or []:
            req = Requirement(spec)
            if req.marker is None or any(req.marker.evaluate({"extra": e})
                                         for e in sorted(seen[key]) or [""]):
                stack.append((req.name, set(req.extras)))
    return set(seen)


def test_requirements_are_pinned_complete_and_installed():
    from packaging.utils import canonicalize_name
    from packaging.version import Version

    pins = _pins()
    text = REQUIREMENTS.read_text()
    for req in _image_roots():
        key = canonicalize_name(req.name)
        if key in UNPINNED:
            assert key in text, f"say in requirements.txt why {req.name} is not pinned"
            with pytest.raises(md.PackageNotFoundError):
                md.version(req.name)  # installed here: then pin it
            continue
        assert key in pins, f"{req.name} (pyproject) is not pinned"
        assert req.specifier.contains(pins[key], prereleases=True), (req, pins[key])
    assert pins["torch"] == Version("2.13.0")
    for key, pinned in pins.items():
        installed = Version(md.version(key))
        # torch is installed as 2.13.0+cpu: the pin names the release, the index the build
        assert installed == pinned or (not pinned.local and installed.public == str(pinned)), (
            f"{key}: pinned {pinned}, installed {installed}")
    closure = _installed_closure(_image_roots())
    assert not closure - set(pins), f"pulled in but not pinned: {sorted(closure - set(pins))}"
    assert not set(pins) - closure, f"pinned but not needed: {sorted(set(pins) - closure)}"


def _dockerfile() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            instr, _, rest = line.partition(" ")
            out.append((instr.upper(), rest.strip()))
    return out


def test_dockerfile_installs_exactly_the_pinned_requirements():
    steps = _dockerfile()
    (base,) = [rest for instr, rest in steps if instr == "FROM"]
    # the pins' environment markers were evaluated for this interpreter
    assert base == f"python:{sys.version_info.major}.{sys.version_info.minor}-slim"
    args = dict(rest.split("=", 1) for instr, rest in steps if instr == "ARG" and "=" in rest)
    assert args["TORCH_INDEX"] == "https://download.pytorch.org/whl/cpu"
    copies = [rest.split() for instr, rest in steps if instr == "COPY"]
    dest = next(c[1] for c in copies if c[0] == "cluster/requirements.txt")
    installs = []
    for instr, rest in steps:
        if instr != "RUN":
            continue
        for cmd in re.split(r"&&|;", rest):
            words = shlex.split(cmd)
            if words[:2] == ["pip", "install"]:
                installs.append(words[2:])
            if words[:2] == ["pip", "check"]:
                installs.append(["<check>"])
    with_values = {"-r", "--requirement", "-i", "--index-url", "--extra-index-url", "-c"}
    kinds = []
    for words in installs:
        if words == ["<check>"]:
            kinds.append("check")
            continue
        opts = {w: (words[i + 1] if w in with_values else True)
                for i, w in enumerate(words) if w.startswith("-")}
        positional = [w for i, w in enumerate(words) if not w.startswith("-")
                      and not (i and words[i - 1] in with_values)]
        assert "--extra-index-url" not in opts  # one index per step, no mixing
        if "-r" in opts:
            assert opts["-r"] == dest and not positional, words
            kinds.append("requirements")
        else:
            # anything else installs without dependencies, and only pinned things
            assert "--no-deps" in opts, words
            if positional == ["."]:
                kinds.append("package")
            else:
                assert positional == [f"$(grep '^torch==' {dest})"], words
                assert opts["--index-url"] == "${TORCH_INDEX}"
                kinds.append("torch")
    assert kinds == ["torch", "requirements", "package", "check"]
    # the CUDA variant is documented
    assert "--build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu" in DOCKERFILE.read_text()


def test_readme_describes_every_deployment_file():
    readme = (CLUSTER / "README.md").read_text()
    for path in (GATEWAY_PY, VALUES, K8S, SLURM, SLURM_GPU, DOCKERFILE, REQUIREMENTS):
        assert str(path.relative_to(CLUSTER)) in readme, path
    assert "gateway-options.yaml" not in readme
    assert not (CLUSTER / "gateway-options.yaml").exists()
