"""``aether-scale pool``: AE pooled around every POI → ``triplets.zarr``.

Inputs: ``ae.zarr`` (:mod:`aether_scale.stores.ae`), ``pois.parquet``
(:mod:`aether_scale.stores.pois`) and ``text.zarr`` (:mod:`aether_scale.stores.text`);
output ``triplets.zarr`` (:mod:`aether_scale.stores.triplets`).

Rows are in raster-chunk order (row-major over ae.zarr's chunk grid, the input
order within a chunk): spatially coherent, not shuffled — the trainer shuffles. A POI
is absent when it has no geometry, lies outside the raster, has no valid AE pixel in
the base or the aug buffer, or has no text vector; each reason is counted in the
stage's stats and its summary line. Text vectors are read per output chunk, never all
at once; pooled results stream from the cluster through a bounded window of chunk
tasks, each of which records its result in the stage's ledger — a killed run resumes
with the missing raster chunks only.
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np

from ..config import RunConfig
from ..logs import Progress, get_logger
from ..stores.ae import open_ae
from ..stores.ledger import Ledger
from ..stores.pois import PoiTable
from ..stores.raster import raster_crs
from ..stores.text import TextStore
from ..stores.triplets import TripletWriter
from .engine import plan_pool
from .tasks import TASK_PARTS

__all__ = ["build", "check_same_crs", "pool_triplets"]

log = get_logger("pool")


def check_same_crs(poi_crs: Any, ae_crs: Any, pois_path: str, ae_path: str) -> None:
    """Raise ``ValueError`` when both CRSs are known and differ."""
    if poi_crs is None or ae_crs is None:
        return
    if not poi_crs.equals(ae_crs, ignore_axis_order=True):
        raise ValueError(
            f"{pois_path}: POI geometry CRS {poi_crs.to_string()} differs from {ae_path} CRS "
            f"{ae_crs.to_string()}; rerun `aether-scale pois` so points are in the AE CRS"
        )


def pool_triplets(
    ae_path: str, pois_path: str, text_path: str, out_path: str, cfg: RunConfig,
    *, storage_options: dict | None = None, ledger: str | None = None,
) -> dict[str, Any]:
    """Pool AE around every POI and write ``out_path`` (triplets.zarr); returns stats.

    ``ledger``: a folder recording each raster chunk's result (give a killed run's to
    resume it).
    """
    t0 = time.perf_counter()
    clock = time.perf_counter
    parts: dict[str, float] = {}
    sec = cfg.pool
    so = storage_options or None
    ds = open_ae(ae_path, storage_options=so)
    t = clock()
    parts["open_ae"] = t - t0
    table = PoiTable(pois_path, storage_options=so)
    pois = table.points()
    if pois["poi_id"].size == 0:
        raise ValueError(f"{pois_path} holds no POIs; rerun `aether-scale pois` with POI sources "
                         "that lie on the AE raster")
    check_same_crs(table.crs, raster_crs(ds, where=ae_path), pois_path, ae_path)
    parts["read_pois"] = clock() - t
    t = clock()
    text = TextStore(text_path, storage_options=so)
    text_row = text.rows_of(pois["poi_id"])
    parts["text_rows"] = clock() - t

    t = clock()
    has_geom = np.isfinite(pois["x"]) & np.isfinite(pois["y"])
    gidx = np.flatnonzero(has_geom)
    plan = plan_pool(ds["embedding"], pois["x"][gidx], pois["y"][gidx], [sec.base, sec.aug],
                     normalize=True, block_bytes=sec.block_mb * 2**20,
                     windows=_store_windows(ae_path, so))
    parts["assign_to_chunks"] = clock() - t
    local_text = _LocalTextRows.start(text)
    writer = TripletWriter(out_path, plan.grid.n_channels, local_text or text, sec.chunk_rows,
                           storage_options=so)
    log.info(f"[pool] {gidx.size:,} POIs on {plan.n_tasks} raster chunks "
             f"(base {sec.base.model_dump(exclude_none=True)}, "
             f"aug {sec.aug.model_dump(exclude_none=True)})")
    led = Ledger.at(ledger, so) if ledger else None
    try:
        counts = _pool_rows(plan, writer, pois, gidx, text_row, led, parts)
        if local_text is not None:
            local_text.wait(text.n)
            parts["text_copy"] = local_text.seconds  # (in its own thread, overlapping)
        return _finish(counts, plan, writer, pois, has_geom, text, sec, parts, t0)
    finally:
        if local_text is not None:
            local_text.close()


class _LocalTextRows:
    """``text.zarr``'s vectors decoded once, chunk after chunk in a background thread, into
    an uncompressed local temporary file that the triplet writer gathers rows from.

    Triplet rows come in raster-chunk order while text rows are in ``pois.parquet``
    order (each POI part sorted by chunk on its own), so the rows of one triplet chunk
    reach into many text chunks: gathering them from ``text.zarr`` directly decodes the
    same 100 MB chunk again and again (dozens of times per chunk at a million POIs).
    Here every text chunk is decoded exactly once; the copy (n × dim float32 on local
    disk) overlaps the pooling tasks. The vectors are the same bytes.
    """

    def __init__(self, text: TextStore, folder: str) -> None:
        import threading

        self.dim = int(text.dim)
        self.n = int(text.n)
        self.folder = folder
        path = os.path.join(folder, "text.f32")
        # written with plain sequential writes (far cheaper than faulting in a writable
        # map), read through a read-only map of the same file (the page cache is shared)
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        os.ftruncate(self._fd, self.n * self.dim * 4)
        self.vectors = np.memmap(path, dtype=np.float32, mode="r", shape=(self.n, self.dim))
        self.ready = 0  # rows [0, ready) are copied
        self.error: BaseException | None = None
        self.seconds = 0.0
        self._cond = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._copy, args=(text,), name="pool-text-copy",
                                        daemon=True)
        self._thread.start()

    @classmethod
    def start(cls, text: TextStore) -> _LocalTextRows | None:
        """Start the copy when ``text`` has more than one chunk and the local temporary
        folder has room for it (twice over); None otherwise (gather from the store)."""
        import shutil
        import tempfile

        if text.n <= text.chunk_rows:
            return None
        need = 2 * text.n * text.dim * 4
        tmp = tempfile.gettempdir()
        if shutil.disk_usage(tmp).free < need:
            log.info(f"[pool] {tmp} has less than {need / 2**30:.1f} GiB free: text vectors are "
                     "gathered from text.zarr directly")
            return None
        return cls(text, tempfile.mkdtemp(prefix="aether-pool-text-", dir=tmp))

    def _copy(self, text: TextStore) -> None:
        t0 = time.perf_counter()
        try:
            c = text.chunk_rows
            for a in range(0, self.n, c):
                if self._stop:
                    return
                b = min(a + c, self.n)
                block = np.ascontiguousarray(text.read(a, b), dtype=np.float32)
                view, off = memoryview(block).cast("B"), a * self.dim * 4
                while view:  # os.pwrite may write less than asked
                    k = os.pwrite(self._fd, view, off)
                    view, off = view[k:], off + k
                with self._cond:
                    self.ready = b
                    self._cond.notify_all()
        except BaseException as e:  # noqa: BLE001 - re-raised in the thread that takes rows
            with self._cond:
                self.error = e
                self._cond.notify_all()
        finally:
            self.seconds = time.perf_counter() - t0

    def wait(self, rows: int) -> None:
        """Block until rows ``[0, rows)`` are copied; re-raise the copy's error."""
        with self._cond:
            while self.ready < rows and self.error is None:
                self._cond.wait()
        if self.error is not None:
            raise self.error

    def take(self, rows: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Vectors of ``rows`` (any order), into ``out`` when given."""
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size:
            self.wait(int(rows.max()) + 1)
        return np.asarray(np.take(self.vectors, rows, axis=0, out=out))

    def close(self) -> None:
        import shutil

        self._stop = True
        self._thread.join()
        del self.vectors
        os.close(self._fd)
        shutil.rmtree(self.folder, ignore_errors=True)


def _pool_rows(plan: Any, writer: TripletWriter, pois: dict[str, np.ndarray], gidx: np.ndarray,
               text_row: np.ndarray, led: Ledger | None, parts: dict[str, Any]
               ) -> dict[str, Any]:
    """Run the plan and hand every POI with vectors and text to ``writer``; counts."""
    clock = time.perf_counter
    n_empty = [0, 0]
    n_no_ae = n_no_text = 0
    t_loop = clock()
    t_write = 0.0
    with Progress(log, "pool", plan.n_tasks, "chunks") as prog:
        for blk in plan.blocks(ledger=led, progress=prog):
            t = clock()
            rows = gidx[blk.index]
            n_empty[0] += int(np.sum(blk.counts[:, 0] == 0))
            n_empty[1] += int(np.sum(blk.counts[:, 1] == 0))
            has_ae = (blk.counts[:, 0] > 0) & (blk.counts[:, 1] > 0)
            has_text = text_row[rows] >= 0
            n_no_ae += int(np.sum(~has_ae))
            n_no_text += int(np.sum(has_ae & ~has_text))
            keep = has_ae & has_text
            writer.add(pois["poi_id"][rows[keep]], blk.vectors[keep, 0], blk.vectors[keep, 1],
                       text_row[rows[keep]])
            t_write += clock() - t
    t_loop = clock() - t_loop
    parts["write_triplets"] = t_write
    parts["combine"] = plan.task_seconds.get("combine", 0.0)
    parts["wait_for_tasks"] = max(0.0, t_loop - t_write - parts["combine"])
    return {"n_empty": n_empty, "n_no_ae": n_no_ae, "n_no_text": n_no_text}


def _finish(counts: dict[str, Any], plan: Any, writer: TripletWriter, pois: dict[str, np.ndarray],
            has_geom: np.ndarray, text: TextStore, sec: Any, parts: dict[str, Any], t0: float
            ) -> dict[str, Any]:
    """Close ``writer`` (attributes, index), check the row accounting, return the stats."""
    clock = time.perf_counter
    t = clock()
    n_empty, n_no_ae, n_no_text = counts["n_empty"], counts["n_no_ae"], counts["n_no_text"]
    stats = {
        "n_pois": int(pois["poi_id"].size),
        "n_no_geometry": int((~has_geom).sum()),
        "n_outside_raster": plan.n_outside,
        "n_empty_base": n_empty[0],
        "n_empty_aug": n_empty[1],
        "n_dropped_no_ae": n_no_ae,
        "n_dropped_no_text": n_no_text,
        "n_text_rows": int(text.n),
        "n_raster_chunks_used": plan.n_tasks,
        "chunks_resumed": plan.n_resumed,
        "chunks_computed": plan.n_tasks - plan.n_resumed,
    }
    writer.close({
        "buffers": {"base": sec.base.model_dump(mode="json"), "aug": sec.aug.model_dump(mode="json")},
        "counts": {k: v for k, v in stats.items() if not k.startswith("chunks_")},
        "layout": "rows = POIs in ae.zarr chunk order; base/aug = L2-normalised mean of de-quantised "
                  "valid AE codes in the buffer; text = text.zarr embedding of the same poi_id",
        "text_encoder": text.encoder(),
    })
    ts = plan.task_seconds
    parts["write_triplets"] += clock() - t
    # worker seconds, summed over the tasks (they run in parallel: not part of the wall)
    parts["tasks"] = {k: ts.get(k, 0.0) for k in TASK_PARTS}
    stats["parts_s"] = {k: (round(v, 3) if isinstance(v, float) else
                            {a: round(b, 3) for a, b in v.items()}) for k, v in parts.items()}
    stats["n_triplets"] = writer.n_written
    stats["retries"] = plan.n_retries  # transient remote read/write failures retried
    stats["seconds"] = round(time.perf_counter() - t0, 2)
    dropped = stats["n_no_geometry"] + stats["n_outside_raster"] + n_no_ae + n_no_text
    if dropped + writer.n_written != stats["n_pois"]:  # pragma: no cover - internal invariant
        raise RuntimeError("pool: row accounting mismatch (bug)")
    summary = (f"dropped: no geometry {stats['n_no_geometry']:,}, outside the raster "
               f"{plan.n_outside:,}, no valid AE in a buffer {n_no_ae:,}, no text {n_no_text:,}")
    log.info(f"[pool] wrote {writer.n_written:,} of {stats['n_pois']:,} POIs as triplets; "
             f"{summary}")
    if writer.n_written < 2:
        raise ValueError(f"pool: {writer.n_written} triplet(s) from {stats['n_pois']:,} POIs "
                         f"({summary}); training needs at least 2. The POIs must lie on valid "
                         "AE pixels (nodata or outside the raster drops them)")
    return stats


def _store_windows(ae_path: str, storage_options: dict | None) -> Any:
    """A function from a chunk window to its :class:`~aether_scale.stores.reads.CheckedWindow`
    (verified chunk reads of ``ae.zarr``, no dask graph): slicing the whole array's graph
    once per task instead costs time that grows with the raster. None when bands are
    split across chunks (the dask path handles that)."""
    from ..stores.chunks import StoreRef, read_index
    from ..stores.reads import CheckedWindow

    ref = StoreRef.of(ae_path, storage_options)
    opened = ref.array("embedding")
    if len(opened.shape) != 3 or int(opened.chunks[2]) < int(opened.shape[2]):
        return None
    index = read_index(ref)  # (open_ae has verified the store against it)
    fix = "run `aether-scale ingest --force`"
    return lambda win: CheckedWindow.of(ref, "embedding", index, win, fix=fix, opened=opened)


def build(ctx) -> dict[str, Any]:
    """The ``pool`` stage: ``ae.zarr`` + ``pois.parquet`` + ``text.zarr`` → ``triplets.zarr``."""
    r = ctx.reads
    return pool_triplets(r["ae.zarr"], r["pois.parquet"], r["text.zarr"],
                         ctx.outputs["triplets.zarr"], ctx.cfg,
                         storage_options=ctx.storage_options,
                         ledger=ctx.ledger_path("triplets.zarr"))


def worker_memory(ctx) -> tuple[list[str], list[tuple[str, int]], str]:
    """What one pool task imports and holds: an AE chunk (stored and decoded), its
    prefix-sum strip, and the free heap glibc keeps for the next batch."""
    from ..heap import WORKER_TRIM_THRESHOLD
    from ..stores.raster import chunk_shape

    cy, cx, cb = chunk_shape(ctx.reads["ae.zarr"], storage_options=ctx.storage_options)
    strip = ctx.cfg.pool.block_mb * 2**20
    return (["aether_scale.pool.stage"],
            [(f"an ae.zarr chunk of {cy}×{cx} px", int(1.5 * cy * cx * cb)),
             ("prefix-sum strip", int(1.5 * strip)),
             ("free heap kept between batches (aether_scale.heap)", WORKER_TRIM_THRESHOLD)],
            "re-ingest with a smaller ingest.chunk_px, or lower pool.block_mb")
