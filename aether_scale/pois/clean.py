"""Value-level cleaning for POI rows: text, encoding repair, descriptions and ids.

- :func:`clean_text` — NFC, control/zero-width characters → space, whitespace
  collapsed, ends trimmed, empty → missing; also strips (and reports) the marker
  the CSV reader's ``aether_cp1252`` decode-error handler puts before each byte it
  had to repair (the ``encoding`` repair count).
- :func:`build_descriptions` — the ready ``description`` column (with
  ``", named <name>."`` appended) or the configured template, per row.
- ``_ids`` — source ids → int64 ``poi_id`` (integers as they are, other strings
  hashed to a stable positive int64).

The ``aether_cp1252`` codec error handler is registered on import of this module.
All functions are vectorised pandas/numpy; no Python loop per row.
"""

from __future__ import annotations

import codecs
import re
import string

import numpy as np
import pandas as pd

from .errors import PoiInputError

__all__ = ["TEMPLATE_FIELDS", "clean_text", "build_descriptions"]

#: Fields a description template may use.
TEMPLATE_FIELDS: tuple[str, ...] = ("name", "category", "subcategory")
_MARK = "\ue000"  # private-use marker put before each byte repaired by the CSV error handler


# ----------------------------------------------------------------------------- encoding
def _cp1252_fallback(err: UnicodeDecodeError) -> tuple[str, int]:
    """Decode error handler: bytes invalid in the declared encoding → cp1252 (or latin-1
    for the five bytes cp1252 leaves undefined), each marked so the row can be counted."""
    bad = err.object[err.start : err.end]
    out = []
    for b in bad:
        one = bytes([b])
        try:
            out.append(_MARK + one.decode("cp1252"))
        except UnicodeDecodeError:
            out.append(_MARK + one.decode("latin-1"))
    return "".join(out), err.end


codecs.register_error("aether_cp1252", _cp1252_fallback)

_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u200b-\u200d\u2028\u2029\u2060\ufeff]")
_SPACES = re.compile(r"\s+")


def clean_text(values: pd.Series) -> tuple[pd.Series, pd.Series]:
    """Normalise a text column: NFC, control/zero-width characters → space, whitespace
    collapsed, ends trimmed, empty → missing.

    Returns ``(cleaned, repaired)`` where ``repaired`` is True on rows in which the CSV
    reader had to decode invalid bytes as cp1252 (their marker is removed here).
    Vectorised pandas string operations; no Python loop per row.
    """
    s = values.astype("string")
    repaired = s.str.contains(_MARK, regex=False).fillna(False).astype(bool)
    if repaired.any():
        s = s.str.replace(_MARK, "", regex=False)
    s = s.str.normalize("NFC")
    s = s.str.replace(_CONTROL, " ", regex=True).str.replace(_SPACES, " ", regex=True).str.strip()
    s = s.mask(s.str.len() == 0)
    return s, repaired


# ----------------------------------------------------------------------------- templates
def _template_parts(template: str, key: str) -> list[tuple[str, str | None]]:
    """``"A {x} b"`` → ``[("A ", "x"), (" b", None)]``; refuses unknown fields."""
    parts: list[tuple[str, str | None]] = []
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise PoiInputError(f"config pois.{key} = {template!r} is not a valid template: {e}") from None
    for literal, fld, spec, conv in parsed:
        if fld is not None and fld not in TEMPLATE_FIELDS:
            raise PoiInputError(
                f"config pois.{key} = {template!r} uses {{{fld}}}; allowed fields: "
                + ", ".join("{" + f + "}" for f in TEMPLATE_FIELDS)
            )
        if spec or conv:
            raise PoiInputError(f"config pois.{key}: format specs/conversions are not supported "
                                f"({{{fld}!{conv}:{spec}}})")
        parts.append((literal, fld))
    return parts


def _fill(parts: list[tuple[str, str | None]], cols: dict[str, pd.Series], index: pd.Index) -> pd.Series:
    out = pd.Series("", index=index, dtype="string")
    for literal, fld in parts:
        if literal:
            out = out + literal
        if fld is not None:
            out = out + cols[fld]
    return out


def build_descriptions(
    cols: dict[str, pd.Series | None],
    *,
    template: str,
    template_no_name: str,
    append_name: bool = True,
    index: pd.Index,
    named: np.ndarray | None = None,
) -> pd.Series:
    """Descriptions for one partition from already-cleaned role columns.

    ``cols`` maps ``name``/``category``/``subcategory``/``description`` to a string
    Series (missing = NA) or None when the role is not mapped. A row with a ready
    description uses it (plus ``", named <name>."`` when ``append_name`` and a name
    exists — a trailing period of the description is dropped first — unless the
    description already says ``"named <name>"`` (any case), as the reference's own POI
    format ``"…, named X."`` does: those rows are left as they are and flagged True in ``named``, a bool
    array the caller passes to count them); otherwise the
    template when a name exists, else ``template_no_name``. Missing template fields
    other than ``name`` make the description NA (the row is dropped as ``empty_text``).
    """
    na = pd.Series(pd.NA, index=index, dtype="string")
    filled = {f: (cols.get(f) if cols.get(f) is not None else na) for f in TEMPLATE_FIELDS}
    name = filled["name"]
    has_name = name.notna()
    with_name = _fill(_template_parts(template, "template"), filled, index)
    no_name = _fill(_template_parts(template_no_name, "template_no_name"), filled, index)
    out = with_name.where(has_name, no_name)
    ready = cols.get("description")
    if ready is not None:
        r = ready
        if append_name:
            both = (has_name & r.notna()).to_numpy()
            holds = np.zeros(len(r), dtype=bool)
            if both.any():  # "named <name>" already in the text (any case): not twice
                holds[both] = [f"named {n}".casefold() in d.casefold() for n, d in zip(
                    name[both].to_numpy(dtype=object), r[both].to_numpy(dtype=object),
                    strict=True)]
            if named is not None:
                named |= holds
            plus = r.str.replace(r"[\s.]+$", "", regex=True) + ", named " + name + "."
            r = plus.where(pd.Series(both & ~holds, index=r.index), r)
        # ready description first; the template fills rows that have none
        out = r.where(r.notna(), out)
    return out.mask(out.str.len() == 0)


# ----------------------------------------------------------------------------- ids
def _ids(values: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Source ids → (int64 poi_id, valid mask). Integers as they are; other strings
    hashed to a stable positive int64."""
    if pd.api.types.is_integer_dtype(values.dtype):
        valid = values.notna().to_numpy()
        return values.fillna(0).to_numpy(dtype=np.int64), valid
    num = pd.to_numeric(values, errors="coerce")
    as_text = values.astype("string").str.strip()
    valid = (as_text.notna() & (as_text.str.len() > 0)).to_numpy()
    integral = (num.notna() & (num == np.floor(num)) & (num.abs() < 2**62)).to_numpy()
    out = np.zeros(len(values), dtype=np.int64)
    out[integral] = num[integral].to_numpy(dtype=np.float64).astype(np.int64)
    other = valid & ~integral
    if other.any():
        h = pd.util.hash_array(as_text[other].to_numpy(dtype=object))
        out[other] = (h & np.uint64(2**63 - 1)).astype(np.int64)
    return out, valid
