"""Write a generated city to disk in the formats a real user has."""

from __future__ import annotations

import json
import os
from pathlib import Path

import geopandas as gpd
import numpy as np
import rasterio
from rasterio.transform import Affine

from .. import aef
from ..config import SynthSection
from . import vocab
from .city import City, generate_city, heldout_pois

NSSEC_COLUMNS = [f"ns-sec_{i}" for i in range(1, 10)]


def _block(n: int) -> int:
    """GeoTIFF block edge: 256, or for small tiles a multiple of 16 near half the edge."""
    return 256 if n > 256 else max(16, (n // 2 // 16) * 16)


def write_ae_tiles(city: City, folder: str | os.PathLike) -> list[str]:
    """Split the AE codes into ``n_tiles_x × n_tiles_y`` int8 AEF-style GeoTIFF tiles.

    Tiles are north-up, 10 m, 64 bands named A00…A63 (band descriptions),
    nodata −128, internally tiled and DEFLATE-compressed, pixel-interleaved like
    the published COGs. Returns the tile paths.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    n = city.size
    rows = np.array_split(np.arange(n), city.cfg.n_tiles_y)
    cols = np.array_split(np.arange(n), city.cfg.n_tiles_x)
    paths = []
    for rs in rows:
        for cs in cols:
            r0, c0, h, w = int(rs[0]), int(cs[0]), rs.size, cs.size
            t = city.transform
            transform = Affine(t.a, 0.0, t.c + c0 * t.a, 0.0, t.e, t.f + r0 * t.e)
            path = folder / f"aef_synth_{r0:06d}_{c0:06d}.tif"
            profile = {
                "driver": "GTiff", "dtype": "int8", "count": aef.N_BANDS, "height": h, "width": w,
                "crs": city.crs, "transform": transform, "nodata": aef.NODATA, "tiled": True,
                "blockxsize": _block(w), "blockysize": _block(h), "compress": "deflate",
                "zlevel": 1, "interleave": "pixel",
            }
            tmp = path.with_suffix(".tif.tmp")
            with rasterio.open(tmp, "w", **profile) as dst:
                for i, name in enumerate(aef.BAND_NAMES, start=1):
                    dst.set_band_description(i, name)
                dst.write(np.ascontiguousarray(city.codes[r0 : r0 + h, c0 : c0 + w].transpose(2, 0, 1)))
                dst.update_tags(source="aether_scale synthetic city", seed=str(city.cfg.seed))
            os.replace(tmp, path)
            paths.append(str(path))
    return paths


def _points(df, columns: list[str], crs: str) -> gpd.GeoDataFrame:
    return gpd.GeoDataFrame(df[columns].copy(), geometry=gpd.points_from_xy(df["x"], df["y"]), crs=crs)


def write_city(out_dir: str | os.PathLike, cfg: SynthSection | None = None) -> dict[str, str]:
    """Generate the city for ``cfg`` and write it under ``out_dir``.

    Layout: ``ae/aef_synth_<row>_<col>.tif`` (AE tiles), ``pois.parquet``
    (GeoParquet: poi_id, name, category, subcategory), ``pois_heldout.parquet`` (an
    independent second draw, truth for retrieval evaluation), ``luc_points.geojson``
    (loc_id, landuse_id, landuse), ``sdm_units.geojson`` (unit_id, unit_name,
    ns-sec_1…9), ``truth.npz`` (hidden fields, see :func:`write_truth`) and
    ``city.json`` (config + class names). All vectors are in the AE CRS.

    Returns paths keyed ``ae_tiles`` (a glob pattern), ``pois``, ``pois_heldout``, ``luc_points``,
    ``sdm_units``, ``truth``, ``meta``. Raises ``OSError`` when ``out_dir``
    cannot be written.
    """
    cfg = cfg or SynthSection()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    city = generate_city(cfg)
    ae_dir = out / "ae"
    if ae_dir.exists():  # a rerun with another size must not leave stale tiles behind
        for old in ae_dir.glob("aef_synth_*.tif"):
            old.unlink()
    write_ae_tiles(city, ae_dir)

    pois = _points(city.pois, ["poi_id", "name", "category", "subcategory"], city.crs)
    pois["poi_id"] = pois["poi_id"].astype("int64")
    pois.to_parquet(out / "pois.parquet", index=False)

    luc = _points(city.luc, ["loc_id", "landuse_id", "landuse"], city.crs)
    _write_geojson(luc, out / "luc_points.geojson")
    units = _points(city.units, ["unit_id", "unit_name", *NSSEC_COLUMNS], city.crs)
    _write_geojson(units, out / "sdm_units.geojson")

    held = heldout_pois(city)
    held = _points(held, ["poi_id", "name", "category", "subcategory"], city.crs)
    held.to_parquet(out / "pois_heldout.parquet", index=False)

    write_truth(city, out / "truth.npz")
    meta = {
        "config": cfg.model_dump(mode="json"),
        "crs": city.crs,
        "transform": list(city.transform)[:6],
        "size_px": city.size,
        "landuse_names": list(vocab.LANDUSE_NAMES),
        "morph_names": list(vocab.MORPH_NAMES),
        "socio_names": ["affluence", "student"],
        "counts": {"pois": len(city.pois), "luc_points": len(city.luc), "sdm_units": len(city.units),
                   "nodata_pixels": int((~city.valid).sum())},
    }
    (out / "city.json").write_text(json.dumps(meta, indent=2))
    return city_paths(out)


def city_paths(out_dir: str | os.PathLike) -> dict[str, str]:
    """Where :func:`write_city` puts each file under ``out_dir`` (written or not)."""
    out = Path(out_dir)
    return {
        "ae_tiles": str(out / "ae" / "*.tif"),
        "pois": str(out / "pois.parquet"),
        "pois_heldout": str(out / "pois_heldout.parquet"),
        "luc_points": str(out / "luc_points.geojson"),
        "sdm_units": str(out / "sdm_units.geojson"),
        "truth": str(out / "truth.npz"),
        "meta": str(out / "city.json"),
    }


def _write_geojson(gdf: gpd.GeoDataFrame, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        tmp.unlink()
    gdf.to_file(tmp, driver="GeoJSON")
    os.replace(tmp, path)


def write_truth(city: City, path: str | os.PathLike) -> None:
    """Save the hidden truth (for tests and diagnostics, never for the pipeline) as .npz:
    ``landuse``, ``morph``, ``parcel``, ``socio`` (2, H, W), ``valid``, ``transform``,
    ``crs``; per unit ``unit_id``, ``unit_socio`` (300 m means), ``unit_p`` (noise-free
    NS-SeC); per POI ``poi_id``, ``poi_socio``; per LUC point ``loc_id``, ``luc_landuse_id``."""
    u, p = city.units, city.pois
    np.savez_compressed(
        path,
        landuse=city.landuse, morph=city.morph, parcel=city.parcel, socio=city.socio,
        valid=city.valid, transform=np.asarray(list(city.transform)[:6]), crs=np.asarray(city.crs),
        unit_id=u["unit_id"].to_numpy(dtype=str),
        unit_socio=u[["socio_1", "socio_2"]].to_numpy(),
        unit_p=u[[f"p_{i}" for i in range(1, 10)]].to_numpy(),
        poi_id=p["poi_id"].to_numpy(), poi_socio=p[["affluence", "student"]].to_numpy(),
        loc_id=city.luc["loc_id"].to_numpy(), luc_landuse_id=city.luc["landuse_id"].to_numpy(),
    )
