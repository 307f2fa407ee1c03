"""Opening POI sources lazily, one dask partition at a time, and checking the config.

- :func:`read_source` — GeoParquet files/datasets (``dask_geopandas``), plain
  parquet with coordinate columns (``dask.dataframe``), CSV read as
  ``CSV_BLOCKSIZE`` (64 MiB) byte blocks cut at newlines (every column as text,
  invalid bytes decoded via the ``aether_cp1252`` fallback handler registered in
  :mod:`.clean`), and any other vector format through pyogrio
  (``partition_rows`` features per partition).
- CSV blocks and quoted newlines: a quoted field may hold a newline, so a block
  cut at a newline can start or end inside a record. Each block is parsed on its
  own first (the common case: pandas' tokenizer ends it outside quotes); a tiny
  chain of per-block quote states (``_next_inside``) then tells every block
  whether it starts inside a quoted field. A block that does skips to its first
  newline outside quotes, and the block before reads on past its end up to that
  newline (``_read_records``), so every record is parsed exactly once, by the
  block it starts in. Memory per task: one block plus the straddling record
  (capped at ``MAX_RECORD_BYTES``); a quote left open fails with the byte offset
  and line of the quote (``_unbalanced_quote``).
- ``_resolve_source`` — checks a source's config against the file's columns and
  CRS and returns a :class:`SourceSpec`; every mismatch raises
  :class:`~.errors.PoiInputError` naming the file, the config key and the fix.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from typing import Any

import dask
import numpy as np
import pandas as pd

from ..config import PoiSource, PoisSection
from .clean import _MARK, _template_parts
from .errors import PoiInputError

__all__ = ["CSV_BLOCKSIZE", "MAX_RECORD_BYTES", "SourceSpec", "read_source"]

#: Bytes per CSV block, one dask partition each (cut at the next newline outside quotes).
CSV_BLOCKSIZE: int | str = "64MiB"
#: Longest a CSV record may run on past the end of its block (a quoted field holding
#: newlines). Longer almost always means an unbalanced quote swallowing the rest of the
#: file, so it fails instead of reading the file into memory.
MAX_RECORD_BYTES: int = 64 * 2**20

_CSV_SUFFIXES = (".csv", ".tsv", ".txt", ".csv.gz", ".tsv.gz", ".txt.gz")
_PARQUET_SUFFIXES = (".parquet", ".geoparquet", ".pq")


@dataclass
class SourceSpec:
    """A source resolved against its file: how to get coordinates and which columns to use."""

    index: int
    path: str
    kind: str  # "geo" (geometry column) or "xy" (coordinate columns)
    crs_wkt: str
    roles: dict[str, str]  # role → source column
    xcol: str | None = None
    ycol: str | None = None
    append_name: bool = True


def _suffix(path: str) -> str:
    p = path.lower().rstrip("/")
    for s in _CSV_SUFFIXES + _PARQUET_SUFFIXES:
        if p.endswith(s):
            return s
    return os.path.splitext(p)[1]


def _is_dir(path: str) -> bool:
    import fsspec

    fs, p = fsspec.core.url_to_fs(path)
    return fs.isdir(p)


def _csv_header(path: str, encoding: str) -> tuple[list[str], str]:
    """Column names and the delimiter of a CSV (first line, sniffed)."""
    import csv

    import fsspec

    with fsspec.open(path, "rb", compression="infer") as f:
        first = f.readline(1 << 20)
    text = first.decode(encoding, errors="aether_cp1252").replace(_MARK, "").lstrip("\ufeff")
    try:
        delim = csv.Sniffer().sniff(text, delimiters=",;\t|").delimiter
    except csv.Error:
        delim = ","
    names = next(csv.reader([text.rstrip("\r\n")], delimiter=delim))
    return names, delim


def _parse_csv_block(
    block: bytes, *, names: list[str], header: bool, sep: str, encoding: str, usecols: list[str]
) -> pd.DataFrame:
    import io

    df = pd.read_csv(
        io.BytesIO(block),
        sep=sep,
        header=0 if header else None,
        names=names,
        usecols=usecols,
        dtype=str,
        encoding=encoding,
        encoding_errors="aether_cp1252",
        keep_default_na=True,
    )
    return df.reset_index(drop=True)


# ----------------------------------------------------------------------------- CSV quoting
# The quote grammar of pandas' C tokenizer (and Python's csv module) with the defaults used
# here (quotechar '"', doublequote, no escapechar): a quote opens a quoted field only at the
# start of a field (file start, after the separator, after a line end); inside, '""' is a
# literal quote and a lone '"' closes the field; anywhere else a quote is a literal
# character. So a maximal run of k quotes acts on "inside a quoted field?" as
#   k even                 → no change (escaped quotes, an empty field "", or literals);
#   k odd, at field start  → flips it (outside: opens [+ escapes]; inside: escapes + close);
#   k odd, mid-field       → outside afterwards (inside: closes; outside: literals).
# That is a scan of flips with resets, which numpy does without a Python loop per quote.
_QUOTE, _NL, _CR = ord('"'), ord("\n"), ord("\r")
_BOM = b"\xef\xbb\xbf"
_SCAN_PIECE = 8 * 2**20  # bytes scanned at once (bounds the scan's index arrays)


@dataclass
class _Scan:
    """Quoting of a byte range that starts at a line start, for both possible start states.

    Index 0 of each pair: the range starts outside quotes; index 1: inside a quoted field.
    Offsets are relative to the range; -1 means none.
    """

    end: tuple[bool, bool]  # inside a quoted field at the end of the range
    first_out: tuple[int, int]  # just past the first newline outside quotes
    last_out: tuple[int, int]  # just past the last newline outside quotes
    opened: tuple[int, int]  # the quote opening the field still open at the end (-1: before)


def _scan_piece(a: np.ndarray, sep: int, bof: int) -> _Scan:
    """:class:`_Scan` of one line-aligned piece (``bof``: where its first field starts,
    3 after a UTF-8 BOM at the file start, else 0)."""
    q = np.flatnonzero(a == _QUOTE)
    if q.size == 0:  # no quotes: the state never changes
        nl = np.flatnonzero(a == _NL)
        first = int(nl[0]) + 1 if nl.size else -1
        last = int(nl[-1]) + 1 if nl.size else -1
        return _Scan((False, True), (first, -1), (last, -1), (-1, -1))
    run0 = np.flatnonzero(np.diff(q) != 1) + 1
    run0 = np.concatenate(([0], run0))
    starts = q[run0]
    odd = (np.diff(np.append(run0, q.size)) & 1).astype(bool)
    prev = a[np.maximum(starts - 1, 0)]
    at_field_start = (starts == 0) | (starts == bof) | (prev == sep) | (prev == _NL) | (prev == _CR)
    flip = odd & at_field_start
    reset = odd & ~at_field_start
    flips = np.cumsum(flip)
    last_reset = np.maximum.accumulate(np.where(reset, np.arange(starts.size), -1))
    seen_reset = last_reset >= 0
    since = flips - np.where(seen_reset, flips[np.maximum(last_reset, 0)], 0)
    after0 = (since & 1).astype(bool)  # inside after each run, starting outside
    after1 = np.where(seen_reset, after0, ~after0)  # … starting inside
    nl = np.flatnonzero(a == _NL)
    runs_before = np.searchsorted(starts, nl)
    end, first, last, opened = [], [], [], []
    for start_inside, after in ((False, after0), (True, after1)):
        at_nl = np.where(runs_before == 0, start_inside, after[np.maximum(runs_before - 1, 0)])
        out_nl = nl[~at_nl]
        first.append(int(out_nl[0]) + 1 if out_nl.size else -1)
        last.append(int(out_nl[-1]) + 1 if out_nl.size else -1)
        end.append(bool(after[-1]))
        before = np.concatenate(([start_inside], after[:-1]))
        opens = np.flatnonzero(after & ~before)
        opened.append(int(starts[opens[-1]]) if after[-1] and opens.size else -1)
    return _Scan((end[0], end[1]), (first[0], first[1]), (last[0], last[1]), (opened[0], opened[1]))


def _scan(buf: bytes, sep: str, *, at_file_start: bool = False) -> _Scan:
    """:class:`_Scan` of a byte range that starts at a line start, in line-aligned pieces of
    ``_SCAN_PIECE`` bytes (a quote run never spans a newline, so pieces compose exactly)."""
    sepb = sep.encode()[0]
    if buf.find(b'"') < 0:  # fast path: a C-speed search, no arrays
        first = buf.find(b"\n")
        last = buf.rfind(b"\n")
        return _Scan((False, True), (first + 1 if first >= 0 else -1, -1),
                     (last + 1 if last >= 0 else -1, -1), (-1, -1))
    bof = len(_BOM) if at_file_start and buf.startswith(_BOM) else 0
    cur, first, last, opened = [False, True], [-1, -1], [-1, -1], [-1, -1]
    o, n = 0, len(buf)
    while o < n:
        e = n if o + _SCAN_PIECE >= n else buf.find(b"\n", o + _SCAN_PIECE - 1) + 1 or n
        piece = np.frombuffer(buf, np.uint8, count=e - o, offset=o)
        r = _scan_piece(piece, sepb, bof if o == 0 else 0)
        for x in (0, 1):
            y = int(cur[x])
            if first[x] < 0 and r.first_out[y] >= 0:
                first[x] = o + r.first_out[y]
            if r.last_out[y] >= 0:
                last[x] = o + r.last_out[y]
            if not r.end[y]:
                opened[x] = -1
            elif r.opened[y] >= 0:
                opened[x] = o + r.opened[y]
            cur[x] = r.end[y]
        o = e
    return _Scan((cur[0], cur[1]), (first[0], first[1]), (last[0], last[1]), (opened[0], opened[1]))


@dataclass
class _Block:
    """Where one CSV block lies and how its quoting ends (a few ints; crosses workers)."""

    start: int  # absolute byte offset of the block (just past a newline, or 0)
    end: int  # absolute end (just past a newline, or the end of the file)
    open_end: bool  # the block, read from outside quotes, ends inside a quoted field
    open_end_if_open: bool | None  # … read from inside one (None: not worked out yet)
    head_end: int  # bytes [start, start + head_end) are the records parsed speculatively
    ok: bool  # the speculative parse of those bytes succeeded


def _line_start(f: Any, pos: int, size: int) -> int:
    """Just past the first newline at or after ``pos`` (0 stays 0; ``size`` if none): where
    a block nominally at ``pos`` begins, the same rule :func:`fsspec.utils.read_block` uses."""
    if pos <= 0:
        return 0
    if pos >= size:
        return size
    f.seek(pos)
    while chunk := f.read(1 << 16):
        j = chunk.find(b"\n")
        if j >= 0:
            return pos + j + 1
        pos += len(chunk)
    return size


def _read_range(path: str, compression: str | None, start: int, stop: int) -> bytes:
    import fsspec

    with fsspec.open(path, "rb", compression=compression) as f:
        f.seek(start)
        return f.read(stop - start)


def _speculate(
    path: str, version: Any, compression: str | None, offset: int, length: int | None,
    size: int, *, names: list[str], sep: str, encoding: str, usecols: list[str], first: bool,
) -> tuple[pd.DataFrame | None, _Block]:
    """Read one block and parse it as if it started outside quotes (true unless a quoted
    newline straddles the block start; :func:`_finish_block` drops the frame then).

    pandas' tokenizer fails at the end of a block that ends inside a quoted field, so a
    clean parse proves the block ends outside quotes: the common path costs one read and
    one parse, as before. Only a failed parse pays for the quote scan. ``version`` (the
    file's fsspec ukey) only keys the task to the file's contents.
    """
    import fsspec

    with fsspec.open(path, "rb", compression=compression) as f:
        if length is None:  # compressed: one block, the whole file
            data = f.read()
            start, end = 0, len(data)
        else:
            start, end = _line_start(f, offset, size), _line_start(f, offset + length, size)
            f.seek(start)
            data = f.read(end - start)
    parse = functools.partial(_parse_csv_block, names=names, header=first, sep=sep,
                              encoding=encoding, usecols=usecols)
    try:
        return parse(data), _Block(start, end, False, None, len(data), True)
    except Exception:  # noqa: BLE001 - judged below; a real error is raised by _finish_block
        pass
    sc = _scan(data, sep, at_file_start=start == 0)
    head_end = max(sc.last_out[0], 0) if sc.end[0] else len(data)
    df, ok = None, sc.end[0] and head_end == 0  # no whole record in the block: nothing to parse
    if sc.end[0] and head_end > 0:
        try:
            df, ok = parse(data[:head_end]), True
        except Exception:  # noqa: BLE001 - same as above
            pass
    return df, _Block(start, end, sc.end[0], sc.end[1], head_end, ok)


def _next_inside(inside: bool, blk: _Block, path: str, compression: str | None, sep: str) -> bool:
    """Whether the block after ``blk`` starts inside a quoted field (``inside``: whether
    ``blk`` does). Reads ``blk`` again only when it starts inside one (rare)."""
    if not inside:
        return blk.open_end
    if blk.open_end_if_open is None:
        return _scan(_read_range(path, compression, blk.start, blk.end), sep).end[1]
    return blk.open_end_if_open


def _read_records(
    path: str, compression: str | None, start: int, stop: int, sep: str, data: bytes | None = None
) -> bytes:
    """Bytes ``[start, stop)`` — records that begin outside quotes at ``start`` — plus, when
    the last of them is still inside a quoted field at ``stop``, the rest of that record up
    to its newline outside quotes. Raises :class:`PoiInputError` for a quote that is never
    closed, or that runs on past ``MAX_RECORD_BYTES``."""
    import fsspec

    with fsspec.open(path, "rb", compression=compression) as f:
        if data is None:
            f.seek(start)
            data = f.read(stop - start)
        sc = _scan(data, sep, at_file_start=start == 0)
        if not sc.end[0]:
            return data
        opened = start + sc.opened[0]
        snippet = data[sc.opened[0] : sc.opened[0] + 60]
        f.seek(stop)
        parts, carry, pos = [data], b"", stop  # carry: bytes from pos on, no full line yet
        while True:
            more = f.read(1 << 20)
            if not more:  # end of file: the record ends here if its quote closed
                if carry and not _scan(carry, sep).end[1]:
                    return b"".join([*parts, carry])
                raise _unbalanced_quote(path, compression, opened, snippet, None)
            carry += more
            j = carry.rfind(b"\n")
            if j >= 0:
                lines, carry = carry[: j + 1], carry[j + 1 :]
                cut = _scan(lines, sep).first_out[1]
                if cut >= 0:
                    parts.append(lines[:cut])
                    return b"".join(parts)
                parts.append(lines)
                pos += len(lines)
            if pos + len(carry) - opened > MAX_RECORD_BYTES:
                raise _unbalanced_quote(path, compression, opened, snippet, MAX_RECORD_BYTES)


def _unbalanced_quote(
    path: str, compression: str | None, opened: int, snippet: bytes, limit: int | None
) -> PoiInputError:
    """The error for a quoted field that never closes, with its byte offset and line."""
    import fsspec
    from dask.utils import format_bytes

    line, pos = 1, 0
    with fsspec.open(path, "rb", compression=compression) as f:  # count lines (error path)
        while pos < opened and (chunk := f.read(min(16 * 2**20, opened - pos))):
            line += chunk.count(b"\n")
            pos += len(chunk)
    text = snippet.decode("utf-8", errors="replace").split("\n")[0]
    how = ("is never closed before the end of the file" if limit is None else
           f"runs on for more than {format_bytes(limit)} without closing")
    also = ("" if limit is None else " If a field really is that long, raise "
            "aether_scale.pois.readers.MAX_RECORD_BYTES.")
    return PoiInputError(
        f"{path}: unbalanced double quote — the quoted field opened at byte {opened} (line "
        f"{line}: {text!r}) {how}. In CSV a field that starts with \" must end with \", and a "
        f"\" inside it must be doubled (\"\"). Fix the quoting on that line (or re-export the "
        f"file with standard CSV quoting).{also}"
    )


def _finish_block(
    df: pd.DataFrame | None, blk: _Block, inside: bool, path: str, compression: str | None, *,
    names: list[str], sep: str, encoding: str, usecols: list[str], first: bool,
) -> pd.DataFrame:
    """The records that begin in this block, each whole: the speculative frame when the
    block starts and ends outside quotes, else re-cut at newlines outside quotes."""
    parse = functools.partial(_parse_csv_block, names=names, sep=sep, encoding=encoding,
                              usecols=usecols)
    data = None
    if not inside:
        if not blk.ok:  # the block truly starts here: a real error, raised as pandas words it
            head_bytes = _read_range(path, compression, blk.start, blk.start + blk.head_end)
            df = parse(head_bytes, header=first)
        if not blk.open_end and df is not None:
            return df
        head = df  # None when no record ends in the block
        tail_start = blk.start + blk.head_end
    else:  # the block starts inside a record of the block before: skip to the record end
        data = _read_range(path, compression, blk.start, blk.end)
        cut = _scan(data, sep).first_out[1]
        if cut < 0:  # the whole block lies in that record
            return parse(b"", header=False)
        head, tail_start, data = None, blk.start + cut, data[cut:]
    tail = parse(_read_records(path, compression, tail_start, blk.end, sep, data),
                 header=tail_start == 0)
    return tail if head is None else pd.concat([head, tail], ignore_index=True)


def _csv_parts(
    path: str, *, names: list[str], sep: str, encoding: str, usecols: list[str],
    blocksize: int | str,
) -> list[Any]:
    """One delayed frame per CSV block: speculate per block, chain the quote states, finish."""
    import fsspec
    from dask.utils import parse_bytes
    from fsspec.utils import infer_compression

    fs, p = fsspec.core.url_to_fs(path)
    size, version = fs.size(p), fs.ukey(p)
    compression = infer_compression(path)
    bs = max(1, parse_bytes(blocksize))
    spans: list[tuple[int, int | None]] = (
        [(0, None)] if compression else [(o, bs) for o in range(0, max(size, 1), bs)]
    )
    spec = dask.delayed(_speculate, pure=True, nout=2)
    nxt = dask.delayed(_next_inside, pure=True)
    fin = dask.delayed(_finish_block, pure=True)
    kw = dict(names=names, sep=sep, encoding=encoding, usecols=usecols)
    parts: list[Any] = []
    inside: Any = False  # the file starts outside quotes
    for i, (off, length) in enumerate(spans):
        df, blk = spec(path, version, compression, off, length, size, **kw, first=i == 0)
        parts.append(fin(df, blk, inside, path, compression, **kw, first=i == 0))
        if i + 1 < len(spans):
            inside = nxt(inside, blk, path, compression, sep)
    return parts


def read_source(
    src: PoiSource, index: int, *, partition_rows: int, keep_columns: tuple[str, ...] = (),
    blocksize: int | str | None = None,
) -> tuple[list[Any], dict[str, str], str | None, str]:
    """Open one POI source lazily.

    Returns ``(partitions, dtypes, crs_wkt_or_None, kind)``: a list of dask delayed
    objects, one pandas/GeoPandas frame each; the file's columns (geometry excluded)
    with their dtypes (all ``"string"`` for CSV); the file's own CRS (None when it
    declares none); and ``"geo"`` or ``"xy"``. Nothing is read beyond metadata and
    headers. ``blocksize`` (CSV only; default ``CSV_BLOCKSIZE``) sets the bytes per CSV
    partition. Raises :class:`PoiInputError` for unreadable layouts; a CSV quote that never
    closes raises it when the partition holding it is computed.
    """
    path = src.path
    where = f"pois.sources[{index}]"
    suffix = _suffix(path)
    xy_given = bool(src.x or src.y or src.lon or src.lat)
    is_dir = _is_dir(path)
    if suffix in _CSV_SUFFIXES and not is_dir:
        names, sep = _csv_header(path, src.encoding)
        if not xy_given:
            raise PoiInputError(
                f"{path}: a CSV needs coordinate columns; set {where}.x/{where}.y (+ {where}.crs) "
                f"or {where}.lon/{where}.lat. Columns in the file: {', '.join(names)}"
            )
        usecols = _needed_columns(src, names, keep_columns)
        parts = _csv_parts(path, names=names, sep=sep, encoding=src.encoding, usecols=usecols,
                           blocksize=CSV_BLOCKSIZE if blocksize is None else blocksize)
        return parts, {c: "string" for c in names}, None, "xy"
    if suffix in _PARQUET_SUFFIXES or is_dir:
        if xy_given:
            import dask.dataframe as dd

            ddf = dd.read_parquet(path)
            return list(ddf.to_delayed()), _dtypes(ddf._meta), None, "xy"
        import dask_geopandas

        try:
            gdf = dask_geopandas.read_parquet(path)
        except (ValueError, KeyError, TypeError) as e:
            raise PoiInputError(
                f"{path}: not readable as GeoParquet ({e}); for plain parquet with coordinate "
                f"columns set {where}.x/{where}.y (+ {where}.crs) or {where}.lon/{where}.lat"
            ) from None
        crs = gdf.crs.to_wkt() if gdf.crs is not None else None
        return list(gdf.to_delayed()), _dtypes(gdf._meta), crs, "geo"
    import dask_geopandas
    import pyogrio

    try:
        info = pyogrio.read_info(path, layer=src.layer)
    except Exception as e:  # pyogrio raises its own DataSourceError family
        raise PoiInputError(f"{path}: cannot open as a vector file ({e}); check {where}.path "
                            f"and {where}.layer") from None
    n = int(info.get("features") or 0)
    gdf = dask_geopandas.read_file(path, layer=src.layer, npartitions=max(1, math.ceil(n / partition_rows)))
    crs = gdf.crs.to_wkt() if gdf.crs is not None else None
    return list(gdf.to_delayed()), _dtypes(gdf._meta), crs, "geo"


def _dtypes(meta: pd.DataFrame) -> dict[str, str]:
    geom = getattr(meta, "_geometry_column_name", None)
    return {
        str(c): ("string" if pd.api.types.is_object_dtype(t) or pd.api.types.is_string_dtype(t) else str(t))
        for c, t in meta.dtypes.items() if c != geom
    }


def _nullable(dtype: str) -> str:
    """A dtype that can hold missing values (numpy int/bool → pandas nullable)."""
    kind = getattr(pd.api.types.pandas_dtype(dtype), "kind", "O")
    return {"i": "Int64", "u": "UInt64", "b": "boolean"}.get(kind, dtype)


def _needed_columns(src: PoiSource, names: list[str], keep: tuple[str, ...]) -> list[str]:
    """Source columns to read: roles, coordinates, kept columns that exist."""
    want = {c for c in src.columns.model_dump().values() if c}
    want |= {c for c in (src.x, src.y, src.lon, src.lat) if c}
    want |= set(keep)
    return [c for c in names if c in want]


def _resolve_source(
    src: PoiSource, index: int, cols: list[str], file_crs: str | None, kind: str,
    pcfg: PoisSection,
) -> SourceSpec:
    """Check the config against the file's columns/CRS; raise PoiInputError with the fix."""
    from pyproj import CRS

    where = f"pois.sources[{index}]"
    have = set(cols)
    listing = ", ".join(cols)
    roles = {r: c for r, c in src.columns.model_dump().items() if c}
    for role, col in roles.items():
        if col not in have:
            raise PoiInputError(
                f"{src.path}: column {col!r} (config {where}.columns.{role}) not found. "
                f"Columns in the file: {listing}. Set {where}.columns.{role} to one of them."
            )
    if "description" not in roles:
        need = {f for _, f in _template_parts(pcfg.template_no_name, "template_no_name") if f}
        missing = sorted(f for f in need if f not in roles)
        if missing:
            raise PoiInputError(
                f"{src.path}: the description template needs "
                + ", ".join("{" + m + "}" for m in missing)
                + f" but {where}.columns maps no "
                + "/".join(missing)
                + f" column (and no ready description). Set {where}.columns."
                + f"{missing[0]} (or {where}.columns.description). Columns in the file: {listing}"
            )
    xcol = ycol = None
    if kind == "xy":
        if src.lon or src.lat:
            xcol, ycol = src.lon, src.lat
            keys = ("lon", "lat")
        else:
            xcol, ycol = src.x, src.y
            keys = ("x", "y")
        for k, c in zip(keys, (xcol, ycol), strict=True):
            if not c:
                raise PoiInputError(f"{src.path}: {where}.{k} is not set (both coordinates are "
                                    f"needed). Columns in the file: {listing}")
            if c not in have:
                raise PoiInputError(f"{src.path}: coordinate column {c!r} (config {where}.{k}) "
                                    f"not found. Columns in the file: {listing}")
    crs_text = src.crs
    if kind == "xy" and crs_text is None:
        if src.lon or src.lat:
            crs_text = "EPSG:4326"
        else:
            raise PoiInputError(f"{src.path}: x/y columns need a CRS; set {where}.crs "
                                f"(e.g. EPSG:27700)")
    if file_crs is not None and crs_text is not None:
        if CRS.from_user_input(crs_text) != CRS.from_wkt(file_crs):
            raise PoiInputError(f"{src.path}: the file declares its CRS ({CRS.from_wkt(file_crs).name}) "
                                f"and {where}.crs says {crs_text}; remove {where}.crs")
    if file_crs is None and crs_text is None:
        raise PoiInputError(f"{src.path}: the file declares no CRS; set {where}.crs")
    try:
        crs_wkt = file_crs or CRS.from_user_input(crs_text).to_wkt()
    except Exception as e:
        raise PoiInputError(f"{src.path}: {where}.crs = {crs_text!r} is not a CRS ({e})") from None
    return SourceSpec(index=index, path=src.path, kind=kind, crs_wkt=crs_wkt, roles=roles,
                      xcol=xcol, ycol=ycol, append_name=src.append_name)
