"""City-wide inference: the trained AE projector over every pixel → ``field*.zarr``.

:func:`infer_field` runs one dask task per field chunk: it reads its region of
``ae.zarr`` (one verified chunk read), projects every valid pixel
(:func:`~.kernel.project_pixels`: de-quantise, L2-normalise as the reference does,
project, float16 or int8), writes the chunk and records it in the ledger — so it runs
out-of-core on any scheduler, nothing large crosses workers, and a killed run resumes
with the missing chunks only. Field chunks divide the AE chunks (default edge: the
largest divisor of the AE chunk edge up to 512, a 64 MiB float16 chunk), so a city in
one AE chunk still gives every worker work, and the layout never depends on the
cluster. Each field chunk (the *write* chunk: one task, one ledger record) is stored as
Zarr chunks of ``infer.read_chunk_px`` (default 128 px) so that small areas read
little from object storage (:class:`~aether_scale.stores.field.FieldBuild`).
:func:`build` is the registered ``infer`` stage: one field per model the
train stage left (``model/`` → ``field.zarr``, ``model_<v>/`` → ``field_<v>.zarr``).
"""

from __future__ import annotations

import os
import time
import uuid
from typing import Any

import numpy as np
import torch
import xarray as xr

from .. import gemm
from ..cluster import InTask, active_client
from ..config import InferSection
from ..devices import bf16_problem, resolve_device
from ..heap import keep_freed_memory
from ..logs import get_logger
from ..pipeline import ARTIFACTS
from ..pipeline.registry import infer_in_process
from ..stores import field as field_store
from ..stores.raster import count_retries, ledger_folder, open_embedding, raster_crs, write_chunks
from ..workspace import stable_hash
from .kernel import _in_dim, _out_dim, project_chunk
from .models import (
    _CACHE_LOCK,
    _THREADS_SET,
    _cached_model,
    _model_payload,
    _set_threads,
    seed_cache,
)

__all__ = ["build", "field_chunk", "infer_field"]

log = get_logger("infer")
MAX_FIELD_EDGE = 512


def field_chunk(ae_chunk: int, requested: int | None = None) -> int:
    """The field chunk edge for an AE chunk edge: ``requested`` (which must divide it),
    else the largest divisor of it up to :data:`MAX_FIELD_EDGE`."""
    if requested is not None:
        if ae_chunk % requested:
            raise ValueError(f"infer.chunk_px {requested} must divide the ae.zarr chunk edge "
                             f"{ae_chunk} (each field chunk lies inside one AE chunk)")
        return int(requested)
    for d in range(min(ae_chunk, MAX_FIELD_EDGE), 0, -1):
        if ae_chunk % d == 0 and (d >= 64 or d == ae_chunk):
            return d
    return ae_chunk


def _infer_chunk(region: InTask, *, payload: bytes | None, key: str, batch_pixels: int,
                 out_dtype: str, device: str, threads: int, precision: str
                 ) -> tuple[np.ndarray | None, dict[str, Any]]:
    """One field chunk from its AE region: (field block or None when no pixel is valid,
    its valid-pixel count)."""
    block = region.read()
    _set_threads(threads)
    keep_freed_memory()
    dev = str(resolve_device(device, key="infer.device"))
    model = _cached_model(key, payload, dev)
    by, bx, nb = block.shape
    out, n, bad = project_chunk(block.reshape(by * bx, nb), model, batch_pixels=batch_pixels,
                                out_dtype=out_dtype, device=dev, precision=precision)
    if n == 0:
        return None, {"valid": 0}
    # valid = what was written: a model producing NaN/inf must not pass for a field
    if bad:
        raise ValueError(f"the projector produced non-finite values for {bad:,} of "
                         f"{n:,} valid pixels (model {key}): its weights may have diverged; "
                         "retrain (a lower train.lr), or check the model folder")
    rec: dict[str, Any] = {"valid": n}
    if dev == "cpu" and precision == "float32":  # which path its float32 products took
        rec["cpu_gemm"] = gemm.backend()
    return out.reshape(by, bx, out.shape[1]), rec


def _check_workers_device(client: Any, device: str) -> None:
    """An explicit ``infer.device`` must exist on every worker (checked before any task)."""
    if device == "auto" or client is None:
        return

    def probe(spec: str = device) -> str | None:
        try:
            resolve_device(spec, key="infer.device")
            return None
        except ValueError as e:
            return str(e)

    bad = {w: msg for w, msg in client.run(probe).items() if msg}
    if bad:
        w, msg = next(iter(bad.items()))
        raise ValueError(f"{msg} (on {len(bad)} of {len(client.nthreads())} workers, e.g. {w}); "
                         "use infer.device: auto for mixed clusters")


def _store_windows(ae: Any, storage_options: dict | None, arr: Any) -> Any:
    """For ``ae`` given as a store path whose chunks hold all bands: a function from a
    window to its :class:`~aether_scale.stores.reads.CheckedWindow` (verified chunk
    reads, no dask graph). Slicing the whole array's dask graph once per task instead
    costs time that grows with the array (≈5 ms per task at national size, so the task
    list of a country took minutes to build). None for in-memory inputs."""
    if not isinstance(ae, (str, os.PathLike)):
        return None
    from ..stores.chunks import StoreRef, read_index
    from ..stores.reads import CheckedWindow

    ref = StoreRef.of(ae, storage_options)
    opened = ref.array("embedding")
    if len(opened.shape) != 3 or int(opened.chunks[2]) < int(opened.shape[2]):
        return None  # bands split across chunks: the dask path rechunks them
    index = read_index(ref)  # (open_embedding has verified the store against it)
    fix = "run `aether-scale ingest --force`"
    run = uuid.uuid4().hex  # this pass: a process reads each AE chunk once in it

    def window(win: tuple[int, int, int, int]) -> CheckedWindow:
        return CheckedWindow.of(ref, "embedding", index, win, fix=fix, opened=opened,
                                reuse=run)

    window.reuse = run  # type: ignore[attr-defined]
    return window


def infer_field(
    ae: xr.DataArray | xr.Dataset | str | os.PathLike,
    projector: torch.nn.Module | str | os.PathLike,
    out_uri: str,
    cfg: InferSection | None = None,
    *,
    storage_options: dict | None = None,
    ledger: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Project every pixel of ``ae`` with ``projector`` and write the field to ``out_uri``.

    ``ae``: ``ae.zarr`` path/URL or its Dataset/DataArray (y, x, band), int8 codes with
    nodata −128 (float input with NaN for invalid is accepted too). ``projector``: a
    module mapping (n, 64) → (n, D) (``AEProj``), or a model folder / checkpoint (path or
    URL, :func:`aether_scale.stores.models.load_projector`). ``ledger``: the folder recording
    finished chunks (a killed run's to resume it; default a temporary one).
    Returns statistics: pixel counts (total, valid, nodata), dtype and dims, chunks (the
    write chunks: tasks and ledger records, computed and resumed), read_chunks (the Zarr
    chunks they are stored in: ``infer.read_chunk_px``), seconds and pixels/s. Raises
    ValueError for an ``ae`` that is not the workspace contract's or a device that is
    absent.
    """
    cfg = cfg or InferSection()
    t0 = time.perf_counter()
    da = open_embedding(ae, storage_options=storage_options, rio=False)  # no .rio needed
    if not isinstance(projector, torch.nn.Module):
        from ..stores.models import load_projector

        projector = load_projector(projector, storage_options=storage_options)
    projector = projector.to("cpu").eval()
    out_dim, in_dim = _out_dim(projector), _in_dim(projector)
    if da.sizes[da.dims[2]] != in_dim:
        raise ValueError(f"ae has {da.sizes[da.dims[2]]} bands but the projector expects "
                         f"{in_dim} inputs")
    arr = da.data
    if not hasattr(arr, "dask"):
        import dask.array as dsa

        arr = dsa.from_array(np.asarray(arr), chunks=(1024, 1024, -1))
    if len(arr.chunks[2]) != 1:
        arr = arr.rechunk({2: -1})  # the projector needs all bands of a pixel in one block
    cy = field_chunk(int(arr.chunks[0][0]), cfg.chunk_px)
    cx = field_chunk(int(arr.chunks[1][0]), cfg.chunk_px)
    ry = field_store.read_chunk(cy, cfg.read_chunk_px)
    rx = field_store.read_chunk(cx, cfg.read_chunk_px)
    blob, key = _model_payload(projector)
    client = active_client()
    if client is None:  # an absent device fails here, before the store is touched
        dev = resolve_device(cfg.device, key="infer.device")
        problem = bf16_problem(dev, "infer.precision") if cfg.precision == "bfloat16" else None
        if problem and problem[0] == "unsupported":
            raise ValueError(problem[1])
        if problem:
            log.warning(f"[infer] {problem[1]}")
    _check_workers_device(client, cfg.device)
    attrs = {"model_hash": key, "precision": cfg.precision}
    token = stable_hash([key, cfg.dtype, cfg.precision, cy, cx, ry, rx, list(arr.shape),
                         field_store.FORMAT_VERSION])
    # the model's bytes are one literal of the graph (≈0.5 MB): a worker fetches them once
    # and, unlike a scattered future, they are recomputed if the worker holding them dies
    import dask

    payload: Any = dask.delayed(blob, pure=True, name=f"model-{key}")
    if client is None:
        seed_cache(key, projector)  # the in-process scheduler never unpickles per task
    kw = dict(payload=payload, key=key, batch_pixels=cfg.batch_pixels, out_dtype=cfg.dtype,
              device=cfg.device, threads=cfg.threads or 1, precision=cfg.precision)

    windows = _store_windows(ae, storage_options, arr)

    def job(i: int, j: int, win: tuple[int, int, int, int]) -> tuple[Any, tuple]:
        import dask

        if windows is not None:  # a store: each task reads its window, verified, itself
            return _call, (InTask(windows(win)), kw)
        r0, r1, c0, c1 = win
        (region,) = dask.optimize(arr[r0:r1, c0:c1, :])
        return _call, (InTask(region), kw)

    n_pix = int(arr.shape[0] * arr.shape[1])
    threads_before = torch.get_num_threads()
    try:
        with ledger_folder(ledger) as led:
            build = field_store.FieldBuild.at(out_uri, led, storage_options).create(
                field_store.template(da, out_dim, (cy, cx), cfg.dtype, attrs,
                                     read_chunks=(ry, rx)),
                fill_value=field_store.fill_value(cfg.dtype), token=token, block=(cy, cx))
            log.info(f"[infer] {n_pix:,} px in {len(build.grid())} chunks of {cy}×{cx} "
                     f"(stored as {ry}×{rx} Zarr chunks) → "
                     f"{os.path.basename(str(out_uri))} ({cfg.dtype}, dim {out_dim})")
            # the field chunks inside one AE chunk run one after another (each worker
            # thread then decompresses that AE chunk once for the ones it runs)
            group = (int(arr.chunks[0][0]) // cy, int(arr.chunks[1][0]) // cx)
            records, n_todo = write_chunks(build, job, label="infer", token=token, log=log,
                                           progress=progress, group=group)
    finally:
        if windows is not None:  # this pass's AE chunks, shared by this process's threads
            from ..stores.chunk_cache import CACHE

            CACHE.release(windows.reuse)
        if client is None:  # the in-process run changed this process's torch threads
            torch.set_num_threads(threads_before)
            with _CACHE_LOCK:
                _THREADS_SET.clear()
    n_chunks = len(records)
    n_valid = sum(int(r.get("valid", 0)) for r in records.values())
    secs = time.perf_counter() - t0
    crs = raster_crs(da, required=False)
    stats = {
        "pixels": n_pix,
        "valid_pixels": n_valid,
        "nodata_pixels": n_pix - n_valid,
        "dim": out_dim,
        "dtype": cfg.dtype,
        "precision": cfg.precision,
        # torch's BLAS or oneDNN for float32 CPU products, as the tasks reported it
        "cpu_gemm": sorted({r["cpu_gemm"] for r in records.values() if r.get("cpu_gemm")}) or None,
        "chunks": [cy, cx],
        "read_chunks": [ry, rx],
        "n_chunks": n_chunks,
        "chunks_computed": n_todo,
        "chunks_resumed": n_chunks - n_todo,
        "retries": count_retries(records),  # transient remote read/write failures retried
        "model_hash": key,
        "crs": crs.to_string() if crs is not None else None,
        "seconds": round(secs, 3),
        "pixels_per_s": round(n_pix / secs, 1) if secs > 0 else None,
    }
    log.info(f"[infer] {n_valid:,} valid / {n_pix - n_valid:,} nodata px, {secs:.1f} s "
             f"({stats['pixels_per_s']:,.0f} px/s)")
    return stats


def _call(region: InTask, kw: dict[str, Any]) -> tuple[np.ndarray | None, dict]:
    """(``kw`` travels as a dict so that dask hands a scattered model to the task.)"""
    return _infer_chunk(region, **kw)


def build(ctx) -> dict[str, Any]:
    """The ``infer`` stage: ``ae.zarr`` + every model → one field each (resumes per chunk)."""
    import contextlib

    import dask

    model, field = ARTIFACTS["model"], ARTIFACTS["field.zarr"]
    stats: dict[str, Any] = {}
    threads = infer_in_process(ctx.cfg)
    scope: Any = contextlib.nullcontext()
    if threads is not None:  # the run opened no cluster for this stage (registry)
        how = ("infer.scheduler: threads" if ctx.cfg.infer.scheduler == "threads" else
               "cluster.kind local: its worker processes would add start-up only; "
               "infer.scheduler: cluster uses them")
        ctx.log.info(f"[infer] tasks on {threads} threads in this process ({how})")
        scope = dask.config.set(scheduler="threads", num_workers=threads)
    with scope:
        for name in ctx.plan.outputs:
            v = field.variant_of(name) or ""
            src = ctx.reads[model.variant(v)]
            ctx.log.info(f"[infer] {model.variant(v)}/ → {name}")
            stats[name] = infer_field(ctx.reads["ae.zarr"], src, ctx.outputs[name],
                                      ctx.cfg.infer, storage_options=ctx.storage_options,
                                      ledger=ctx.ledger_path(name))
    return stats


def worker_memory(ctx) -> tuple[list[str], list[tuple[str, int]], str]:
    """What one infer task imports (torch and the model) and holds: the AE chunk its
    field chunk lies in, the field chunk, the projector's batch buffers."""
    from ..heap import WORKER_TRIM_THRESHOLD
    from ..stores.raster import chunk_shape

    cfg = ctx.cfg.infer
    cy, cx, cb = chunk_shape(ctx.reads["ae.zarr"], storage_options=ctx.storage_options)
    fy, fx = field_chunk(cy, cfg.chunk_px), field_chunk(cx, cfg.chunk_px)
    per_px = 2 if cfg.dtype == "float16" else 1

    return (["aether_scale.infer.stage", "torch"],
            [(f"an ae.zarr chunk of {cy}×{cx} px", int(1.5 * cy * cx * cb)),
             (f"a field chunk of {fy}×{fx} px", 2 * fy * fx * 128 * per_px),
             (f"batches of {cfg.batch_pixels:,} px", cfg.batch_pixels * 1024 * 4),
             # what keep_freed_memory lets glibc keep for the next batch
             ("free heap kept between batches", WORKER_TRIM_THRESHOLD)],
            "lower infer.chunk_px or infer.batch_pixels")
