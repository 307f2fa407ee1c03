"""The AlphaEarth int8 codec against real Earth Engine vectors and on every code."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from aether_scale import aef

REGIONS = ["amazon_forest", "california_coast", "iowa_ag", "sf_bay_urban"]


def _vectors(shared_data: Path, region: str) -> np.ndarray:
    path = shared_data / "alphaearth_points" / f"alphaearth_s1_dw_samples_{region}_2024.csv"
    df = pd.read_csv(path, usecols=list(aef.BAND_NAMES))
    return df[list(aef.BAND_NAMES)].to_numpy(np.float64)


@pytest.mark.shared_data
@pytest.mark.parametrize("region", REGIONS)
def test_real_vectors_round_trip_exactly(shared_data: Path, region: str) -> None:
    v = _vectors(shared_data, region)
    assert v.shape == (720, 64) and np.isfinite(v).all()
    q = aef.encode(v)
    assert q.dtype == np.int8
    assert q.min() >= -127 and q.max() <= 127  # real values never encode to nodata
    back = aef.decode(q)
    assert back.dtype == np.float32
    # decode(encode(v)) reproduces every value to float32 precision, bit for bit
    np.testing.assert_array_equal(back, v.astype(np.float32))
    # and the float64 codec formula reproduces Earth Engine's doubles
    np.testing.assert_allclose(np.sign(q) * (q / aef.SCALE) ** 2, v, rtol=0, atol=1e-15)
    # as served, each vector is (almost) unit length
    norms = np.linalg.norm(v, axis=1)
    assert norms.min() > 0.99 and norms.max() < 1.01
    # the codes use much of the range: a unit vector's components stay below ~0.45,
    # i.e. |q| ≲ 85, and the sqrt companding spreads them over >100 distinct codes
    assert 60 < np.abs(q).max() <= 127 and len(np.unique(q)) > 100


@pytest.mark.shared_data
def test_real_vectors_exported_as_float32_still_requantise(shared_data: Path) -> None:
    # GeoTIFF exports hold float32: the codes must survive that narrowing
    v = _vectors(shared_data, "sf_bay_urban")
    np.testing.assert_array_equal(aef.encode(v.astype(np.float32)), aef.encode(v))


def test_all_256_codes_round_trip() -> None:
    q = np.arange(-128, 128, dtype=np.int16).astype(np.int8)
    v = aef.decode(q)
    assert np.isnan(v[0]) and np.isfinite(v[1:]).all()
    np.testing.assert_array_equal(aef.encode(v), q)  # −128 → NaN → −128 as well
    np.testing.assert_array_equal(aef.encode(v.astype(np.float64)), q)
    # decode is strictly increasing over the valid codes and odd-symmetric
    assert np.all(np.diff(v[1:]) > 0)
    np.testing.assert_array_equal(v[1:128], -v[255:128:-1])
    assert v[128] == 0.0 and v[255] == pytest.approx((127 / 127.5) ** 2)


def test_encode_is_robust_to_tiny_float_error() -> None:
    q = np.arange(-127, 128, dtype=np.int16).astype(np.int8)
    v = aef.decode(q).astype(np.float64)
    for eps in (1e-7, -1e-7):
        np.testing.assert_array_equal(aef.encode(v * (1 + eps)), q)


def test_nodata_handling() -> None:
    q = np.array([[aef.NODATA, 0, 127, -127]], dtype=np.int8)
    v = aef.decode(q)
    assert np.isnan(v[0, 0]) and v[0, 1] == 0.0
    v0 = aef.decode(q, nodata_value=0.0)
    assert v0[0, 0] == 0.0 and v0.dtype == np.float32
    assert aef.encode(np.array([np.nan, 0.0]))[0] == aef.NODATA
    # values beyond ±1 clip to the extreme valid codes, never wrap or hit nodata
    np.testing.assert_array_equal(aef.encode(np.array([1.5, -1.5, 1.0, -1.0])),
                                  [127, -127, 127, -127])
    with pytest.raises(TypeError, match="int8"):
        aef.decode(np.array([0.5]))


def test_valid_mask_masks_whole_pixels() -> None:
    q = np.ones((2, 3, aef.N_BANDS), np.int8)
    q[0, 1, 5] = aef.NODATA  # one band missing masks the pixel
    q[1, 2, :] = aef.NODATA
    m = aef.valid_mask(q)
    assert m.shape == (2, 3)
    np.testing.assert_array_equal(m, [[True, False, True], [True, True, False]])
    # band-first layout via axis
    np.testing.assert_array_equal(aef.valid_mask(np.moveaxis(q, -1, 0), axis=0), m)


def test_band_names() -> None:
    assert aef.BAND_NAMES[0] == "A00" and aef.BAND_NAMES[-1] == "A63"
    assert len(aef.BAND_NAMES) == aef.N_BANDS == 64 and len(set(aef.BAND_NAMES)) == 64


def test_decode_fast_matches_decode_with_nodata_as_zero() -> None:
    q = np.arange(-128, 128, dtype=np.int16).astype(np.int8)
    np.testing.assert_array_equal(aef.decode_fast(q), aef.decode(q, nodata_value=0.0))
    # the table is indexed by the code's byte; read-only so no caller can corrupt it
    assert aef.DECODE_LUT_U8.dtype == np.float32 and aef.DECODE_LUT_U8.shape == (256,)
    assert aef.DECODE_LUT_U8[np.uint8(128)] == 0.0 and not aef.DECODE_LUT_U8.flags.writeable
    np.testing.assert_array_equal(aef.DECODE_LUT_U8[q.view(np.uint8)][1:], aef.decode(q)[1:])
    # any shape, into a caller's buffer
    rng = np.random.default_rng(0)
    codes = rng.integers(-128, 128, size=(3, 5, aef.N_BANDS), dtype=np.int16).astype(np.int8)
    out = np.full(codes.shape, np.nan, np.float32)
    got = aef.decode_fast(codes, out=out)
    assert got is out and out.dtype == np.float32
    np.testing.assert_array_equal(out, aef.decode(codes, nodata_value=0.0))
    np.testing.assert_array_equal(aef.encode(out)[aef.valid_mask(codes)],
                                  codes[aef.valid_mask(codes)])
    with pytest.raises(TypeError, match="int8"):
        aef.decode_fast(codes.astype(np.int16))
