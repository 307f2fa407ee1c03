"""The demo city through a real dask-gateway-server, with its tiles, POIs, label files
and workspace on a real S3-compatible server (both on loopback): the same stores, bit
for bit, and the same Table 1 as the LocalCluster run on local disk (``tiny_demo``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch
from fixtures import TINY_DEMO

RASTERS = ("ae.zarr", "text.zarr", "triplets.zarr", "field.zarr", "field_noaug.zarr")


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def _weights(model_dir: Path) -> dict[str, torch.Tensor]:
    ck = torch.load(model_dir / "checkpoint.pt", map_location="cpu", weights_only=False)
    return {f"{part}.{k}": v for part in ("ae_state_dict", "txt_state_dict")
            for k, v in ck[part].items()}


@pytest.mark.gateway
def test_demo_through_gateway_with_everything_on_object_storage(tiny_demo, s3, gateway,
                                                                 tmp_path):
    name = f"demo-{uuid.uuid4().hex[:8]}"
    home = tmp_path / "home"
    home.mkdir()
    env = {**os.environ, **s3["env"], **gateway["env"], "HOME": str(home),
           "DASK_GATEWAY__AUTH__KWARGS__USERNAME": "alice", "AETHER_SCALE_NO_BAR": "1"}
    cmd = [sys.executable, "-m", "aether_scale", "demo", "-w", f"s3://work/{name}",
           "--set", "cluster.kind=gateway", "--set", "cluster.gateway.workers=1",
           # the server's option (GiB); the LocalCluster run's workers have 1 GiB
           "--set", "cluster.gateway.cluster_options={worker_memory: 1.5}"]
    for o in TINY_DEMO:
        cmd += ["--set", o]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-4000:]
    assert "dask: gateway cluster, 1 workers" in out
    assert "uploaded to s3://work/" in out  # the city's files are inputs on object storage
    assert "the λ study is skipped" in out  # sweeps need a local workspace: said, not silent

    local = Path(tiny_demo["workspace"])
    remote = s3["root"] / "work" / name  # the folder rclone serves as the bucket
    cfg = (remote / "config.yaml").read_text()
    assert "s3://work/" in cfg and "kind: gateway" in cfg
    for store in RASTERS:
        a, b = _files(local / store), _files(remote / store)
        assert a.keys() == b.keys(), store
        differ = [k for k in a if a[k] != b[k]]
        assert not differ, f"{store}: {len(differ)} file(s) differ, e.g. {differ[:3]}"
    for model in ("model", "model_noaug"):
        wa, wb = _weights(local / model), _weights(remote / model)
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), model
    # Table 1 for the same seeds: every metric of every method and seed equal
    ma = json.loads((local / "report" / "metrics.json").read_text())
    mb = json.loads((remote / "report" / "metrics.json").read_text())
    assert ma == mb
    ingest = json.loads((remote / "manifests" / "ingest.json").read_text())["stats"]
    assert ingest["tile_files"] and all(f.startswith("s3://work/") for f in ingest["tile_files"])
    assert ingest["retries"] == 0


class _FlakyFS:
    """fsspec's local filesystem behind a connection that drops every other open (a
    flaky network link, deterministic). Registered as ``flaky://``."""

    opens = 0


def _flaky_fs_class():
    from fsspec.implementations.local import LocalFileSystem

    class FlakyFileSystem(LocalFileSystem):
        protocol = ("flaky",)

        @classmethod
        def _strip_protocol(cls, path):
            path = str(path)
            return super()._strip_protocol(path[len("flaky://"):] if path.startswith("flaky://")
                                           else path)

        def _open(self, path, mode="rb", **kw):
            _FlakyFS.opens += 1
            if _FlakyFS.opens % 2 == 1:
                raise ConnectionResetError(104, "Connection reset by peer")
            return super()._open(path, mode, **kw)

    return FlakyFileSystem


def test_transient_read_failures_are_retried_and_counted(tmp_path, caplog):
    """Tiles behind a link that resets every other connection: ingest retries (headers
    and chunk reads), counts the retries in its manifest and writes the same store as
    from local disk."""
    import fsspec

    from aether_scale.config import SynthSection, load_config
    from aether_scale.pipeline import run_stages
    from aether_scale.synthetic import write_city
    from aether_scale.workspace import Workspace

    fsspec.register_implementation("flaky", _flaky_fs_class(), clobber=True)
    write_city(tmp_path / "city", SynthSection(size_px=128, n_pois=100, n_luc_points=20,
                                                      n_regions=10, seed=3))
    tiles = sorted((tmp_path / "city" / "ae").glob("*.tif"))

    def ingest(ws: Path, urls: list[str]) -> dict:
        cfg = load_config(data={"cluster": {"kind": "threads"},
                                "ingest": {"tiles": urls, "chunk_px": 64}})
        run_stages(["ingest"], Workspace(ws), cfg)
        return json.loads((ws / "manifests" / "ingest.json").read_text())["stats"]

    local = ingest(tmp_path / "local", [str(t) for t in tiles])
    caplog.set_level("WARNING")
    flaky = ingest(tmp_path / "flaky", [f"flaky://{t}" for t in tiles])
    assert local["retries"] == 0
    assert flaky["retries"] >= 1  # chunk reads that met a reset (headers are retried too)
    assert "— retry 1 of 3 in 0.5 s" in caplog.text
    assert f"[ingest] {flaky['retries']} transient read/write failure(s) were retried" in caplog.text
    assert _files(tmp_path / "flaky" / "ae.zarr") == _files(tmp_path / "local" / "ae.zarr")


def test_object_storage_inputs_that_do_not_exist_name_the_fix(s3, tmp_path):
    from aether_scale.ingest.inputs import IngestError, resolve_tiles

    with pytest.raises(IngestError, match=r"s3://city/nothing-here/\*\.tif matches no tile.*"
                                          r"AWS_\* / FSSPEC_\*"):
        resolve_tiles(["s3://city/nothing-here/*.tif"])
