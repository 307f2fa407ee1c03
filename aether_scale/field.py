"""City-wide inference: the trained AE projector over every pixel of ``ae.zarr`` → ``field.zarr``.

The AETHER *field* is the projector f_θ applied to every AlphaEarth pixel
(DESIGN.md, "inference"). This module does it as one dask ``map_blocks`` over
the chunks of ``ae.zarr`` (all 64 bands in each chunk), so it runs out-of-core
on a threaded scheduler, a memory-limited LocalCluster, any scheduler address
or GPU workers, and writes straight into Zarr without ever holding the field.

Per chunk: int8 codes de-quantised (the AEF sqrt codec), each pixel
L2-normalised (as the reference inference does), the projector run in
batches of ``infer.batch_pixels`` under ``torch.inference_mode``, nodata
pixels → NaN. An ``AEProj`` runs through a fused, allocation-free path
(:class:`_FusedAEProj`: buffers allocated once per thread, the two
first-layer GEMMs merged), optionally with bf16 GEMMs (``infer.precision``).
Small batches (16k pixels) keep activations in cache; the reference's
262,144-pixel batches are memory-bound. When ``ae.zarr`` has fewer chunks than
task slots (a city in one 64 MB chunk) the chunks are split so every worker
gets work. Each task reads, projects and writes its chunk (the graph fuses
into one task per chunk), so nothing large crosses workers. Benchmark:
``benchmarks/bench_infer.py``.

Output (workspace contract): ``field.zarr`` with variable ``embedding``
dims (``y``, ``x``, ``dim``), the same ``x``/``y`` coordinates, ``spatial_ref``
(CRS/transform) and nodata mask as ``ae.zarr``.

- ``dtype: float16`` (default): unit-vector components as float16; masked
  pixels are NaN in every component.
- ``dtype: int8``: components quantised with the AlphaEarth sqrt codec
  ``q = round(sign(v)·sqrt(|v|)·127.5)`` (decode ``v = sign(q)·(q/127.5)²``,
  :mod:`aether_scale.aef`); masked pixels are −128 in every component. The
  variable's attrs record ``codec="aef-sqrt"``, ``scale=127.5``,
  ``nodata=-128``, so the pooling engine reads the int8 field exactly like AE.
  Rounding error ≤ sqrt(|v|)/127.5 per component: ≈ 0.0024 at the typical
  |v| ≈ 0.09 of a 128-d unit vector, 0.008 at |v| = 1.

The model reaches each worker once: its pickled bytes are scattered to every
worker (``broadcast=True``) and each process keeps the unpickled module in a
cache keyed by the bytes' SHA-256, so tasks only look it up
(:func:`model_load_count` tells how many times a process unpickled it).
Without a distributed client the same cache serves the in-process scheduler.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import dask
import dask.array as dsa
import numpy as np
import torch
import xarray as xr

from . import aef
from .config import InferSection, RunConfig
from .raster import open_embedding
from .workspace import StageResult, Workspace

__all__ = [
    "infer_field",
    "run_infer",
    "model_load_count",
    "project_pixels",
    "INT8_SCALE",
]

INT8_SCALE = aef.SCALE  # the int8 field uses the AEF sqrt codec with this scale
NODATA = aef.NODATA

# Decode table indexed by the code's unsigned byte (``q.view(uint8)``): nodata → 0.
_LUT_U8 = np.zeros(256, dtype=np.float32)
_codes = np.arange(256, dtype=np.uint8).view(np.int8).astype(np.float64)
_LUT_U8[:] = (np.sign(_codes) * (_codes / aef.SCALE) ** 2).astype(np.float32)
_LUT_U8[128] = 0.0  # uint8 128 == int8 −128 (nodata); masked separately
del _codes

# ----------------------------------------------------------------- per-process model cache
_MODEL_CACHE: dict[tuple[str, str], torch.nn.Module] = {}
_LOAD_COUNTS: Counter[str] = Counter()
_CACHE_LOCK = threading.Lock()
_THREADS_SET: list[int] = []


def model_load_count(key: str | None = None) -> int:
    """How many times this process unpickled a model (``key``: one model's hash; None: all).

    Each worker should report 1 per model after a field inference: the
    model's bytes are shipped once and the module is cached per process.
    """
    return _LOAD_COUNTS[key] if key is not None else sum(_LOAD_COUNTS.values())


def _model_payload(projector: torch.nn.Module) -> tuple[bytes, str]:
    """Pickled bytes of the CPU, eval-mode projector and their SHA-256 (the cache key)."""
    module = projector.to("cpu").eval()
    blob = pickle.dumps(module, protocol=pickle.HIGHEST_PROTOCOL)
    return blob, hashlib.sha256(blob).hexdigest()[:20]


def _resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        return "cpu"  # documented fallback: a CPU worker in a mixed cluster still works
    return device


def _cached_model(key: str, payload: bytes | None, device: str) -> torch.nn.Module:
    """The process's copy of the model ``key`` on ``device`` (unpickled at most once)."""
    with _CACHE_LOCK:
        m = _MODEL_CACHE.get((key, device))
        if m is not None:
            return m
        cpu = _MODEL_CACHE.get((key, "cpu"))
        if cpu is None:
            if payload is None:
                raise RuntimeError(f"model {key} is not cached in this process and no bytes were sent")
            cpu = pickle.loads(payload).eval()
            _LOAD_COUNTS[key] += 1
            _MODEL_CACHE[(key, "cpu")] = cpu
        m = cpu if device == "cpu" else cpu.to(device)
        _MODEL_CACHE[(key, device)] = m
        return m


def _set_threads(n: int) -> None:
    """Limit torch's intra-op threads once per process (dask provides the parallelism)."""
    if not _THREADS_SET or _THREADS_SET[-1] != n:
        torch.set_num_threads(n)
        _THREADS_SET.append(n)


class _FusedAEProj:
    """Allocation-free evaluation of an :class:`~aether_scale.model.AEProj` on one batch size.

    Why: dask workers run with ``MALLOC_TRIM_THRESHOLD_`` set (distributed's
    default), which makes glibc return every large temporary to the OS, so an
    eager forward pass page-faults on each of its ~10 activations per batch
    and runs at half speed. Here every activation lives in a buffer allocated
    once per (thread, batch size); the two first-layer GEMMs are one GEMM
    (``proj.0`` and the gated shortcut concatenated, ``sigmoid(gate)`` folded
    into the shortcut's weights). The numbers equal the module's to float32
    round-off (checked in the tests).
    """

    def __init__(self, model: torch.nn.Module, batch: int, device: str,
                 precision: str = "float32") -> None:
        p0, p2 = model.proj[0], model.proj[2]
        q0, q3 = model.post_mlp[0], model.post_mlp[3]
        g = torch.sigmoid(model.gate.detach())
        dev = torch.device(device)
        dt = torch.bfloat16 if precision == "bfloat16" else torch.float32
        self.low = dt != torch.float32

        def put(t: torch.Tensor) -> torch.Tensor:
            return t.detach().contiguous().to(device=dev, dtype=dt)

        with torch.no_grad():
            self.w1 = put(torch.cat([p0.weight, g * model.shortcut.weight]).T)
            self.b1 = put(torch.cat([p0.bias, g * model.shortcut.bias]))
            self.w2, self.b2 = put(p2.weight.T), put(p2.bias)
            self.w3, self.b3 = put(q0.weight.T), put(q0.bias)
            self.w4, self.b4 = put(q3.weight.T), put(q3.bias)
        self.hidden = p0.out_features
        d_in, d_h, d_out, d_p = p0.in_features, p0.out_features, p2.out_features, q0.out_features
        self.x = torch.empty(batch, d_in, device=dev)
        self.xa = torch.empty(batch, d_in, device=dev)
        self.xl = torch.empty(batch, d_in, device=dev, dtype=dt) if self.low else self.x
        self.h1 = torch.empty(batch, d_h + d_out, device=dev, dtype=dt)
        self.h = torch.empty(batch, d_out, device=dev, dtype=dt)
        self.p = torch.empty(batch, d_p, device=dev, dtype=dt)
        self.z = torch.empty(batch, d_out, device=dev, dtype=dt)
        self.zf = torch.empty(batch, d_out, device=dev) if self.low else self.z
        self.n = torch.empty(batch, 1, device=dev)
        self.nl = torch.empty(batch, 1, device=dev, dtype=dt) if self.low else self.n

    @staticmethod
    def fits(model: torch.nn.Module) -> bool:
        """True when ``model`` has exactly the AEProj layout (else the module itself is called)."""
        from torch import nn

        try:
            return (
                isinstance(model.proj, nn.Sequential) and len(model.proj) == 3
                and isinstance(model.proj[0], nn.Linear) and isinstance(model.proj[1], nn.ReLU)
                and isinstance(model.proj[2], nn.Linear)
                and isinstance(model.shortcut, nn.Linear) and model.gate.numel() == 1
                and isinstance(model.post_mlp, nn.Sequential) and len(model.post_mlp) == 4
                and isinstance(model.post_mlp[0], nn.Linear)
                and isinstance(model.post_mlp[1], nn.GELU)
                and model.post_mlp[1].approximate == "none"
                and isinstance(model.post_mlp[2], nn.Dropout)
                and isinstance(model.post_mlp[3], nn.Linear)
                and type(model).forward.__qualname__ == "AEProj.forward"
            )
        except AttributeError:
            return False

    def _normalize_(self, t: torch.Tensor, n: torch.Tensor) -> None:
        torch.linalg.vector_norm(t, dim=1, keepdim=True, out=n)
        t.div_(n.clamp_min_(1e-12))

    def decode_(self, k: int) -> None:
        """AEF codes already copied into ``x[:k]`` as floats → sign(q)·q² (scale is irrelevant:
        the next step L2-normalises), without allocating."""
        x, xa = self.x[:k], self.xa[:k]
        torch.abs(x, out=xa)
        x.mul_(xa)

    def __call__(self, k: int) -> torch.Tensor:
        """Project ``self.x[:k]`` (raw pixels, normalised here); returns a float32 view."""
        x, h1, h, p, z, n = (b[:k] for b in (self.x, self.h1, self.h, self.p, self.z, self.n))
        self._normalize_(x, n)
        xl, nl = self.xl[:k], self.nl[:k]
        if self.low:
            xl.copy_(x)
        torch.addmm(self.b1, xl, self.w1, out=h1)
        a = h1[:, : self.hidden].relu_()
        torch.addmm(h1[:, self.hidden :], a, self.w2, out=h)
        h.add_(self.b2)
        self._normalize_(h, nl)
        torch.addmm(self.b3, h, self.w3, out=p)
        torch.ops.aten.gelu_(p)
        torch.addmm(self.b4, p, self.w4, out=z)
        zf = self.zf[:k]
        if self.low:
            zf.copy_(z)
        self._normalize_(zf, n)
        return zf


_RUNNERS = threading.local()


def _runner(model: torch.nn.Module, batch: int, device: str,
            precision: str = "float32") -> _FusedAEProj | None:
    """This thread's fused evaluator for ``model`` (None when the model is not an AEProj)."""
    cache = getattr(_RUNNERS, "cache", None)
    if cache is None:
        cache = _RUNNERS.cache = {}
    key = (id(model), batch, device, precision)
    if key not in cache:
        cache.clear()  # one model at a time per thread: bounded memory
        cache[key] = (_FusedAEProj(model, batch, device, precision)
                      if _FusedAEProj.fits(model) else None)
    return cache[key]


def project_pixels(
    codes: np.ndarray,
    model: torch.nn.Module,
    *,
    batch_pixels: int = 16_384,
    out_dtype: str = "float16",
    device: str = "cpu",
    precision: str = "float32",
) -> np.ndarray:
    """Apply ``model`` to (n, 64) pixels: int8 AEF codes (nodata −128) or floats (NaN invalid).

    Each valid pixel is de-quantised, L2-normalised and projected; invalid rows
    come back NaN (float16) or −128 (int8, AEF sqrt codec). Returns (n, D).
    An ``AEProj`` runs through an allocation-free fused path (``precision``
    ``bfloat16`` runs its GEMMs in bf16: ~2× faster on CPUs with AVX512-BF16,
    component errors ~1e-3); any other module is called as is, in float32.
    """
    n = codes.shape[0]
    if np.issubdtype(codes.dtype, np.integer):
        valid = np.all(codes != NODATA, axis=1)
    else:
        valid = np.all(np.isfinite(codes), axis=1)
    idx = None if valid.all() else np.flatnonzero(valid)
    src = codes if idx is None else codes[idx]
    m = src.shape[0]
    out_dim = _out_dim(model)
    if out_dtype == "int8":
        out = np.full((n, out_dim), NODATA, dtype=np.int8)
    else:
        out = np.full((n, out_dim), np.nan, dtype=np.float16)
    if m == 0:
        return out
    res = out if idx is None else np.empty((m, out_dim), dtype=out.dtype)
    batch = min(batch_pixels, m)
    fused = _runner(model, batch, device, precision)
    xbuf = torch.empty(batch, codes.shape[1]) if fused is None or device != "cpu" else fused.x
    xnp = xbuf.numpy()
    scratch = torch.empty(batch, out_dim) if out_dtype == "int8" else None
    with torch.inference_mode():
        for s in range(0, m, batch):
            part = src[s : s + batch]
            k = part.shape[0]
            integer = np.issubdtype(part.dtype, np.integer)
            if integer and fused is not None and device == "cpu":
                fused.x[:k].copy_(torch.from_numpy(part))  # int8 → float, decoded in place
                fused.decode_(k)
            elif integer:
                np.take(_LUT_U8, part.astype(np.int8, copy=False).view(np.uint8), out=xnp[:k])
            else:
                xnp[:k] = part
            if fused is not None:
                if device != "cpu":
                    fused.x[:k].copy_(xbuf[:k], non_blocking=True)
                z = fused(k)
            else:
                t = xbuf[:k] if device == "cpu" else xbuf[:k].to(device)
                z = model(torch.nn.functional.normalize(t, dim=1))
            if z.device.type != "cpu":
                z = z.cpu()
            dst = torch.from_numpy(res[s : s + k])
            if scratch is not None:  # int8, sqrt codec: round(sign(v) · sqrt(|v|) · 127.5)
                q = scratch[:k].copy_(z)
                q.abs_().sqrt_().mul_(INT8_SCALE).copysign_(z)
                dst.copy_(q.round_().clamp_(-127, 127))
            else:
                dst.copy_(z)
    if idx is not None:
        out[idx] = res
    return out


def _out_dim(model: torch.nn.Module) -> int:
    dim = getattr(model, "_aether_out_dim", None)
    if dim is None:
        in_dim = _in_dim(model)
        with torch.inference_mode():
            p = next(model.parameters(), None)
            dev = p.device if p is not None else torch.device("cpu")
            dim = int(model(torch.zeros(1, in_dim, device=dev) + 0.125).shape[-1])
        model._aether_out_dim = dim  # type: ignore[attr-defined]
    return dim


def _in_dim(model: torch.nn.Module) -> int:
    if hasattr(model, "in_dim"):
        return int(model.in_dim)
    for mod in model.modules():
        if isinstance(mod, torch.nn.Linear):
            return int(mod.in_features)
    return aef.N_BANDS


def _infer_block(
    block: np.ndarray,
    *,
    payload: bytes | None,
    key: str,
    batch_pixels: int,
    out_dtype: str,
    device: str,
    threads: int,
    precision: str = "float32",
) -> np.ndarray:
    """map_blocks kernel: (by, bx, 64) AE block → (by, bx, D) field block."""
    _set_threads(threads)
    dev = _resolve_device(device)
    model = _cached_model(key, payload, dev)
    by, bx, nb = block.shape
    flat = block.reshape(by * bx, nb)
    out = project_pixels(flat, model, batch_pixels=batch_pixels, out_dtype=out_dtype, device=dev,
                         precision=precision)
    return out.reshape(by, bx, out.shape[1])


def _client() -> Any | None:
    try:
        from distributed import get_client

        return get_client()
    except (ImportError, ValueError):
        return None


def _crs_of(da: xr.DataArray) -> Any:
    try:
        import rioxarray  # noqa: F401

        return da.rio.crs
    except Exception:  # noqa: BLE001 - no CRS information is reported as None
        return None


def infer_field(
    ae: xr.DataArray | xr.Dataset | str | os.PathLike,
    projector: torch.nn.Module | str | os.PathLike,
    out_uri: str,
    cfg: InferSection | None = None,
    *,
    log: Callable[[str], None] | None = print,
    progress: bool = True,
) -> dict[str, Any]:
    """Project every pixel of ``ae`` with ``projector`` and write the field to ``out_uri`` (Zarr).

    ``ae``: ``ae.zarr`` path/URL or its Dataset/DataArray (y, x, band), int8
    codes with nodata −128 (float input with NaN for invalid is accepted too).
    ``projector``: a torch module mapping (n, 64) → (n, D) (``AEProj``), or a
    path that :func:`aether_scale.model.load_projector` reads.
    Returns statistics: pixel counts (total, valid, nodata), output dtype and
    dims, chunks, seconds and pixels/s. Raises ValueError for an ``ae`` that
    is not the workspace contract's.
    """
    cfg = cfg or InferSection()
    t0 = time.perf_counter()
    da = open_embedding(ae)
    if not isinstance(projector, torch.nn.Module):
        from .model import load_projector

        projector = load_projector(projector)
    projector = projector.to("cpu").eval()
    out_dim = _out_dim(projector)
    in_dim = _in_dim(projector)
    if da.sizes[da.dims[2]] != in_dim:
        raise ValueError(
            f"ae has {da.sizes[da.dims[2]]} bands but the projector expects {in_dim} inputs"
        )
    arr = da.data
    if not isinstance(arr, dsa.Array):
        arr = dsa.from_array(arr, chunks=(1024, 1024, -1))
    if len(arr.chunks[2]) != 1:
        arr = arr.rechunk({2: -1})  # the projector needs all bands of a pixel in one block

    blob, key = _model_payload(projector)
    client = _client()
    arr = _split_for_parallelism(arr, _n_slots(client))
    threads = cfg.threads or 1
    if client is not None:
        payload: Any = client.scatter(blob, broadcast=True, hash=False)
    else:
        payload = blob
        # Seed this process's cache so the in-process scheduler never unpickles per task.
        with _CACHE_LOCK:
            if (key, "cpu") not in _MODEL_CACHE:
                _MODEL_CACHE[(key, "cpu")] = projector
    out_np_dtype = np.int8 if cfg.dtype == "int8" else np.float16
    field = arr.map_blocks(
        _infer_block,
        payload=payload,
        key=key,
        batch_pixels=cfg.batch_pixels,
        out_dtype=cfg.dtype,
        device=cfg.device,
        threads=threads,
        precision=cfg.precision,
        chunks=(arr.chunks[0], arr.chunks[1], (out_dim,)),
        dtype=out_np_dtype,
        meta=np.empty((0, 0, 0), dtype=out_np_dtype),
        name=f"aether-field-{key}",
    )
    if np.issubdtype(arr.dtype, np.integer):
        valid = (arr != NODATA).all(axis=2)
    else:
        valid = dsa.isfinite(arr).all(axis=2)
    n_valid = valid.sum()

    coords = {"y": da["y"].values, "x": da["x"].values, "dim": np.arange(out_dim, dtype=np.int32)}
    attrs: dict[str, Any] = {
        "description": "AETHER embedding field: the AE projector applied to every AE pixel",
        "model_hash": key,
        "dtype": cfg.dtype,
        "precision": cfg.precision,
    }
    if cfg.dtype == "int8":
        attrs.update(codec="aef-sqrt", scale=INT8_SCALE, nodata=NODATA,
                     decode="v = sign(q) * (q / scale) ** 2")
    else:
        attrs.update(nodata="NaN")
    var = xr.DataArray(field, dims=("y", "x", "dim"), coords=coords, attrs=attrs)
    if "grid_mapping" in da.attrs or "grid_mapping" in da.encoding or "spatial_ref" in da.coords:
        var.attrs["grid_mapping"] = "spatial_ref"
    ds = xr.Dataset({"embedding": var})
    crs = _crs_of(da)
    if "spatial_ref" in da.coords:
        ds = ds.assign_coords(spatial_ref=da.coords["spatial_ref"].variable)
    elif crs is not None:
        ds = ds.rio.write_crs(crs)
    for k in ("x", "y"):
        ds[k].attrs.update(da[k].attrs)
    encoding = {"embedding": {"chunks": (arr.chunksize[0], arr.chunksize[1], out_dim)}}
    if cfg.dtype == "int8":
        encoding["embedding"]["fill_value"] = NODATA
    store = ds.to_zarr(out_uri, mode="w", compute=False, encoding=encoding, consolidated=False)
    n_pix = int(arr.shape[0] * arr.shape[1])
    if log:
        log(f"[infer] {n_pix:,} px in {arr.numblocks[0] * arr.numblocks[1]} chunks "
            f"→ {out_uri} ({cfg.dtype}, dim {out_dim})")
    torch_threads_before = torch.get_num_threads()
    try:
        n_valid_v = _compute(client, store, n_valid, progress=progress and log is not None)
    finally:
        if client is None:
            # The in-process run changed this process's torch thread count; put it back.
            torch.set_num_threads(torch_threads_before)
            _THREADS_SET.clear()
    secs = time.perf_counter() - t0
    stats = {
        "pixels": n_pix,
        "valid_pixels": int(n_valid_v),
        "nodata_pixels": n_pix - int(n_valid_v),
        "dim": out_dim,
        "dtype": cfg.dtype,
        "precision": cfg.precision,
        "chunks": [int(arr.chunksize[0]), int(arr.chunksize[1])],
        "n_chunks": int(arr.numblocks[0] * arr.numblocks[1]),
        "model_hash": key,
        "crs": str(crs) if crs is not None else None,
        "seconds": round(secs, 3),
        "pixels_per_s": round(n_pix / secs, 1) if secs > 0 else None,
    }
    if log:
        log(f"[infer] {stats['valid_pixels']:,} valid / {stats['nodata_pixels']:,} nodata px, "
            f"{secs:.1f} s ({stats['pixels_per_s']:,.0f} px/s)")
    return stats


def _n_slots(client: Any | None) -> int:
    """Task slots available: the cluster's worker threads, else this machine's cores."""
    if client is not None:
        try:
            return max(1, sum(w.get("nthreads", 1)
                              for w in client.scheduler_info()["workers"].values()))
        except Exception:  # noqa: BLE001 - fall back to local cores
            pass
    return max(1, os.cpu_count() or 1)


def _split_for_parallelism(arr: dsa.Array, slots: int, min_edge: int = 256) -> dsa.Array:
    """Halve the spatial chunks while there are fewer chunks than task slots.

    A city-sized ``ae.zarr`` may be a single 64 MB chunk; inference is one
    task per chunk, so without this one worker would do all the work. The
    field keeps the same grid; only its chunks are smaller.
    """
    cy, cx = arr.chunksize[:2]
    while arr.numblocks[0] * arr.numblocks[1] < slots and max(cy, cx) > min_edge:
        if cy >= cx:
            cy = max(min_edge, (cy + 1) // 2)
        else:
            cx = max(min_edge, (cx + 1) // 2)
        arr = arr.rechunk({0: cy, 1: cx})
    return arr


def _compute(client: Any | None, store: Any, n_valid: Any, *, progress: bool) -> int:
    """Write the field (progress shown), then count valid pixels.

    Two computations on purpose: alone, each chunk's read → project → write
    fuses into one task, so no AE chunk or field chunk ever crosses workers;
    the count re-reads only the int8 AE (1/4 of the field's bytes).
    """
    if client is not None:
        fut = client.compute(store)
        if progress:
            try:
                from distributed import progress as dprogress

                dprogress(fut)
                print()
            except Exception:  # noqa: BLE001 - progress is cosmetic
                pass
        fut.result()
        return int(client.compute(n_valid).result())
    if progress:
        from dask.diagnostics import ProgressBar

        with ProgressBar(minimum=2.0):
            dask.compute(store)
    else:
        dask.compute(store)
    return int(dask.compute(n_valid)[0])


# --------------------------------------------------------------------------- stage
def _model_ref(ws: Workspace, name: str) -> str | None:
    """The workspace output name of a model folder (``model`` / ``model/``), if present."""
    for cand in (name, f"{name}/"):
        if ws.producer_of(cand) is not None:
            return cand
    return name if ws.exists(name) else None


def run_infer(ws: Workspace, cfg: RunConfig, *, force: bool = False) -> StageResult:
    """Stage ``infer``: ``ae.zarr`` + ``model/`` → ``field.zarr`` (+ ``field_noaug.zarr``).

    ``field_noaug.zarr`` (the 'AETHER w/o aug' field) is produced when
    ``evaluate.noaug`` is on and the train stage left ``model_noaug/``.
    Raises FileNotFoundError when ``ae.zarr`` or ``model/`` is missing.
    """
    if not ws.exists("ae.zarr"):
        raise FileNotFoundError(f"{ws.path('ae.zarr')} is missing: run 'aether-scale ingest' first")
    model_ref = _model_ref(ws, "model")
    if model_ref is None:
        raise FileNotFoundError(f"{ws.path('model')} is missing: run 'aether-scale train' first")
    models = {"field.zarr": model_ref}
    if cfg.evaluate.noaug:
        noaug_ref = _model_ref(ws, "model_noaug")
        if noaug_ref is not None:
            models["field_noaug.zarr"] = noaug_ref
    inputs = {"ae": "ae.zarr", **{f"model:{out}": ref for out, ref in models.items()}}

    def fn(tmp: dict[str, str]) -> dict[str, Any]:
        stats: dict[str, Any] = {}
        for out, ref in models.items():
            stats[out] = infer_field(ws.path("ae.zarr"), ws.path(ref.rstrip("/")), tmp[out],
                                     cfg.infer)
        return stats

    return ws.run_stage("infer", outputs=list(models), inputs=inputs,
                        config=cfg.section("infer"), fn=fn, force=force)
