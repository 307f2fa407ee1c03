"""dask-gateway-server configuration for aether_scale clusters.

    dask-gateway-server -f cluster/gateway/dask_gateway_config.py

Every setting can be changed through an ``AETHER_GATEWAY_*`` environment variable,
so this one file serves a shared server in production and a throw-away server on
loopback in the tests (tests/test_deploy.py). On Kubernetes the official Helm chart
writes its own config file: cluster/gateway/values.yaml carries the same cluster
options and limits there, and the tests check that the two agree.

Environment variables (default in brackets):

    AETHER_GATEWAY_BACKEND        local | unsafe-local | kubernetes | a class path [local]
    AETHER_GATEWAY_AUTH           jupyterhub | simple | kerberos | a class path [jupyterhub]
    AETHER_GATEWAY_PASSWORD       shared password, required with auth "simple"
    AETHER_GATEWAY_HTTP_ADDRESS   public HTTP address of the proxy [:8000]
    AETHER_GATEWAY_TCP_ADDRESS    public scheduler (TCP) address of the proxy [:8786]
    AETHER_GATEWAY_API_ADDRESS    private API address [127.0.0.1:0]
    AETHER_GATEWAY_API_URL        API URL that Kubernetes pods use (kubernetes backend)
    AETHER_GATEWAY_INSTANCE       name labelling this gateway's pods [aether-gateway]
    AETHER_GATEWAY_SCHEDULER_CMD  command that starts a scheduler [dask scheduler]
    AETHER_GATEWAY_WORKER_CMD     command that starts a worker [dask worker]
    AETHER_GATEWAY_CLUSTERS_DIR   working directories of local clusters [backend default]
    AETHER_GATEWAY_IDLE_TIMEOUT   seconds without a task before a cluster stops [3600]
    AETHER_GATEWAY_MAX_WORKERS    most workers in one cluster [64]
    AETHER_GATEWAY_MAX_CORES      most cores in one cluster, scheduler included [257]
    AETHER_GATEWAY_MAX_MEMORY     most memory in one cluster, scheduler included [1028G]
    AETHER_GATEWAY_LOG_LEVEL      [INFO]
    AETHER_IMAGE                  CPU image for workers and schedulers (kubernetes)
    AETHER_CUDA_IMAGE             CUDA image, used when a cluster asks for gpu=True
"""

import os
import shlex

from dask_gateway_server.options import Bool, Float, Integer, Options, String

c = get_config()  # noqa: F821 - provided by traitlets when it runs this file


def _env(name, default):
    value = os.environ.get(name, "")
    return value if value != "" else default


# --- where clusters run ---------------------------------------------------------

BACKENDS = {
    # Production on a shared machine: each user's scheduler and workers run as that
    # unix user (the gateway runs as root), so workspaces keep their file permissions.
    "local": "dask_gateway_server.backends.local.LocalBackend",
    # Every cluster runs as the gateway's own user: for one-user servers and tests.
    "unsafe-local": "dask_gateway_server.backends.local.UnsafeLocalBackend",
    # Pods on Kubernetes; usually deployed with the Helm chart (values.yaml) instead.
    "kubernetes": "dask_gateway_server.backends.kubernetes.KubeBackend",
}
BACKEND = _env("AETHER_GATEWAY_BACKEND", "local")
ON_KUBERNETES = BACKENDS.get(BACKEND, BACKEND).endswith("KubeBackend")
c.DaskGateway.backend_class = BACKENDS.get(BACKEND, BACKEND)
# INFO logs every cluster start and stop: enough to trace who ran what.
c.DaskGateway.log_level = _env("AETHER_GATEWAY_LOG_LEVEL", "INFO")

# --- who may create clusters ----------------------------------------------------

AUTHENTICATORS = {
    # Users log in through the JupyterHub they already use; the hub's API token comes
    # from JUPYTERHUB_API_TOKEN, its URL from JUPYTERHUB_API_URL.
    "jupyterhub": "dask_gateway_server.auth.JupyterHubAuthenticator",
    # One shared password (HTTP basic auth): loopback tests and small teams only.
    "simple": "dask_gateway_server.auth.SimpleAuthenticator",
    "kerberos": "dask_gateway_server.auth.KerberosAuthenticator",
}
AUTH = _env("AETHER_GATEWAY_AUTH", "jupyterhub")
c.DaskGateway.authenticator_class = AUTHENTICATORS.get(AUTH, AUTH)
if AUTH == "simple":
    # SimpleAuthenticator without a password lets anyone in under any name: refuse.
    password = os.environ.get("AETHER_GATEWAY_PASSWORD")
    if not password:
        raise ValueError("AETHER_GATEWAY_AUTH=simple needs AETHER_GATEWAY_PASSWORD")
    c.SimpleAuthenticator.password = password

# --- addresses ------------------------------------------------------------------

# The proxy is what clients see: HTTP for the REST API and dashboards
# (DASK_GATEWAY__ADDRESS) and TCP for the schedulers (DASK_GATEWAY__PROXY_ADDRESS).
# They are two ports so that the TCP side needs no TLS-terminating HTTP proxy.
c.Proxy.address = _env("AETHER_GATEWAY_HTTP_ADDRESS", ":8000")
c.Proxy.tcp_address = _env("AETHER_GATEWAY_TCP_ADDRESS", ":8786")
# The private API listens on loopback: only the proxy and the schedulers on this
# machine talk to it.
c.DaskGateway.address = _env("AETHER_GATEWAY_API_ADDRESS", "127.0.0.1:0")
if ON_KUBERNETES:
    # Labels every DaskCluster resource and pod of this gateway, so two gateways in
    # one Kubernetes cluster (and their kube-controllers) keep apart.
    c.KubeBackendAndControllerMixin.gateway_instance = _env("AETHER_GATEWAY_INSTANCE",
                                                           "aether-gateway")
    if os.environ.get("AETHER_GATEWAY_API_URL"):
        # Scheduler pods report back here, so it must be an in-cluster service URL.
        c.KubeBackend.api_url = os.environ["AETHER_GATEWAY_API_URL"]
if os.environ.get("AETHER_GATEWAY_CLUSTERS_DIR"):
    # Each local cluster keeps its TLS credentials and logs in a subdirectory here,
    # removed when it stops (default: a new temporary directory per cluster).
    c.LocalBackend.clusters_directory = os.environ["AETHER_GATEWAY_CLUSTERS_DIR"]

# --- what a cluster runs --------------------------------------------------------

# `dask scheduler` / `dask worker`: the old dask-scheduler / dask-worker executables,
# the gateway's defaults, no longer ship with distributed.
SCHEDULER_CMD = shlex.split(_env("AETHER_GATEWAY_SCHEDULER_CMD", "dask scheduler"))
WORKER_CMD = shlex.split(_env("AETHER_GATEWAY_WORKER_CMD", "dask worker"))
c.ClusterConfig.scheduler_cmd = SCHEDULER_CMD
c.ClusterConfig.worker_cmd = WORKER_CMD
# Workers read model files from the installed packages, never from the network.
c.ClusterConfig.environment = {"HF_HUB_OFFLINE": "1"}

# A national run's graph (one task per 64 MiB raster chunk) lives in the scheduler.
c.ClusterConfig.scheduler_cores = 1
c.ClusterConfig.scheduler_memory = "4 G"

# aether_scale shuts its cluster down when a run ends, but a client that crashes or
# is killed never does. The gateway then stops the cluster after this many seconds
# without a task. It counts tasks only, not connected clients: a run whose client-side
# stage (train) takes longer than this loses its cluster; raise it for such runs.
c.ClusterConfig.idle_timeout = float(_env("AETHER_GATEWAY_IDLE_TIMEOUT", "3600"))

# Per-cluster caps, so a typo in cluster.gateway.workers queues a bounded number of
# workers instead of taking the whole machine pool. The core and memory caps include
# the scheduler (1 core, 4 GiB): 64 workers of up to 4 cores / 16 GiB fit.
c.ClusterConfig.cluster_max_workers = int(_env("AETHER_GATEWAY_MAX_WORKERS", "64"))
c.ClusterConfig.cluster_max_cores = float(_env("AETHER_GATEWAY_MAX_CORES", "257"))
c.ClusterConfig.cluster_max_memory = _env("AETHER_GATEWAY_MAX_MEMORY", "1028G")

# --- what a user may choose (cluster.gateway.cluster_options) -------------------

CPU_IMAGE = _env("AETHER_IMAGE", "ghcr.io/your-org/aether-scale:0.1.0")
CUDA_IMAGE = _env("AETHER_CUDA_IMAGE", "ghcr.io/your-org/aether-scale:0.1.0-cuda")
# Where Kubernetes GPU nodes are tainted (GKE, AKS and most GPU node pools), only pods
# that tolerate the taint land there.
GPU_TOLERATIONS = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]


def aether_options_handler(options):
    """User options -> ClusterConfig overrides for the configured backend."""
    overrides = {
        "worker_cores": options.worker_cores,
        # one thread per core; set explicitly because the Helm chart pins threads to 1
        "worker_threads": options.worker_cores,
        "worker_memory": int(options.worker_memory * 2**30),
    }
    if options.gpu:
        # a "GPU" resource on the worker lets GPU-only tasks be sent to these workers
        overrides["worker_cmd"] = WORKER_CMD + ["--resources", "GPU=1"]
    if ON_KUBERNETES:
        # the CPU image has the CPU build of torch: a GPU worker needs the CUDA image
        overrides["image"] = options.image or (CUDA_IMAGE if options.gpu else CPU_IMAGE)
        if options.gpu:
            overrides["worker_extra_container_config"] = {
                "resources": {"limits": {"nvidia.com/gpu": 1}}}
            overrides["worker_extra_pod_config"] = {"tolerations": GPU_TOLERATIONS}
    return overrides


c.Backend.cluster_options = Options(
    # 2 threads per worker suit the 64 MiB chunk stages; 16 keeps one worker on a node.
    Integer("worker_cores", default=2, min=1, max=16, label="Worker cores"),
    # 4 GiB per thread: a task holds a few chunks plus torch and the model.
    Float("worker_memory", default=8, min=2, max=128, label="Worker memory (GiB)"),
    # blank: the aether-scale image of this release (CUDA build when gpu is on);
    # only the kubernetes backend runs images.
    String("image", default="", label="Image (blank: aether-scale image)"),
    Bool("gpu", default=False, label="One GPU per worker"),
    handler=aether_options_handler,
)
