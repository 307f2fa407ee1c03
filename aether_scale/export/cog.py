"""Cloud Optimized GeoTIFF export of workspace rasters (fields, similarity, PCA RGB).

Workspace rasters are band-last Zarr v3 stores (``(y, x, C)``), which GDAL cannot open;
:func:`export_cog` writes one as a band-first COG (GeoTIFF band ``b`` = channel ``b``)
that any GIS reads:

- out of core: window by window (block-aligned, a few blocks at most) into a temporary
  tiled GeoTIFF beside the output, each window computing only its slice of the dask
  array; GDAL's COG driver then adds overviews and the COG replaces ``out`` atomically
  (temporaries are removed, also on failure) once rio-cogeo validates it;
- dtypes: float fields and similarity → float32 with NaN nodata (float16 converts
  exactly); an int8 field → ``int8`` keeps the aef-sqrt codes (nodata −128, the codec in
  the GDAL metadata) or ``float32`` decodes them; a :func:`pca_rgb` rendering → uint8
  RGB with nodata 0. Overviews average, except int8 codes (nearest: an average of
  sqrt codes is not the code of an average);
- grid: the CRS from ``spatial_ref``, the transform from the pixel-centre ``x``/``y``
  coordinates (the GeoTransform's exact values when it describes the same grid); the
  pixel centred on ``(x[0], y[0])`` is the top-left pixel;
- ``bbox`` (in the raster CRS or ``bbox_crs``) exports a window, snapped outward to whole
  pixels.

The module is a little over the project's ~400-line guide: the window writer, the
dtype/nodata rules and the grid derivation are one pipeline over one temporary file,
and each of them is a few dozen lines that the others call; the PCA rendering is the
one separable part (the seam, should it grow).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import aef
from ..stores.raster import raster_crs

if TYPE_CHECKING:
    import xarray as xr

__all__ = ["export_cog", "pca_rgb", "validate_cog"]

#: output dtype → its nodata; which outputs each kind of source allows (first: natural)
NODATA: dict[str, float] = {"float32": float("nan"), "int8": aef.NODATA, "uint8": 0}
ALLOWED = {"float": ("float32",), "int8": ("int8", "float32"), "uint8": ("uint8",)}
RESAMPLINGS = ("nearest", "average", "bilinear", "cubic", "cubicspline", "lanczos", "mode",
               "rms", "gauss")
COMPRESSIONS = ("deflate", "zstd", "lzw", "lzma", "lerc", "lerc_deflate", "lerc_zstd", "none")
WINDOW_BYTES = 64 * 2**20  #: most bytes (output dtype) one window holds in memory
PCA_MAX_BLOCKS = 32  #: chunks pca_rgb reads for its sample (when they hold enough pixels)
_CODEC_TAGS = {"codec": "aef-sqrt", "scale": str(aef.SCALE),
               "decode": "v = sign(q) * (q / scale) ** 2; q = -128 is nodata"}


def _where(da: Any) -> str:
    name = getattr(da, "name", None)
    return (f"raster '{name}' " if name else "raster ") + \
        f"(dims {tuple(getattr(da, 'dims', ()))}, shape {tuple(getattr(da, 'shape', ()))})"


def _check_dims(da: Any, where: str) -> None:
    import xarray as xr

    if not isinstance(da, xr.DataArray):
        raise ValueError(f"{where}: expected an xarray DataArray, got {type(da).__name__}; pass "
                         "the variable, e.g. ds['embedding']")
    if da.ndim != 3 or tuple(da.dims[:2]) != ("y", "x") or 0 in da.shape:
        raise ValueError(f"{where}: expected a non-empty band-last (y, x, C) raster; transpose "
                         "it, e.g. da.transpose('y', 'x', ...)")


def _axis(v: np.ndarray, step0: float | None, edge0: float | None, name: str, where: str
          ) -> tuple[float, float]:
    """(pixel size, outer edge of pixel 0) along one axis from its pixel-centre coords;
    the GeoTransform's exact values when they describe the same grid."""
    v = np.asarray(v, dtype=np.float64)
    step = (v[-1] - v[0]) / (v.size - 1) if v.size > 1 else step0
    if not step or not np.isfinite(step):
        raise ValueError(f"{where}: cannot tell the pixel size along {name} (one pixel and no "
                         "GeoTransform on spatial_ref); export a larger window")
    if v.size > 1 and not np.allclose(np.diff(v), step, rtol=1e-6, atol=0):
        raise ValueError(f"{where}: its {name} coordinates are not evenly spaced; a GeoTIFF "
                         "needs a regular grid — resample the raster first")
    if (step0 and edge0 is not None and abs(step0 - step) <= 1e-9 * abs(step)
            and abs(edge0 + step0 / 2 - v[0]) <= 1e-6 * abs(step)):
        return float(step0), float(edge0)
    return float(step), float(v[0] - step / 2)


def _grid(da: xr.DataArray, where: str) -> tuple[Any, tuple[float, float, float, float]]:
    """The raster's CRS (pyproj) and ``(a, c, e, f)``: x = a·col + c, y = e·row + f."""
    crs = raster_crs(da, where=where, required=False)
    if crs is None:
        raise ValueError(f"{where} has no CRS (no spatial_ref coordinate with crs_wkt); open it "
                         "with open_field/open_similarity (they keep spatial_ref) or set one "
                         "with da.rio.write_crs(...)")
    gt = da.coords["spatial_ref"].attrs.get("GeoTransform") if "spatial_ref" in da.coords else None
    c0 = a0 = f0 = e0 = None
    if gt:
        c0, a0, _, f0, _, e0 = (float(v) for v in str(gt).split())
    a, c = _axis(da["x"].values, a0, c0, "x", where)
    e, f = _axis(da["y"].values, e0, f0, "y", where)
    return crs, (a, c, e, f)


def _fmt(b: Sequence[float]) -> str:
    return "(" + ", ".join(f"{v:.10g}" for v in b) + ")"


def _window(bbox: Any, bbox_crs: str | None, crs: Any, grid: tuple[float, ...], height: int,
            width: int, where: str) -> tuple[int, int, int, int]:
    """Pixel window ``(r0, r1, c0, c1)`` covering ``bbox`` (outward to whole pixels)."""
    if bbox is None:
        return 0, height, 0, width
    from pyproj import CRS, Transformer

    a, c, e, f = grid
    try:
        vals = [float(v) for v in bbox]
    except (TypeError, ValueError):
        vals = []
    if len(vals) != 4 or not np.isfinite(vals).all() or vals[0] >= vals[2] or vals[1] >= vals[3]:
        raise ValueError(f"bbox {bbox!r} is not (minx, miny, maxx, maxy) of finite numbers with "
                         "minx < maxx and miny < maxy; pass it in that order")
    native, bcrs = vals, None
    if bbox_crs:
        bcrs = CRS.from_user_input(bbox_crs)
        native = Transformer.from_crs(bcrs, crs, always_xy=True).transform_bounds(
            *vals, densify_pts=21)
        if not np.isfinite(native).all():
            raise ValueError(f"bbox {_fmt(vals)} in {bbox_crs} cannot be transformed to "
                             f"{crs.to_string()}; pass (minx, miny, maxx, maxy) as lon/lat or x/y")
    # outward to whole pixels, up to 1e-6 px (a bbox on pixel edges takes just those pixels)
    xs = sorted(round((native[k] - c) / a, 6) for k in (0, 2))
    ys = sorted(round((native[k] - f) / e, 6) for k in (1, 3))
    c0, c1 = max(0, math.floor(xs[0])), min(width, math.ceil(xs[1]))
    r0, r1 = max(0, math.floor(ys[0])), min(height, math.ceil(ys[1]))
    if c0 < c1 and r0 < r1:
        return r0, r1, c0, c1
    xe, ye = sorted((c, c + width * a)), sorted((f, f + height * e))
    bounds = (xe[0], ye[0], xe[1], ye[1])
    msg = (f"bbox {_fmt(vals)}{f' ({bbox_crs})' if bbox_crs else ''} does not intersect {where}, "
           f"whose bounds are {_fmt(bounds)} in {crs.to_string()}")
    if bcrs is not None:
        back = Transformer.from_crs(crs, bcrs, always_xy=True).transform_bounds(
            *bounds, densify_pts=21)
        msg += f" = {_fmt(back)} in {bbox_crs}"
    hint = "" if bbox_crs else " (or pass bbox_crs, e.g. 'EPSG:4326', for longitude/latitude)"
    raise ValueError(f"{msg}; pass a bbox (minx, miny, maxx, maxy) inside those bounds{hint}")


def _tag(v: Any) -> str:
    return v if isinstance(v, str) else json.dumps(
        v, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o))


def _descriptions(da: xr.DataArray) -> list[str]:
    dim = da.dims[2]
    vals = da[dim].values if dim in da.coords else np.arange(da.shape[2])
    if vals.dtype.kind in "OUS":
        return [str(v) for v in vals]
    if vals.dtype.kind in "iu":
        return [f"{dim}_{int(v):03d}" for v in vals]
    return [f"{dim}_{i:03d}" for i in range(da.shape[2])]


def _block(da: xr.DataArray, r0: int, r1: int, c0: int, c1: int, dtype: str,
           nodata: Any) -> np.ndarray:
    """Window ``[r0:r1, c0:c1]`` of ``da`` as a band-first array of ``dtype`` (only this
    window's chunks are computed)."""
    x = da.data[r0:r1, c0:c1, :]
    x = np.asarray(x.compute() if hasattr(x, "compute") else x)
    if dtype == "float32":
        x = aef.decode(x) if x.dtype == np.int8 else x.astype(np.float32, copy=False)
        if nodata is not None and not np.isnan(nodata):
            x = np.where(np.isnan(x), np.float32(nodata), x)
    return np.ascontiguousarray(np.moveaxis(x, -1, 0))


def validate_cog(path: str | os.PathLike) -> tuple[bool, list[str], list[str]]:
    """``(is_valid, errors, warnings)`` of rio-cogeo's COG validation of ``path``."""
    from rio_cogeo.cogeo import cog_validate

    ok, errors, warnings = cog_validate(os.fspath(path), quiet=True)
    return bool(ok), list(errors), list(warnings)


def export_cog(da: xr.DataArray, out: str | os.PathLike, *, dtype: str = "float32",
               bbox: tuple[float, float, float, float] | None = None,
               bbox_crs: str | None = None, descriptions: Sequence[str] | None = None,
               nodata: Any = ..., tags: Mapping[str, Any] | None = None,
               overview_resampling: str | None = None, blocksize: int = 512,
               compress: str = "deflate", log: Any = None) -> dict[str, Any]:
    """Write the band-last raster ``da`` ``(y, x, C)`` as a band-first COG at ``out``.

    ``dtype``: ``float32`` (float sources; int8 codes decoded), ``int8`` (int8 codes as
    they are) or ``uint8`` (a :func:`pca_rgb` rendering). ``nodata`` defaults to the
    dtype's (NaN, −128, 0); a number for float32 replaces NaN, None writes none.
    ``descriptions`` name the bands (default: the channel coordinate, e.g. ``dim_000`` or
    the phrase); ``tags`` add GDAL metadata to the source's attrs. Returns a summary
    (path, size, bands, dtype, bbox and window, bytes, seconds, cog_valid, …).
    Raises ``ValueError`` for a bad input, request or bbox, ``RuntimeError`` when GDAL's
    output is not a valid COG (nothing is left at ``out`` then).
    """
    import rasterio
    import rasterio.shutil
    from affine import Affine
    from rasterio.enums import ColorInterp
    from rasterio.windows import Window

    from ..logs import Progress, get_logger

    log = log or get_logger("export")
    t0 = time.monotonic()
    where = _where(da)
    _check_dims(da, where)
    crs, (a, c, e, f) = _grid(da, where)
    src = np.dtype(da.dtype)
    kind = "float" if src.kind == "f" else {"int8": "int8", "uint8": "uint8"}.get(src.name)
    allowed = ALLOWED.get(kind or "", ())
    if dtype not in allowed:
        fix = (f"use dtype={' or '.join(map(repr, allowed))}" if allowed else
               "export a float, int8 (aef-sqrt codes) or uint8 (pca_rgb) raster")
        raise ValueError(f"{where} is {src}: it cannot be exported as dtype={dtype!r} (int8 keeps "
                         f"the codes of an int8 field, uint8 is for pca_rgb); {fix}")
    natural = NODATA[dtype]
    nodata = natural if nodata is ... else nodata
    if dtype != "float32" and nodata is not None and nodata != natural:
        raise ValueError(f"{where}: {dtype} output marks nodata with {natural}; pass "
                         f"nodata={natural} (the default) or None")
    out = os.fspath(out)
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise ValueError(f"{out}: the folder {parent} does not exist; create it first "
                         f"(mkdir -p {parent}) or choose another output path")
    if blocksize < 16 or blocksize % 16:
        raise ValueError(f"blocksize={blocksize}: GeoTIFF tiles need a multiple of 16; use 512")
    resampling = (overview_resampling or ("nearest" if dtype == "int8" else "average")).lower()
    if resampling not in RESAMPLINGS:
        raise ValueError(f"overview_resampling={overview_resampling!r} is not one of {RESAMPLINGS}")
    if compress.lower() not in COMPRESSIONS:
        raise ValueError(f"compress={compress!r} is not one of {COMPRESSIONS} (lossless or LERC); "
                         "use 'deflate' (the default) or 'zstd'")
    bands = da.shape[2]
    names = list(descriptions) if descriptions is not None else _descriptions(da)
    if len(names) != bands:
        raise ValueError(f"{where}: {len(names)} descriptions for {bands} bands; pass one per band")
    drop = {"dtype", "grid_mapping", "nodata", "_FillValue", "color_interpretation"}
    if kind == "int8" and dtype == "float32":
        drop |= set(_CODEC_TAGS)
    meta = {str(k): _tag(v) for k, v in da.attrs.items() if k not in drop}
    meta.update(source_dtype=str(src), **(_CODEC_TAGS if dtype == "int8" else {}))
    if kind == "int8" and dtype == "float32":
        meta["decoded_from"] = "int8 aef-sqrt codes: v = sign(q) * (q / 127.5) ** 2"
    meta.update({str(k): _tag(v) for k, v in (tags or {}).items()})

    r0, r1, c0, c1 = _window(bbox, bbox_crs, crs, (a, c, e, f), da.shape[0], da.shape[1], where)
    h, w = r1 - r0, c1 - c0
    chunks = getattr(da.data, "chunks", None)
    m = max(1, max(chunks[0][0], chunks[1][0]) // blocksize) if chunks else 1
    while m > 1 and (m * blocksize) ** 2 * bands * np.dtype(dtype).itemsize > WINDOW_BYTES:
        m -= 1
    step = m * blocksize
    windows = [(i, min(i + step, h), j, min(j + step, w))
               for i in range(0, h, step) for j in range(0, w, step)]
    transform = Affine(a, 0.0, c + c0 * a, 0.0, e, f + r0 * e)
    rgb = dtype == "uint8" and bands == 3 and da.attrs.get("color_interpretation") == "RGB"
    profile = dict(driver="GTiff", width=w, height=h, count=bands, dtype=dtype,
                   crs=crs.to_wkt(), transform=transform, nodata=nodata, tiled=True,
                   blockxsize=blocksize, blockysize=blocksize, compress="deflate", zlevel=1,
                   bigtiff="IF_SAFER")
    base = f".{os.path.basename(out)}."
    tmp = tempfile.mkstemp(prefix=base, suffix=".tmp.tif", dir=parent)
    cog = tempfile.mkstemp(prefix=base, suffix=".cog.tif", dir=parent)
    for fd, _ in (tmp, cog):
        os.close(fd)
    try:
        with rasterio.open(tmp[1], "w", **profile) as dst, \
                Progress(log, "export", len(windows), "windows") as prog:
            for b, text in enumerate(names, 1):
                dst.set_band_description(b, str(text))
            if rgb:
                dst.colorinterp = [ColorInterp.red, ColorInterp.green, ColorInterp.blue]
            dst.update_tags(**meta)
            with ThreadPoolExecutor(1) as pool:  # reads the next window while GDAL writes
                def read(k: int) -> Any:
                    wr0, wr1, wc0, wc1 = windows[k]
                    return pool.submit(_block, da, r0 + wr0, r0 + wr1, c0 + wc0, c0 + wc1,
                                       dtype, nodata)
                pending = read(0)
                for k, (wr0, wr1, wc0, wc1) in enumerate(windows):
                    block = pending.result()
                    if k + 1 < len(windows):
                        pending = read(k + 1)
                    dst.write(block, window=Window(wc0, wr0, wc1 - wc0, wr1 - wr0))
                    prog.advance()
        opts = dict(BLOCKSIZE=blocksize, COMPRESS=compress.upper(), BIGTIFF="IF_SAFER",
                    OVERVIEW_RESAMPLING=resampling.upper(), NUM_THREADS="ALL_CPUS")
        if compress.lower() in ("deflate", "lzw", "zstd", "lzma"):
            opts["PREDICTOR"] = "YES"
        rasterio.shutil.copy(tmp[1], cog[1], driver="COG", **opts)
        ok, errors, warnings = validate_cog(cog[1])
        if not ok:
            raise RuntimeError(f"{out}: GDAL's COG driver wrote a file that is not a valid COG "
                               f"({'; '.join(errors)}); nothing was written — report this with "
                               f"the GDAL version ({rasterio.__gdal_version__})")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(cog[1], 0o666 & ~umask)  # mkstemp made it private; an export is for sharing
        os.replace(cog[1], out)
    finally:
        for p in (tmp[1], cog[1]):
            if os.path.exists(p):
                os.remove(p)
    with rasterio.open(out) as done:
        overviews = done.overviews(1)
    xe, ye = sorted((transform.c, transform.c + w * a)), sorted((transform.f, transform.f + h * e))
    summary = {"path": out, "width": w, "height": h, "bands": bands, "dtype": dtype,
               "nodata": "NaN" if nodata is not None and np.isnan(nodata) else nodata,
               "crs": crs.to_string(), "transform": tuple(transform)[:6],
               "bbox": (xe[0], ye[0], xe[1], ye[1]),
               "window": {"row_off": r0, "col_off": c0, "height": h, "width": w},
               "blocksize": blocksize, "compress": compress, "overview_resampling": resampling,
               "overviews": list(overviews), "bytes": os.path.getsize(out),
               "seconds": round(time.monotonic() - t0, 3), "cog_valid": ok,
               "cog_warnings": warnings}
    log.info(f"[export] {out}: {w}×{h} px, {bands} band(s) {dtype}, overviews {overviews}, "
             f"{summary['bytes'] / 2**20:,.1f} MiB in {summary['seconds']:.1f} s")
    return summary


# --------------------------------------------------------------------------- PCA RGB
def _as_float(x: np.ndarray) -> np.ndarray:
    return aef.decode(x) if x.dtype == np.int8 else x.astype(np.float32)


def _rgb_block(x: np.ndarray, mean: np.ndarray, comps: np.ndarray, lo: np.ndarray,
               span: np.ndarray) -> np.ndarray:
    v = _as_float(x)
    valid = np.isfinite(v).all(axis=-1)
    v[~valid] = 0.0
    s = (v.reshape(-1, v.shape[-1]) - mean) @ comps.T
    q = np.clip(np.rint(1.0 + 254.0 * (s - lo) / span), 1, 255).reshape(*v.shape[:2], 3)
    return np.where(valid[..., None], q, 0).astype(np.uint8)


def pca_rgb(field_da: xr.DataArray, *, sample: int = 200_000, seed: int = 0) -> xr.DataArray:
    """A lazy ``(y, x, band)`` uint8 RGB rendering of a field's first 3 principal components.

    The PCA is fitted on up to ``sample`` valid pixels drawn at random (``seed``) from
    randomly chosen chunks (:data:`PCA_MAX_BLOCKS` of them when they hold enough
    pixels: only those are read); int8 codes are decoded first. Each component is
    scaled by the sample's 2nd–98th percentiles to 1…255; 0 is nodata. Same grid and
    ``spatial_ref`` as the field; ``band`` = PC1, PC2, PC3; the attrs hold the mean,
    components and percentiles (``rgb_formula``), so the rendering is reproducible.
    """
    import dask.array as dsa
    import xarray as xr

    where = _where(field_da)
    _check_dims(field_da, where)
    bands = field_da.shape[2]
    if bands < 3 or sample < 3:
        raise ValueError(f"{where}: pca_rgb needs at least 3 channels (it has {bands}) and a "
                         f"sample of at least 3 pixels (sample={sample})")
    data = field_da.data
    if not isinstance(data, dsa.Array):
        data = dsa.from_array(np.asarray(data), chunks=(512, 512, -1))
    data = data.rechunk({2: -1})
    rng = np.random.default_rng(seed)
    ny, nx = data.numblocks[:2]
    target = min(PCA_MAX_BLOCKS, ny * nx)
    parts: list[np.ndarray] = []
    n = 0
    for k, idx in enumerate(rng.permutation(ny * nx)):
        if n >= sample or (k >= target and n >= min(sample, 10 * bands)):
            break
        per = math.ceil((sample - n) / max(1, target - k))  # the blocks left share what is due
        v = _as_float(np.asarray(data.blocks[idx // nx, idx % nx].compute()))
        v = v.reshape(-1, bands)
        ok = np.flatnonzero(np.isfinite(v).all(axis=1))
        take = rng.choice(ok, size=min(per, ok.size, sample - n), replace=False)
        parts.append(v[np.sort(take)])
        n += take.size
    if n < 3:
        raise ValueError(f"{where}: only {n} valid pixel(s) found; a PCA rendering needs some "
                         "valid pixels (is the field all nodata?)")
    x = np.concatenate(parts)
    mean = x.mean(axis=0, dtype=np.float64)
    xc = x - mean.astype(np.float32)
    evals, evecs = np.linalg.eigh((xc.T @ xc).astype(np.float64) / max(n - 1, 1))
    comps = evecs[:, ::-1][:, :3].T
    comps *= np.sign(comps[np.arange(3), np.abs(comps).argmax(axis=1)])[:, None]
    scores = xc @ comps.T.astype(np.float32)
    lo, hi = np.percentile(scores, [2, 98], axis=0)
    span = np.where(hi > lo, hi - lo, 1.0)
    f32 = [np.asarray(t, dtype=np.float32) for t in (mean, comps, lo, span)]
    rgb = data.map_blocks(_rgb_block, *f32, dtype=np.uint8, chunks=(*data.chunks[:2], (3,)),
                          meta=np.empty((0, 0, 0), dtype=np.uint8))
    coords: dict[str, Any] = {"y": field_da["y"].variable, "x": field_da["x"].variable,
                              "band": np.array(["PC1", "PC2", "PC3"], dtype=object)}
    if "spatial_ref" in field_da.coords:
        coords["spatial_ref"] = field_da.coords["spatial_ref"].variable
    total = float(np.clip(evals, 0, None).sum()) or 1.0
    attrs = {"description": "RGB = PC1/PC2/PC3 of the field (pca_rgb)", "nodata": 0,
             "color_interpretation": "RGB",
             "pca_mean": mean.tolist(), "pca_components": comps.tolist(),
             "pca_p2": lo.tolist(), "pca_p98": hi.tolist(),
             "pca_explained_variance_ratio": (evals[::-1][:3] / total).tolist(),
             "pca_sample_pixels": int(n), "pca_seed": int(seed), "source_dtype": str(data.dtype),
             "rgb_formula": "clip(rint(1 + 254 * ((v - pca_mean) @ pca_components.T - pca_p2) / "
                            "(pca_p98 - pca_p2)), 1, 255); 0 = nodata; v decoded if int8"}
    if "spatial_ref" in coords:
        attrs["grid_mapping"] = "spatial_ref"
    return xr.DataArray(rgb, dims=("y", "x", "band"), coords=coords, attrs=attrs, name="rgb")
