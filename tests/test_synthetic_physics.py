"""Physics of the synthetic generator against analytic facts (docs/synthetic.md)."""
from __future__ import annotations

import numpy as np
import pytest

from thalia_ray.synthetic import atmosphere, phase, source_models, terrain
from thalia_ray.synthetic.fields import power_law_field, window_std
from thalia_ray.synthetic.deformation import (INTENSITY_FRINGES, MASK_FRACTION, Geometry, pair_deformation,
                                                   series_sources)

GRID = np.linspace(-20e3, 20e3, 81)
E, N = np.meshgrid(GRID, GRID[::-1])  # rows run south, as in the frames


def test_mogi_peak_uplift_matches_closed_form():
    _, _, uz = source_models.mogi(E, N, depth=3000.0, volume_change=1e6)
    assert uz.max() == pytest.approx(0.0265, abs=5e-5)
    assert uz.max() == pytest.approx((1 - 0.25) * 1e6 / (np.pi * 3000.0**2), rel=1e-12)
    assert np.unravel_index(uz.argmax(), uz.shape) == (40, 40)


def test_small_okada_sill_matches_point_crack():
    """A tiny horizontal opening crack is a point source: u_z = 3ΔV d³ / (2π R⁵) (no ν dependence)."""
    r = np.array([0.0, 1000.0, 3000.0, 8000.0])
    _, _, uz = source_models.okada(r, np.zeros_like(r), depth=3000.0, length=50.0, width=50.0, strike_deg=30.0,
                             dip_deg=0.0, opening=1.0)
    expected = 3 * 2500.0 * 3000.0**3 / (2 * np.pi * np.hypot(r, 3000.0) ** 5)
    np.testing.assert_allclose(uz, expected, rtol=2e-3)


def test_horizontal_sill_uplift_symmetric_and_decays():
    ue, un, uz = source_models.okada(E, N, depth=2500.0, length=4000.0, width=4000.0, strike_deg=0.0, dip_deg=0.0,
                               opening=0.5)
    assert np.unravel_index(uz.argmax(), uz.shape) == (40, 40) and uz[40, 40] > 0
    np.testing.assert_allclose(uz, uz[:, ::-1], atol=1e-12)
    np.testing.assert_allclose(uz, uz[::-1, :], atol=1e-12)
    np.testing.assert_allclose(ue, -ue[:, ::-1], atol=1e-12)  # horizontal motion points outwards
    assert ue[40, 60] > 0 and un[20, 40] > 0
    far = np.hypot(*source_models.okada(np.array([60e3]), np.array([0.0]), depth=2500.0, length=4000.0, width=4000.0,
                                  strike_deg=0.0, dip_deg=0.0, opening=0.5)[::2])
    assert far[0] < 1e-3 * uz.max()


def test_vertical_dyke_symmetry_and_continuity():
    """Opening vertical dyke striking north: u_z symmetric across the plane, u_e antisymmetric and
    pointing away from it, a trough above it between two uplift lobes; dip→90° is continuous."""
    kwargs = dict(depth=3000.0, length=6000.0, width=4000.0, strike_deg=0.0, opening=0.5)
    ue, _, uz = source_models.okada(E, N, dip_deg=90.0, **kwargs)
    np.testing.assert_allclose(uz, uz[:, ::-1], atol=1e-12)
    np.testing.assert_allclose(ue, -ue[:, ::-1], atol=1e-12)
    assert ue[40, 50] > 0 and ue[40, 30] < 0
    assert uz[40, 40] < uz[40, 40:].max() and uz[40, 40:].max() > 0
    near = np.stack(source_models.okada(E, N, dip_deg=89.99, **kwargs))
    np.testing.assert_allclose(near, np.stack(source_models.okada(E, N, dip_deg=90.0, **kwargs)), atol=2e-3 * np.abs(uz).max())


def test_vertical_strike_slip_uplift_is_antisymmetric():
    _, _, uz = source_models.okada(E, N, depth=4000.0, length=8000.0, width=4000.0, strike_deg=0.0, dip_deg=90.0,
                             rake_deg=0.0, slip=1.0)
    np.testing.assert_allclose(uz, -uz[:, ::-1], atol=1e-12)
    np.testing.assert_allclose(uz, -uz[::-1, :], atol=1e-12)


def test_los_sign_convention():
    for descending in (False, True):
        los = phase.los_unit_vector(phase.incidence_deg(8, descending), descending)
        up = phase.line_of_sight(np.zeros((1, 8)), np.zeros((1, 8)), np.full((1, 8), 0.01), los)
        assert (up > 0).all()  # uplift moves towards the satellite
        assert (phase.los_to_phase(up) < 0).all()
        east = phase.line_of_sight(np.full((1, 8), 0.01), np.zeros((1, 8)), np.zeros((1, 8)), los)
        assert (east < 0).all() if not descending else (east > 0).all()  # ascending looks east
        norm = np.sqrt(sum(c**2 for c in los))
        np.testing.assert_allclose(norm, 1.0, rtol=1e-6)
    assert phase.incidence_deg(8, False)[0, 0] == pytest.approx(29.0)
    assert phase.incidence_deg(8, True)[0, 0] == pytest.approx(46.0)


def test_wrap_range_and_fringe():
    values = np.array([-np.pi, np.pi, 3 * np.pi, -3 * np.pi, np.nextafter(np.pi, 0), 1e4, -1e4, 0.5])
    wrapped = phase.wrap(values)
    assert wrapped.dtype == np.float32
    assert (wrapped >= -np.pi).all() and (wrapped < np.float32(np.pi)).all()
    np.testing.assert_allclose(np.exp(1j * wrapped), np.exp(1j * values), atol=1e-3)
    one_fringe = phase.los_to_phase(np.array([phase.FRINGE_M], np.float32))
    assert one_fringe[0] == pytest.approx(-2 * np.pi, rel=1e-6)


def _record(level: str, kind: str = "Mogi") -> dict:
    square = [40.0, 40.0, 56.0, 40.0, 56.0, 56.0, 40.0, 56.0]
    return {"label": ["Earthquake" if kind == "Earthquake" else "Deformation"], "activity_type": [kind],
            "intensity_level": [level], "segmentation_mask": [square]}


@pytest.mark.parametrize("kind", ["Mogi", "Sill", "Dyke", "Spheroid", "Earthquake"])
def test_fringe_count_grows_with_intensity(kind):
    size = 96
    incidence = phase.incidence_deg(size, True)
    geometry = Geometry(size, 1000.0, phase.los_unit_vector(incidence, True))
    counts = []
    for level in ("Low", "Medium", "High"):
        found = series_sources([_record(level, kind)], geometry, np.random.default_rng(1))
        d_los, mask = pair_deformation(found, 0, (size, size))
        fringes = float(d_los.max() - d_los.min()) / phase.FRINGE_M
        lo, hi = INTENSITY_FRINGES[level]
        assert lo <= fringes <= hi + 1e-4
        assert mask.any() and set(np.unique(mask)) <= {0, 2 if kind == "Earthquake" else 1}
        np.testing.assert_array_equal(mask > 0, np.abs(d_los) >= MASK_FRACTION * phase.FRINGE_M)
        counts.append(fringes)
    assert counts[0] < counts[1] < counts[2]


def test_deformation_grows_over_a_series_and_skips_negatives():
    size = 64
    geometry = Geometry(size, 1000.0, phase.los_unit_vector(phase.incidence_deg(size, False), False))
    negative = {"label": ["Non_Deformation"], "activity_type": [], "intensity_level": [], "segmentation_mask": []}
    records = [negative, _record("Medium"), _record("Medium"), _record("Medium")]
    found = series_sources(records, geometry, np.random.default_rng(3))
    assert len(found) == 1  # one source, computed once for the series
    ranges = [np.ptp(pair_deformation(found, k, (size, size))[0]) for k in range(4)]
    assert ranges[0] == 0 and ranges[1] <= ranges[2] <= ranges[3]


def test_phase_noise_table_follows_coherence():
    table = phase.PhaseNoiseTable(looks=8, levels=16, samples=2048)
    rng = np.random.default_rng(0)
    low_noise, low_est = table.sample(np.full(4096, 0.1, np.float32), rng)
    high_noise, high_est = table.sample(np.full(4096, 0.9, np.float32), rng)
    circular_std = lambda x: np.sqrt(-2 * np.log(np.abs(np.exp(1j * x).mean())))  # noqa: E731
    assert circular_std(high_noise) < 0.5 < circular_std(low_noise)
    assert high_est.mean() == pytest.approx(0.9, abs=0.05) and low_est.mean() < 0.45


def test_turbulence_and_era5_reference_values():
    field = atmosphere.turbulence((128, 128), 500.0, np.random.default_rng(0))
    assert field.dtype == np.float32 and abs(field.mean()) < 1e-3 and field.std() == pytest.approx(1.0, rel=1e-3)
    weather = atmosphere.Weather(water_vapour=30.0, pressure=92967.0, temperature=250.0)
    era5 = atmosphere.era5_channels(weather, np.ones((2, 2), np.float32), np.ones((2, 2), np.float32))
    assert era5["vertical_integral_of_temperature"][0, 0] == pytest.approx(2.37e6, rel=5e-3)
    # 5 kg m⁻² of water vapour over 3 km of relief ≈ 3 cm ≈ one fringe (zenith)
    profile = np.exp(-np.array([0.0, 3000.0]) / 2000.0).astype(np.float32)
    ones = np.ones(2, np.float32)
    change = atmosphere.stratified_delay(35.0, 1e5, profile, ones, ones) - atmosphere.stratified_delay(
        30.0, 1e5, profile, ones, ones)
    assert change[0] - change[1] == pytest.approx(0.026, abs=0.004)


@pytest.mark.parametrize("exponent, outer", [(terrain.TERRAIN_HURST + 1, 20e3), ((atmosphere.TURBULENCE_BETA + 1) / 2, 10e3)])
def test_window_of_a_frame_sees_the_variance_of_its_scales(exponent, outer):
    """A window of a power-law field carries less variance than the whole frame; `window_std` (the
    expected std inside the window) agrees with windows cut from whole unit-std frames, and a field
    drawn directly on the window with the frame as reference has that std and the frame's
    pixel-scale roughness (drawn with unit std instead, it would be far rougher)."""
    rng = np.random.default_rng(0)
    variances, frame_slopes = [], []
    for _ in range(6):
        frame = power_law_field((256, 256), 100.0, exponent, outer, rng)
        variances += [frame[r:r + 32, c:c + 32].var() for r in range(0, 256, 32) for c in range(0, 256, 32)]
        frame_slopes.append(np.mean(np.square(np.gradient(frame))))
    expected = window_std(3200.0, 25600.0, 100.0, exponent, outer)
    assert 0.2 < expected < 0.9
    assert np.sqrt(np.mean(variances)) == pytest.approx(expected, rel=0.1)
    windows = [power_law_field((32, 32), 100.0, exponent, outer, rng, reference_extent_m=25600.0) for _ in range(200)]
    assert np.sqrt(np.mean([w.var() for w in windows])) == pytest.approx(expected, rel=0.1)
    window_slopes = [np.mean(np.square(np.gradient(w))) for w in windows]
    # ≈ 1.2: the long waves are modelled as a plane, their curvature is not (a unit-std window: ≈ 3)
    assert 0.9 < np.sqrt(np.mean(window_slopes) / np.mean(frame_slopes)) < 1.35
    assert window_std(25600.0, 25600.0, 100.0, exponent, outer) == 1.0


def test_window_dem_keeps_its_site_on_land():
    """A 96 px window of 100 m on a volcano (cone radius 6–15 km, larger than the window): finite,
    the deforming site above the sea, the relief of a partial edifice (hundreds of metres to a few km)."""
    for seed in range(8):
        dem, water = terrain.volcano_dem((96, 96), 100.0, [(48.0, 40.0)], np.random.default_rng(seed), 1e5)
        assert np.isfinite(dem).all() and dem[48, 40] >= terrain.SITE_MIN_HEIGHT_M and not water[48, 40]
        assert 100.0 < np.ptp(dem) < 5000.0
