"""Embedding rasters (``ae.zarr``, ``field*.zarr``): one opener, one writer, one pixel rule.

Both stores hold one variable ``embedding`` of dims ``(y, x, C)`` (``C`` = ``band`` for
AlphaEarth codes, ``dim`` for a field), pixel-centre ``x``/``y`` coordinates and the CRS
and transform on a ``spatial_ref`` coordinate as rioxarray writes them.

- :func:`open_raster` opens a store lazily, checked against that contract and its chunk
  index (:mod:`.chunks`): the ``embedding`` data is a dask array whose every task
  verifies its chunk, so a damaged store fails naming the chunk instead of being read.
- :class:`RasterBuild` writes a store the resumable way: the template once, then one
  :meth:`~RasterBuild.commit` per chunk (written, then recorded in the ledger), then
  :meth:`~RasterBuild.finish`.
- :func:`locate_pixels` is the one place that maps map coordinates to pixels (the POI
  stage and the pooling engine both call it, so a POI kept as "on the raster" lands on
  the same pixel when it is pooled); :func:`raster_crs` the one place that reads a
  raster's CRS.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from .chunks import (
    CorruptStoreError,
    StoreRef,
    chunk_key,
    chunk_slices,
    compressors,
    finish_store,
    quiet_zarr,
    verify_store,
)
from .ledger import Ledger
from .reads import checked_array

if TYPE_CHECKING:
    import xarray as xr

__all__ = ["RasterBuild", "Transform", "chunk_job", "ledger_folder", "locate_pixels",
           "open_embedding", "open_raster", "raster_crs", "write_chunks"]

#: GDAL-order affine coefficients ``(a, b, c, d, e, f)``: x = a·col + b·row + c, y = d·col + e·row + f.
Transform = tuple[float, float, float, float, float, float]
VARIABLE = "embedding"


# --------------------------------------------------------------------------- pixels
def locate_pixels(
    transform: Transform, height: int, width: int, x: Any, y: Any
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pixel ``(row, col)`` containing each point ``(x, y)`` and whether it is on the raster.

    Cells are half-open in pixel space: pixel ``(r, c)`` owns fractional
    coordinates ``[r, r + 1) × [c, c + 1)``. A point on an edge shared by two
    pixels therefore belongs to the one with the larger index (north-up: the
    pixel east of a vertical edge, south of a horizontal one); the raster's
    left and top edges are inside, its right and bottom edges outside.

    ``row``/``col`` are int64 and always valid indices: points off the raster
    (``inside = False``, NaN coordinates included) are clipped to the nearest
    edge pixel (0 for NaN), so callers can index with them and mask afterwards.
    Axis-aligned transforms (``b == d == 0``, every ingest output) divide by the
    pixel size directly, so points built as ``c + k·a`` land exactly on edge ``k``.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    a, b, c, d, e, f = (float(v) for v in transform)
    dx, dy = x - c, y - f
    with np.errstate(invalid="ignore", divide="ignore"):  # NaN points are flagged outside below
        if b == 0.0 and d == 0.0:
            colf, rowf = dx / a, dy / e
        else:
            det = a * e - b * d
            colf = (e * dx - b * dy) / det
            rowf = (a * dy - d * dx) / det
        col, row = np.floor(colf), np.floor(rowf)
        finite = np.isfinite(col) & np.isfinite(row)
        inside = finite & (col >= 0) & (col < width) & (row >= 0) & (row < height)
    col = np.clip(np.where(finite, col, 0), 0, width - 1).astype(np.int64)
    row = np.clip(np.where(finite, row, 0), 0, height - 1).astype(np.int64)
    return row, col, inside


def raster_crs(obj: xr.Dataset | xr.DataArray, *, where: str = "the raster",
               required: bool = True) -> Any:
    """The CRS (``pyproj.CRS``) a raster's ``spatial_ref`` (or ``grid_mapping``) records.

    Raises ``ValueError`` naming ``where`` when there is none and ``required``;
    returns None otherwise.
    """
    from pyproj import CRS

    names = ["spatial_ref", "crs"]
    gm = obj.attrs.get("grid_mapping") or getattr(obj, "encoding", {}).get("grid_mapping")
    if gm:
        names.insert(0, gm)
    variables = obj.coords if hasattr(obj, "coords") else {}
    if hasattr(obj, "variables"):
        variables = obj.variables
    for name in names:
        if name in variables:
            attrs = variables[name].attrs
            for key in ("crs_wkt", "spatial_ref"):
                if attrs.get(key):
                    return CRS.from_user_input(attrs[key])
    if required:
        raise ValueError(f"{where} has no CRS (no spatial_ref coordinate with crs_wkt); "
                         "re-run `aether-scale ingest`")
    return None


# --------------------------------------------------------------------------- reading
def open_raster(uri: str | os.PathLike, *, storage_options: Mapping[str, Any] | None = None,
                producer: str, channel_dims: Sequence[str] = ("band", "dim"),
                variable: str = VARIABLE, rio: bool = True) -> xr.Dataset:
    """Open a raster store lazily, checked against the workspace contract and its index.

    Returns the Dataset with raw values (``mask_and_scale=False``: int8 codes stay
    codes), ``spatial_ref`` as a coordinate (``.rio`` works) and ``embedding`` backed by
    verified chunk reads. ``producer`` is the stage that writes the store (named in the
    errors, with the command to run); ``variable`` the data variable (``embedding``
    for AE and fields, ``similarity`` for query rasters).

    ``rio=False`` skips importing rioxarray (about 0.9 s on a 2-core machine) for a
    caller that needs no ``.rio`` (``infer``'s client); the coordinate is there anyway.

    Raises ``FileNotFoundError`` when there is no store at ``uri``, ``ValueError`` when
    it cannot be read or breaks the contract, :class:`~.chunks.CorruptStoreError` when
    its chunks do not match the index.
    """
    if rio:
        import rioxarray  # noqa: F401  (registers the .rio accessor)
    import xarray as xr

    path = str(uri)
    ref = StoreRef.of(path, storage_options)
    fix = f"run `aether-scale {producer} --force`"
    if not ref.fs.exists(f"{ref.root}/zarr.json"):
        raise FileNotFoundError(f"{path}: no Zarr store there; run the {producer} stage "
                                f"(`aether-scale {producer}`) first")
    index = verify_store(ref, fix=fix)
    try:
        with quiet_zarr():
            ds = xr.open_zarr(path, mask_and_scale=False, storage_options=ref.storage_options)
    except (FileNotFoundError, KeyError) as e:
        raise FileNotFoundError(f"{path}: no Zarr store there ({e}); run the {producer} stage "
                                f"(`aether-scale {producer}`) first") from None
    except ValueError as e:  # a coordinate chunk failing its checksum lands here too
        raise CorruptStoreError(f"{path}: cannot be read as a Zarr store ({e}); {fix}") from None
    if variable not in ds:
        raise ValueError(f"{path}: no variable '{variable}' (found {list(ds.data_vars)}); "
                         f"expected the store written by the {producer} stage — {fix}")
    emb = ds[variable]
    if emb.ndim != 3 or emb.dims[:2] != ("y", "x") or emb.dims[2] not in channel_dims:
        raise ValueError(f"{path}: '{variable}' has dims {emb.dims}; expected ('y', 'x', C) with "
                         f"C in {tuple(channel_dims)} — {fix}")
    gm = emb.attrs.get("grid_mapping") or emb.encoding.get("grid_mapping")
    for name in {gm or "spatial_ref", "spatial_ref"}:
        if name in ds.data_vars:  # Zarr round trips store the CRS as a variable: make it a coord
            ds = ds.set_coords(name)
    data = checked_array(ref, variable, index, fix=fix)
    checked = xr.DataArray(data, dims=emb.dims, coords=emb.coords, attrs=emb.attrs)
    checked.encoding = dict(emb.encoding)
    ds[variable] = checked
    return ds


# --------------------------------------------------------------------------- writing
@dataclass(frozen=True)
class RasterBuild:
    """A raster store being built in a stage's work folder (picklable for dask workers).

    ``store`` is the store's location, ``ledger`` the folder recording its finished
    chunks, ``variable`` the data variable of dims ``(y, x, C)`` it builds. Chunks are
    addressed by their spatial chunk index ``(i, j)`` (all channels
    are in one chunk).
    """

    store: StoreRef
    ledger: Ledger
    chunks: tuple[int, int, int] = field(default=(0, 0, 0))
    shape: tuple[int, int, int] = field(default=(0, 0, 0))
    variable: str = VARIABLE

    @classmethod
    def at(cls, uri: str, ledger_uri: str, storage_options: Mapping[str, Any] | None = None,
           *, variable: str = VARIABLE) -> RasterBuild:
        return cls(StoreRef.of(uri, storage_options), Ledger.at(ledger_uri, storage_options),
                   variable=variable)

    def _meta(self) -> Ledger:
        return Ledger(StoreRef(self.ledger.ref.uri + ".meta", self.ledger.ref.options))

    def create(self, template: xr.Dataset, *, fill_value: Any, token: str,
               zstd_level: int = 0) -> RasterBuild:
        """Write the store's metadata and coordinates, unless a killed run already did.

        ``template`` holds ``embedding`` as a lazy dask array (never computed) with the
        final chunking; ``token`` identifies the template (a rerun with another one
        starts over). Every variable gets the workspace codecs (zstd at ``zstd_level``,
        then crc32c).
        Returns the build with the array's shape and chunks filled in.
        """
        meta = self._meta()
        rec = meta.done().get("template")
        emb = template[self.variable]
        chunks = tuple(int(c[0]) for c in emb.chunks)
        shape = tuple(int(s) for s in emb.shape)
        if rec is None or rec.get("token") != token:
            self.ledger.clear()  # records of another template (or none) are not this store's
            enc: dict[str, dict[str, Any]] = {
                str(name): {"compressors": compressors(zstd_level)}
                for name in template.variables}
            enc[self.variable].update(chunks=chunks, fill_value=fill_value)
            with quiet_zarr():
                template.to_zarr(self.store.uri, mode="w", compute=False, encoding=enc,
                                 consolidated=False, zarr_format=3,
                                 storage_options=self.store.storage_options)
            meta.record("template", {"token": token}, work=False)
        return RasterBuild(self.store, self.ledger, chunks, shape,  # type: ignore[arg-type]
                           self.variable)

    def done(self) -> dict[str, dict[str, Any]]:
        """The chunks recorded so far: ``{"i.j.0": record}``."""
        return self.ledger.done()

    def grid(self) -> list[tuple[int, int]]:
        """Every spatial chunk index of the store, row-major."""
        ny = -(-self.shape[0] // self.chunks[0])
        nx = -(-self.shape[1] // self.chunks[1])
        return [(i, j) for i in range(ny) for j in range(nx)]

    def window(self, i: int, j: int) -> tuple[int, int, int, int]:
        """Pixel window ``(r0, r1, c0, c1)`` of chunk ``(i, j)``."""
        sy, sx, _ = chunk_slices((i, j, 0), self.shape, self.chunks)
        return sy.start, sy.stop, sx.start, sx.stop

    def commit(self, i: int, j: int, block: np.ndarray | None, stats: Mapping[str, Any]
               ) -> dict[str, Any]:
        """Write chunk ``(i, j)`` (``None``: it holds only the fill value and is not
        stored) and record it with ``stats``; returns the record."""
        if block is not None:
            r0, r1, c0, c1 = self.window(i, j)
            self.store.array(self.variable, mode="r+")[r0:r1, c0:c1, :] = block
        rec = {"empty": block is None, **stats}
        self.ledger.record(chunk_key((i, j, 0)), rec)
        return rec

    def finish(self) -> dict[str, dict[str, Any]]:
        """Check every chunk is recorded, consolidate, write the index; returns the records."""
        records = self.done()
        finish_store(self.store, tracked={self.variable: records})
        return records


def chunk_job(build: RasterBuild, i: int, j: int, fn: Callable[..., tuple[np.ndarray | None, dict]],
              *args: Any) -> dict[str, Any]:
    """Dask task body: ``fn(*args)`` computes chunk ``(i, j)`` → ``(block or None, stats)``;
    the chunk is written and recorded here, on the worker.

    A transient failure of a remote read or write (:func:`aether_scale.storage.transient`)
    is retried with back-off; the record counts the retries (``retries``), which the
    stages sum into their manifests (:func:`count_retries`)."""
    from .. import storage

    what = f"{build.store.name} chunk {i}.{j}"
    n0 = storage.retry_count()
    block, stats = storage.with_retries(lambda: fn(*args), what=what)
    return storage.with_retries(
        lambda: build.commit(i, j, block, {**stats, "retries": storage.retry_count() - n0}),
        what=what)


def count_retries(records: Mapping[str, Mapping[str, Any]]) -> int:
    """Transient failures retried over a build's chunks (their records' ``retries``)."""
    return sum(int(r.get("retries", 0)) for r in records.values())


def chunk_shape(uri: str | os.PathLike, *, storage_options: Mapping[str, Any] | None = None
                ) -> tuple[int, ...]:
    """The chunk shape of a raster store's ``embedding`` (metadata only)."""
    return tuple(int(c) for c in StoreRef.of(uri, storage_options).array(VARIABLE).chunks)


def open_embedding(src: xr.DataArray | xr.Dataset | str | os.PathLike, *,
                   storage_options: Mapping[str, Any] | None = None,
                   rio: bool = True) -> xr.DataArray:
    """The ``embedding`` DataArray ``(y, x, band|dim)`` of a store path/URL, Dataset or
    DataArray. Paths go through :func:`open_raster` (``field*.zarr`` as written by
    ``infer``, anything else as by ``ingest``; ``rio`` as there). Raises ``ValueError`` naming the input
    when there is no ``embedding`` or its dims are not ``(y, x, C)``."""
    import xarray as xr

    name = "<in-memory raster>"
    if isinstance(src, (str, os.PathLike)):
        name = str(src)
        base = os.path.basename(name.rstrip("/"))
        src = open_raster(name, storage_options=storage_options, rio=rio,
                          producer="infer" if base.startswith("field") else "ingest")
    if isinstance(src, xr.Dataset):
        if "spatial_ref" in src.data_vars:
            src = src.set_coords("spatial_ref")
        if VARIABLE not in src:
            raise ValueError(f"{name}: no variable '{VARIABLE}' (found {list(src.data_vars)}); "
                             "expected ae.zarr as written by the ingest stage")
        src = src[VARIABLE]
    if src.ndim != 3 or src.dims[:2] != ("y", "x"):
        raise ValueError(f"{name}: '{VARIABLE}' has dims {src.dims}; expected ('y', 'x', 'band') "
                         "(transpose it, e.g. da.transpose('y', 'x', 'band'))")
    return src


@contextlib.contextmanager
def ledger_folder(ledger: str | None) -> Iterator[str]:
    """``ledger``, or a temporary folder (removed afterwards) when None."""
    if ledger is not None:
        yield ledger
        return
    tmp = tempfile.mkdtemp(prefix="aether-ledger-")
    try:
        yield f"{tmp}/ledger"  # (a build keeps bookkeeping beside its ledger: inside tmp too)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_chunks(build: RasterBuild, job: Callable[[int, int, tuple[int, int, int, int]],
                                                    tuple[Callable[..., Any], tuple]],
                 *, label: str, token: str, log: Any, progress: bool = True,
                 group: tuple[int, int] = (1, 1)) -> tuple[dict[str, dict[str, Any]], int]:
    """Compute every chunk the ledger lacks — one dask task each, ``job(i, j, window)``
    giving the function and arguments that compute chunk ``(i, j)`` — then finish the
    store. ``group``: submit the chunks in blocks of ``gy × gx`` (those reading the same
    input chunk, run one after another: see ``CheckedWindow.reuse``), else row by row.
    Returns ``(records of every chunk, chunks computed now)``."""
    import dask
    import dask.base

    from ..cluster import run_tasks
    from ..logs import Progress

    done = build.done()
    grid = build.grid()
    todo = [(i, j) for i, j in grid if chunk_key((i, j, 0)) not in done]
    gy, gx = group
    if (gy, gx) != (1, 1):
        todo.sort(key=lambda ij: (ij[0] // gy, ij[1] // gx, ij))
    if done:
        log.info(f"[{label}] resuming: {len(grid) - len(todo)} of {len(grid)} chunks already "
                 "written")
    task = dask.delayed(chunk_job, pure=True)
    # task keys name the store too: the same chunk of another build is another task
    # (a cluster still holding an earlier run's result must not answer for this one).
    # Schedulers order independent tasks by key (dask.order: the threaded one runs them
    # in reverse key order), so the keys carry the submission order: with i-j alone a
    # group's chunks ran a whole row of chunks apart and its input chunk was read again
    tok = dask.base.tokenize(token, build.store, build.ledger)
    width = len(str(len(todo)))
    tasks = []
    for n, (i, j) in enumerate(todo):
        fn, args = job(i, j, build.window(i, j))
        tasks.append(task(build, i, j, fn, *args,
                          dask_key_name=f"{label}-{tok}-{n:0{width}d}-{i}-{j}"))
    with Progress(log, label, len(grid), "chunks", done=len(grid) - len(todo),
                  every_s=None if progress else float("inf")) as prog:
        run_tasks(tasks, progress=prog)
    return build.finish(), len(todo)
