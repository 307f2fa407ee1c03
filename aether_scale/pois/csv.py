"""CSV POI sources, read as byte blocks (one dask partition each), quote-aware.

A CSV is read as ``CSV_BLOCKSIZE`` (64 MiB) byte blocks cut at newlines; every column
is text, and invalid bytes are decoded via the ``aether_cp1252`` fallback handler
registered in :mod:`.clean`. A quoted field may hold a newline, so a block cut at a
newline can start or end inside a record. Each block is parsed on its own first (the
common case: pandas' tokenizer ends it outside quotes); a tiny chain of per-block quote
states (``_next_inside``) then tells every block whether it starts inside a quoted
field. A block that does skips to its first newline outside quotes, and the block
before reads on past its end up to that newline (``_read_records``), so every record
is parsed exactly once, by the block it starts in. Memory per task: one block plus the
straddling record (capped at ``MAX_RECORD_BYTES``); a quote left open fails with the
byte offset and line of the quote (``_unbalanced_quote``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import dask
import numpy as np
import pandas as pd

from .clean import _MARK
from .errors import PoiInputError

__all__ = ["CSV_BLOCKSIZE", "MAX_RECORD_BYTES", "csv_header", "csv_parts"]

#: Bytes per CSV block, one dask partition each (cut at the next newline outside quotes).
CSV_BLOCKSIZE: int | str = "64MiB"
#: Longest a CSV record may run on past the end of its block (a quoted field holding
#: newlines). Longer almost always means an unbalanced quote swallowing the rest of the
#: file, so it fails instead of reading the file into memory.
MAX_RECORD_BYTES: int = 64 * 2**20


def csv_header(path: str, encoding: str) -> tuple[list[str], str]:
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


def csv_parts(
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
