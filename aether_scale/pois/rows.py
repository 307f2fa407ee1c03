"""Per-partition row rules: coordinates, ids, descriptions, reprojection, coverage.

``_prepare`` turns one source partition into the output columns plus a drop code
per row (``_reason``: 0 = kept, else ``DROP_REASONS`` position + 1 — the first rule
that fails, in order) and the repair flags (``non_point``, ``encoding``).
``_finish`` adds the global order key (``source * 2**40 + row in file``, also the
generated ``poi_id`` when no id column is mapped); ``_part_stats``, ``_kept_keys``
and ``_select`` feed the stage's accounting, duplicate-id pass and output
partitioning. All vectorised; no Python loop per POI.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import pandas as pd

from .clean import _ids, build_descriptions, clean_text
from .grid import RasterGrid
from .readers import SourceSpec

__all__ = ["DROP_REASONS"]

#: Drop buckets, in the order the rules are applied (code = position + 1).
DROP_REASONS: tuple[str, ...] = (
    "no_geometry",
    "nan_coords",
    "bad_id",
    "empty_text",
    "outside_coverage",
)
_KEEP = 0
_CODE = {name: i + 1 for i, name in enumerate(DROP_REASONS)}
_ROLE_TEXT = ("name", "category", "subcategory", "description")
_ID_STRIDE = 2**40


@lru_cache(maxsize=32)
def _transformer(src_wkt: str, dst_wkt: str):  # noqa: ANN202
    from pyproj import CRS, Transformer

    s, d = CRS.from_wkt(src_wkt), CRS.from_wkt(dst_wkt)
    if s == d:
        return None
    return Transformer.from_crs(s, d, always_xy=True)



def _prepare(
    pdf: pd.DataFrame,
    spec: SourceSpec,
    grid: RasterGrid,
    template: str,
    template_no_name: str,
    keep: dict[str, str | None],
) -> pd.DataFrame:
    """One source partition → the output columns plus ``_reason`` (0 = kept) and
    ``_row`` (row number inside the partition) and repair flags. Vectorised."""
    import shapely

    n = len(pdf)
    pdf = pdf.reset_index(drop=True)
    reason = np.zeros(n, dtype=np.int8)
    non_point = np.zeros(n, dtype=bool)

    def drop(mask: np.ndarray, name: str) -> None:
        reason[(reason == _KEEP) & mask] = _CODE[name]

    # coordinates in the source CRS
    if spec.kind == "geo":
        geoms = np.asarray(pdf.geometry.array, dtype=object) if n else np.empty(0, dtype=object)
        missing = shapely.is_missing(geoms) | shapely.is_empty(geoms)
        drop(missing, "no_geometry")
        tid = shapely.get_type_id(geoms)
        non_point = ~missing & (tid != 0)
        pts = geoms.copy()
        if non_point.any():
            pts[non_point] = shapely.point_on_surface(geoms[non_point])
        x = np.full(n, np.nan)
        y = np.full(n, np.nan)
        ok = ~missing
        x[ok] = shapely.get_x(pts[ok])
        y[ok] = shapely.get_y(pts[ok])
    else:
        x = pd.to_numeric(pdf[spec.xcol], errors="coerce").to_numpy(dtype=np.float64)
        y = pd.to_numeric(pdf[spec.ycol], errors="coerce").to_numpy(dtype=np.float64)
    finite = np.isfinite(x) & np.isfinite(y)
    drop(~finite, "nan_coords")

    # ids
    if "id" in spec.roles:
        poi_id, id_ok = _ids(pdf[spec.roles["id"]])
        drop(~id_ok, "bad_id")
    else:
        poi_id = np.full(n, -1, dtype=np.int64)  # assigned once row offsets are known

    # text
    repaired = np.zeros(n, dtype=bool)
    cols: dict[str, pd.Series | None] = {}
    for role in _ROLE_TEXT:
        if role in spec.roles:
            s, rep = clean_text(pdf[spec.roles[role]])
            cols[role] = s
            repaired |= rep.to_numpy()
        else:
            cols[role] = None
    already_named = np.zeros(n, dtype=bool)
    desc = build_descriptions(cols, template=template, template_no_name=template_no_name,
                              append_name=spec.append_name, index=pdf.index, named=already_named)
    drop(desc.isna().to_numpy(), "empty_text")

    # reproject and locate in the AE grid
    tr = _transformer(spec.crs_wkt, grid.crs_wkt)
    if tr is not None and finite.any():
        xx, yy = tr.transform(x[finite], y[finite])
        x = x.copy()
        y = y.copy()
        x[finite], y[finite] = xx, yy
    _, _, inside, chunk = grid.locate(x, y)
    drop(~inside, "outside_coverage")

    na = pd.Series(pd.NA, index=pdf.index, dtype="string")
    out = pd.DataFrame(
        {
            "poi_id": poi_id,
            "description": desc,
            "name": cols["name"] if cols["name"] is not None else na,
            "category": cols["category"] if cols["category"] is not None else na,
            "subcategory": cols["subcategory"] if cols["subcategory"] is not None else na,
            "source": np.full(n, spec.index, dtype=np.int16),
            "x": x,
            "y": y,
            "chunk_y": chunk[0],
            "chunk_x": chunk[1],
        },
        index=pdf.index,
    )
    for c, dtype in keep.items():
        if c in pdf.columns:
            out[c] = pdf[c].astype(dtype) if dtype else pdf[c]
        else:
            out[c] = pd.Series(pd.NA, index=pdf.index, dtype=dtype or "string")
    out["_reason"] = reason
    out["_row"] = np.arange(n, dtype=np.int64)
    out["_non_point"] = non_point
    out["_repaired"] = repaired
    out["_named"] = already_named
    return out


def _finish(part: pd.DataFrame, source: int, offset: int, generated: bool) -> pd.DataFrame:
    """Add the global order key (source, row in file); generate ids when not mapped."""
    part = part.copy()
    order = np.int64(source) * _ID_STRIDE + offset + part["_row"].to_numpy()
    part["_order"] = order
    if generated:
        part["poi_id"] = order
    return part


def _part_stats(part: pd.DataFrame) -> dict[str, int]:
    r = part["_reason"].to_numpy()
    out = {"rows": int(len(part))}
    for name, code in _CODE.items():
        out[name] = int((r == code).sum())
    out["non_point"] = int(part["_non_point"].to_numpy()[r == _KEEP].sum())
    out["encoding"] = int(part["_repaired"].to_numpy()[r == _KEEP].sum())
    out["already_named"] = int(part["_named"].to_numpy()[r == _KEEP].sum())
    return out


def _kept_keys(part: pd.DataFrame, ncx: int) -> pd.DataFrame:
    k = part[part["_reason"].to_numpy() == _KEEP]
    return pd.DataFrame({
        "poi_id": k["poi_id"].to_numpy(),
        "_order": k["_order"].to_numpy(),
        "_key": k["chunk_y"].to_numpy().astype(np.int64) * ncx + k["chunk_x"].to_numpy(),
    })


def _select(part: pd.DataFrame, dup_orders: np.ndarray, bounds: np.ndarray, lo: int, ncx: int) -> pd.DataFrame:
    """Rows of ``part`` that are kept, not duplicates, and whose chunk key falls in
    output partition ``lo`` (keys in ``[bounds[lo], bounds[lo+1])``)."""
    keep = part["_reason"].to_numpy() == _KEEP
    if len(dup_orders):
        keep &= ~np.isin(part["_order"].to_numpy(), dup_orders)
    key = part["chunk_y"].to_numpy().astype(np.int64) * ncx + part["chunk_x"].to_numpy()
    keep &= (key >= bounds[lo]) & (key < bounds[lo + 1])
    return part[keep]
