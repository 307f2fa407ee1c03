"""``field*.zarr``: an AETHER embedding field, one per model variant (written by ``infer``).

Variable ``embedding`` of dims (``y``, ``x``, ``dim``) on exactly the grid of
``ae.zarr`` (same ``x``/``y`` coordinates, ``spatial_ref`` CRS and transform, nodata
mask). Its attributes say how to read it without this package:

- ``dtype: float16`` (default): unit-vector components; masked pixels are NaN in every
  component (the Zarr fill value, so all-nodata chunks are not stored). 256 B/pixel.
- ``dtype: int8``: the AlphaEarth sqrt codec, per component ``q = round(sign(v) ·
  sqrt(|v|) · 127.5)`` clipped to −127…127, decoded ``v = sign(q) · (q / 127.5)²``
  (:mod:`aether_scale.aef`, bit-identical to the AEF GeoTIFFs); masked pixels are −128
  in every component. 128 B/pixel, half the float16 field. Error bound (proved in
  :func:`int8_cosine_bound`, checked in the tests): per component
  ``|v' − v| ≤ sqrt(|v|)/127.5 + 1/(4·127.5²)``, hence per pixel
  ``cos(v', v) ≥ sqrt(1 − ε²)``, ``ε² = √D/127.5² + D^¾/(2·127.5³) + D/(16·127.5⁴)``:
  **≥ 0.99964 for every unit 128-d vector**, one-hot, all-equal and peaky ones included
  (``benchmarks/results/field_read.json``: min 0.99986, mean 0.99990 over 440k outputs of
  the trained London projector on real AlphaEarth vectors and of a random projector;
  vectors built on rounding midpoints reach 0.99966). The decoded vector's norm is
  1 ± 0.027: divide by it for cosines. The attrs record ``codec``, ``scale``, ``nodata``,
  ``encode``, ``decode``, ``error_bound`` and ``cosine_min``. Why not a per-pixel scale
  (a float16 max-abs per pixel, +2 B/pixel, mean cosine 0.99998): with linear codes its
  worst case is *worse* (0.99907 on adversarial vectors), with sqrt codes better (0.99987)
  but both need a companion array and readers of their own, while this bound already
  holds for every unit vector and every reader of AE codes (pooling, query, COG export)
  reads the field unchanged.

Chunking (``benchmarks/bench_field_read.py``): one ``infer`` task computes a *write
chunk* (``infer.chunk_px``, up to 512 px) and stores it as Zarr chunks of
``infer.read_chunk_px`` (default 128 px: 2 MiB int8, 4 MiB float16), so a 100 × 100 px
window fetches 5.3 MiB (int8; 11 MiB float16) instead of 32 MiB (70 MiB) with 512-px
chunks, at the same full-read and commit speed, while tasks, ledger records and resume
stay one per write chunk; the cost is 16× more objects (a longer listing when a store is
opened). Zarr v3 sharding (one object per write chunk, 128-px inner chunks by byte
range, crc32c on each inner chunk and the shard index) reads the same bytes in one more
request per shard and keeps the object count, but the chunk index and checked reads of
:mod:`.chunks` and :mod:`.reads` address objects by ``arr.chunks`` — the *inner* chunk of a
sharded array — so they need to learn shards first.

Open with :func:`open_field`: checked like every workspace raster, dask chunks of one
write chunk (the stages' task size) whose reads fetch only the Zarr chunks a selection
touches; ``decode=True`` gives float32 unit vectors with NaN nodata for either dtype.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import aef
from .chunks import StoreRef, chunk_grid, chunk_key, chunk_slices, finish_store, read_index
from .raster import VARIABLE, RasterBuild, open_raster
from .reads import ChunkReader

if TYPE_CHECKING:
    import xarray as xr

__all__ = ["NAME", "FieldBuild", "codec_attrs", "decode", "fill_value", "int8_cosine_bound",
           "open_field", "read_chunk", "template"]

NAME = "field.zarr"
PRODUCER = "infer"
FORMAT_VERSION = 4  # 3: codec and error bound in the attrs, read chunks inside write chunks;
#                     4: zstd level 1
#: zstd level of the field's chunks: on float16 fields of real AE (per-pixel variation)
#: level 1 compresses as well as zarr's default (level 3: ratio 1.446 vs 1.446) at 1.3×
#: its speed (386 vs 289 MB/s on one core here); compression is the largest cost of
#: inference after the projector's GEMMs
ZSTD_LEVEL = 1
#: default Zarr chunk edge: a 100 × 100 px read fetches ≤ 4 chunks of 2 MiB (int8)
READ_CHUNK_PX = 128
_FIX = f"run `aether-scale {PRODUCER} --force`"


# --------------------------------------------------------------------------- codec
def int8_cosine_bound(dim: int) -> float:
    """The least cosine between a unit ``dim``-vector and its int8 (AEF sqrt) decoding.

    Each code is the rounded ``s = sqrt(|v|)·127.5`` (error ≤ ½, also where 127.5 is
    clipped to 127), so ``|v' − v| ≤ (2s·½ + ¼)/127.5² = sqrt(|v|)/127.5 + 1/(4·127.5²)``.
    Summed over components with ``Σ|v| ≤ √D`` and ``Σ sqrt(|v|) ≤ D^¾`` (Cauchy–Schwarz on
    a unit vector), ``‖v' − v‖² ≤ ε² = √D/127.5² + D^¾/(2·127.5³) + D/(16·127.5⁴)``, and a
    vector within ε of a unit vector makes an angle of at most ``asin ε`` with it:
    ``cos ≥ sqrt(1 − ε²)`` (0.999647 for D = 128; a two-level adversarial vector reaches
    0.99966, so the bound is tight).
    """
    s = aef.SCALE
    eps2 = math.sqrt(dim) / s**2 + dim**0.75 / (2 * s**3) + dim / (16 * s**4)
    return math.sqrt(max(0.0, 1.0 - eps2))


def codec_attrs(dtype: str, dim: int) -> dict[str, Any]:
    """The attributes that tell a reader (any Zarr/xarray user) how to decode the field."""
    if dtype == "float16":
        return {"dtype": "float16", "codec": "none", "nodata": "NaN",
                "decode": "v = float32(x); masked pixels are NaN in every component"}
    if dtype != "int8":
        raise ValueError(f"field dtype {dtype!r}: use float16 or int8")
    bound = math.floor(int8_cosine_bound(dim) * 1e5) / 1e5
    return {
        "dtype": "int8",
        "codec": "aef-sqrt",
        "codec_reference": "AlphaEarth Foundations satellite embedding GeoTIFFs (aether_scale.aef)",
        "scale": aef.SCALE,
        "nodata": aef.NODATA,
        "encode": "q = clip(round(sign(v) * sqrt(abs(v)) * scale), -127, 127); q = nodata "
                  "where the pixel is masked",
        "decode": "v = sign(q) * (q / scale) ** 2 for q != nodata, else NaN; divide v by its "
                  "L2 norm for a unit vector (norm 1 ± 0.027)",
        "error_bound": "per component |v' - v| <= sqrt(|v|) / scale + 1 / (4 * scale**2); "
                       f"per pixel cos(v', v) >= {bound} for unit vectors of dim {dim}",
        "cosine_min": bound,
    }


def decode(x: np.ndarray, *, normalize: bool = True) -> np.ndarray:
    """Field values ``(…, dim)`` → float32: int8 aef-sqrt codes are decoded (a pixel with
    any −128 is NaN), float16 is widened; ``normalize`` divides every pixel by its L2
    norm (unit vectors; NaN stays NaN)."""
    x = np.asarray(x)
    if x.dtype == np.int8:
        v = aef.decode_fast(x)
        bad = np.any(x == aef.NODATA, axis=-1)
        if bad.any():
            v[bad] = np.nan
    elif np.issubdtype(x.dtype, np.floating):
        v = x.astype(np.float32)
    else:
        raise TypeError(f"a field holds int8 codes or floats, not {x.dtype}")
    if normalize and v.size:
        n = np.sqrt(np.einsum("...i,...i->...", v, v))
        with np.errstate(invalid="ignore"):
            v /= np.maximum(n, np.float32(1e-30))[..., None]
    return v


_DECODE = decode  # for open_field, whose flag of the same name hides it


def fill_value(dtype: str) -> Any:
    """The nodata value of a field of ``dtype`` (``float16`` → NaN, ``int8`` → −128)."""
    return aef.NODATA if dtype == "int8" else np.float16(np.nan)


def read_chunk(write: int, requested: int | None = None) -> int:
    """The Zarr chunk edge inside a write chunk of edge ``write``: ``requested`` (which
    must divide it; larger means the write chunk), else the largest divisor of it up to
    :data:`READ_CHUNK_PX`."""
    if requested is not None:
        if requested >= write:
            return int(write)
        if write % requested:
            raise ValueError(f"infer.read_chunk_px {requested} must divide the field's write "
                             f"chunk edge {write} (infer.chunk_px): each Zarr chunk lies in one "
                             "write chunk")
        return int(requested)
    for d in range(min(write, READ_CHUNK_PX), 0, -1):
        if write % d == 0:
            return d
    return int(write)


# --------------------------------------------------------------------------- writing
def template(ae: xr.Dataset | xr.DataArray, out_dim: int, chunks: tuple[int, int], dtype: str,
             attrs: Mapping[str, Any], *, read_chunks: tuple[int, int] | None = None
             ) -> xr.Dataset:
    """The field's Dataset on the grid of ``ae`` (coords, ``spatial_ref``), around a lazy,
    never computed array; ``chunks`` is the write chunk, ``read_chunks`` (default the
    same) the Zarr chunk it is stored in; ``attrs`` describe the model."""
    import dask.array as dsa
    import xarray as xr

    da = ae["embedding"] if isinstance(ae, xr.Dataset) else ae
    np_dtype = np.int8 if dtype == "int8" else np.float16
    ry, rx = read_chunks or chunks
    if chunks[0] % ry or chunks[1] % rx:
        raise ValueError(f"read chunks {ry}×{rx} must divide the write chunks "
                         f"{chunks[0]}×{chunks[1]}")
    data = dsa.zeros((da.sizes["y"], da.sizes["x"], out_dim), dtype=np_dtype,
                     chunks=(ry, rx, out_dim))
    attrs = {"description": "AETHER embedding field: the AE projector applied to every AE pixel",
             **codec_attrs(dtype, out_dim), **dict(attrs),
             "write_chunk_px": [int(chunks[0]), int(chunks[1])]}
    coords = {"y": da["y"].values, "x": da["x"].values,
              "dim": np.arange(out_dim, dtype=np.int32)}
    var = xr.DataArray(data, dims=("y", "x", "dim"), coords=coords, attrs=attrs)
    ds = xr.Dataset({"embedding": var})
    if "spatial_ref" in da.coords:
        var.attrs["grid_mapping"] = "spatial_ref"
        ds = ds.assign_coords(spatial_ref=da.coords["spatial_ref"].variable)
        ds["embedding"].attrs["grid_mapping"] = "spatial_ref"
    for k in ("x", "y"):
        ds[k].attrs.update(da[k].attrs)
    ds.attrs.update(field_format_version=FORMAT_VERSION)
    return ds


@dataclass(frozen=True)
class FieldBuild(RasterBuild):
    """A field being built: one task, one ledger record per *write chunk* ``block``
    (pixels), each stored as the Zarr chunks (``chunks``) it covers.

    The grid, windows and ledger keys are the write chunks', so resume works per write
    chunk as for every raster; :meth:`commit` writes only the Zarr chunks holding a
    valid pixel and records which it left out, and :meth:`finish` gives the chunk index
    (:func:`~.chunks.finish_store`) one record per Zarr chunk. With ``block`` equal to
    the chunks this is exactly :class:`~.raster.RasterBuild`.
    """

    block: tuple[int, int] = field(default=(0, 0))

    def create(self, template: xr.Dataset, *, fill_value: Any, token: str,
               block: tuple[int, int] | None = None) -> FieldBuild:
        base = RasterBuild.create(self, template, fill_value=fill_value, token=token,
                                  zstd_level=ZSTD_LEVEL)
        blk = tuple(int(b) for b in (block or base.chunks[:2]))
        if blk[0] % base.chunks[0] or blk[1] % base.chunks[1]:
            raise ValueError(f"write chunk {blk} is not a multiple of the Zarr chunk "
                             f"{base.chunks[:2]}")
        return FieldBuild(base.store, base.ledger, base.chunks, base.shape, base.variable,
                          blk)  # type: ignore[arg-type]

    def grid(self) -> list[tuple[int, int]]:
        ny = -(-self.shape[0] // self.block[0])
        nx = -(-self.shape[1] // self.block[1])
        return [(i, j) for i in range(ny) for j in range(nx)]

    def window(self, i: int, j: int) -> tuple[int, int, int, int]:
        by, bx = self.block
        return i * by, min((i + 1) * by, self.shape[0]), j * bx, min((j + 1) * bx, self.shape[1])

    def _inner(self, i: int, j: int) -> list[tuple[int, int]]:
        """The Zarr chunk indices inside write chunk ``(i, j)``."""
        ky, kx = self.block[0] // self.chunks[0], self.block[1] // self.chunks[1]
        gy, gx, _ = chunk_grid(self.shape, self.chunks)
        return [(a, b) for a in range(i * ky, min((i + 1) * ky, gy))
                for b in range(j * kx, min((j + 1) * kx, gx))]

    def commit(self, i: int, j: int, block: np.ndarray | None, stats: Mapping[str, Any]
               ) -> dict[str, Any]:
        """Write the Zarr chunks of write chunk ``(i, j)`` that hold a valid pixel
        (``block`` None: none does) and record them; returns the record."""
        empty: list[list[int]] = []
        if block is not None:
            r0, _, c0, _ = self.window(i, j)
            # the empty Zarr chunks are left out here (_all_nodata), not by Zarr
            arr = self.store.array(self.variable, mode="r+", write_empty_chunks=True)
            for a, b in self._inner(i, j):
                sy, sx, _ = chunk_slices((a, b, 0), self.shape, self.chunks)
                part = block[sy.start - r0:sy.stop - r0, sx.start - c0:sx.stop - c0]
                if _all_nodata(part):
                    empty.append([a, b])
                else:
                    arr[sy, sx, :] = part
        rec = {"empty": block is None or len(empty) == len(self._inner(i, j)),
               "empty_chunks": empty, **stats}
        self.ledger.record(chunk_key((i, j, 0)), rec)
        return rec

    def finish(self) -> dict[str, dict[str, Any]]:
        """Check every Zarr chunk is accounted for, consolidate, write the index; returns
        the write chunks' records."""
        records = self.done()
        per_chunk: dict[str, dict[str, Any]] = {}
        for i, j in self.grid():
            rec = records.get(chunk_key((i, j, 0)))
            if rec is None:  # left out: finish_store names the chunk never computed
                continue
            gone = {tuple(e) for e in rec.get("empty_chunks", [])}
            for a, b in self._inner(i, j):
                per_chunk[chunk_key((a, b, 0))] = {"empty": bool(rec["empty"]) or (a, b) in gone}
        finish_store(self.store, tracked={self.variable: per_chunk})
        return records


def _all_nodata(part: np.ndarray) -> bool:
    """Whether a block of the kernel's output holds no valid pixel. The kernel writes a
    pixel either whole (finite; int8 components clamped to ±127) or as nodata in every
    component, so the first component decides (a 128th of a full scan)."""
    first = part[..., 0]
    if part.dtype == np.int8:
        return bool((first == aef.NODATA).all())
    return bool(np.isnan(first).all())


# --------------------------------------------------------------------------- reading
def open_field(uri: str | os.PathLike, *, storage_options: Mapping[str, Any] | None = None,
               decode: bool = False, chunks: str = "write") -> xr.Dataset:
    """Open a ``field*.zarr`` lazily, checked (see :func:`~.raster.open_raster`).

    ``embedding`` is a dask array whose chunks are the field's write chunks
    (``chunks="write"``, the unit the stages work in) or its Zarr chunks
    (``chunks="read"``); either way a selection reads only the Zarr chunks it touches,
    each checked (a damaged one raises :class:`~.chunks.CorruptStoreError` naming it).
    ``decode=False`` keeps the stored values (int8 aef-sqrt codes with −128, or float16
    with NaN: what the pooling, query and COG export read); ``decode=True`` gives
    float32 unit vectors with NaN nodata for either dtype (:func:`decode`; the codec's
    attrs move to ``attrs["decoded_from"]``).
    """
    import dask.array as dsa
    import xarray as xr
    from dask.base import tokenize

    if chunks not in ("write", "read"):
        raise ValueError(f"chunks={chunks!r}: use 'write' or 'read'")
    ds = open_raster(uri, storage_options=storage_options, producer=PRODUCER,
                     channel_dims=("dim",))
    ref = StoreRef.of(uri, storage_options)
    index = read_index(ref)
    reader = ChunkReader(ref, VARIABLE, index, fix=_FIX, transform=_DECODE if decode else None,
                         dtype=np.float32)
    emb = ds[VARIABLE]
    attrs = dict(emb.attrs)
    if chunks == "write" and "write_chunk_px" in attrs:
        by, bx = (int(c) for c in attrs["write_chunk_px"])
    else:
        by, bx = reader.chunks[:2]
    name = f"field-{'decoded' if decode else 'raw'}-" + tokenize(ref, reader.stored, by, bx)
    # (the default getter: dask fuses a selection's slices into it, so a window reads only
    # the Zarr chunks it touches even though a dask chunk is a whole write chunk)
    data = dsa.from_array(reader, chunks=(by, bx, reader.shape[2]), name=name, asarray=False,
                          lock=False, meta=np.empty((0, 0, 0), dtype=reader.dtype))
    if decode:
        codec = {k: attrs.pop(k) for k in list(attrs)
                 if k in ("codec", "codec_reference", "scale", "nodata", "encode", "decode",
                          "error_bound", "cosine_min", "dtype")}
        attrs.update(dtype="float32", nodata="NaN", decoded_from=(
            f"{codec.get('dtype', reader.raw_dtype.name)} ({codec.get('codec', 'none')}) "
            "by aether_scale.stores.field.decode: unit vectors, NaN where masked"))
    out = xr.DataArray(data, dims=emb.dims, coords=emb.coords, attrs=attrs)
    out.encoding = {} if decode else dict(emb.encoding)
    ds[VARIABLE] = out
    return ds
