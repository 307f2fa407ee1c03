"""The AlphaEarth Foundations (AEF) satellite-embedding format.

AlphaEarth publishes one 64-d unit vector per 10 m pixel. The Cloud Optimized
GeoTIFFs store each component as a signed 8-bit code ``q`` with the
square-root quantisation

    v = (q / 127.5) ** 2 * sign(q)        (decode)
    q = round(sign(v) * sqrt(|v|) * 127.5)  (encode)

``q`` lies in −127…127; −128 marks a masked pixel (nodata). The encode is the
exact inverse of decode on every valid code (checked against real Earth Engine
vectors in the tests), so float exports can be re-quantised losslessly.
"""

from __future__ import annotations

import numpy as np

N_BANDS = 64
BAND_NAMES: tuple[str, ...] = tuple(f"A{i:02d}" for i in range(N_BANDS))
NODATA = -128
PIXEL_SIZE_M = 10.0
SCALE = 127.5

# Decode lookup table indexed by (code + 128): code -128 (nodata) -> NaN.
_codes = np.arange(-128, 128, dtype=np.float64)
_DECODE_LUT = (np.sign(_codes) * (_codes / SCALE) ** 2).astype(np.float32)
_DECODE_LUT[0] = np.nan

#: Decode table indexed by a code's unsigned byte (``q.view(np.uint8)``), nodata → 0.0:
#: the fastest decode (one ``np.take``) when the caller masks nodata pixels itself.
DECODE_LUT_U8 = np.zeros(256, dtype=np.float32)
DECODE_LUT_U8[:] = _DECODE_LUT[(np.arange(256, dtype=np.uint8).view(np.int8).astype(np.int16)
                                + 128)]
DECODE_LUT_U8[128] = 0.0  # uint8 128 == int8 −128 (nodata)
DECODE_LUT_U8.flags.writeable = False


def decode(q: np.ndarray, *, nodata_value: float = np.nan) -> np.ndarray:
    """De-quantise int8 AEF codes to float32 (nodata −128 → ``nodata_value``).

    Works on any shape; uses a 256-entry lookup table, so it is exact and fast.
    Raises ``TypeError`` when ``q`` is not an integer array.
    """
    q = np.asarray(q)
    if not np.issubdtype(q.dtype, np.integer):
        raise TypeError(f"AEF codes must be integers (int8), got dtype {q.dtype}")
    out = _DECODE_LUT[q.astype(np.int16) + 128]
    if not (isinstance(nodata_value, float) and np.isnan(nodata_value)):
        out = np.where(q == NODATA, np.float32(nodata_value), out)
    return out


def decode_fast(q: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """De-quantise int8 codes to float32 with nodata as 0.0 (mask it with :func:`valid_mask`).

    One table look-up on the codes' bytes; ``out`` (float32, same shape) avoids an
    allocation.
    """
    q = np.asarray(q)
    if q.dtype != np.int8:
        raise TypeError(f"AEF codes must be int8, got dtype {q.dtype}")
    return np.take(DECODE_LUT_U8, q.view(np.uint8), out=out)


def encode(v: np.ndarray) -> np.ndarray:
    """Quantise float embedding values to int8 AEF codes (NaN → nodata −128).

    Values outside [−1, 1] are clipped to ±127 (a unit vector's components
    never exceed 1 in magnitude).
    """
    v = np.asarray(v, dtype=np.float64)
    nan = np.isnan(v)
    v = np.where(nan, 0.0, v)
    q = np.rint(np.sign(v) * np.sqrt(np.abs(v)) * SCALE)
    q = np.clip(q, -127, 127).astype(np.int8)
    q[nan] = NODATA
    return q


def valid_mask(q: np.ndarray, *, axis: int = -1) -> np.ndarray:
    """True where a pixel holds an embedding (no band equals nodata).

    AlphaEarth masks whole pixels, so a single nodata band marks the pixel.
    """
    return ~np.any(np.asarray(q) == NODATA, axis=axis)
