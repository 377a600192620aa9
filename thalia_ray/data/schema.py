"""The published Thalia dataset contract: variable names, channel order and label vocabularies.

Every other module takes channel names, dimension names and label values from here, so the
contract lives in one place and real and synthetic data are read by the same code.
"""
from __future__ import annotations

from datetime import date

PRIMARY_DIM = "primary_date"
SECONDARY_DIM = "secondary_date"
# Spatial dimension names written by the synthetic generator. Readers do not rely on them: they
# treat the two dimensions that are not dates as (rows, columns), whatever they are called.
Y_DIM, X_DIM = "y", "x"

GEOMORPHOLOGY = ("insar_difference", "insar_coherence", "dem")
ATMOSPHERIC = (
    "total_column_water_vapour",
    "surface_pressure",
    "vertical_integral_of_temperature",
)
MASK_VAR = "deformation_mask"
STATIC_VARS = ("dem",)
# Mask value for earthquakes in the cubes; the benchmark maps it to 1 (deformation).
MASK_VOLCANIC, MASK_EARTHQUAKE = 1, 2


def atmospheric_pair(variable: str) -> tuple[str, str]:
    """The primary- and secondary-date channels of one ERA5 variable, in benchmark order."""
    return f"primary_date_{variable}", f"secondary_date_{variable}"


ALL_CHANNELS: tuple[str, ...] = GEOMORPHOLOGY + tuple(
    c for v in ATMOSPHERIC for c in atmospheric_pair(v)
)
DATA_VARS: tuple[str, ...] = ALL_CHANNELS + (MASK_VAR,)


def channel_names(geomorphology: list[str] | tuple[str, ...], atmospheric: list[str] | tuple[str, ...]) -> list[str]:
    """Selected channels in the benchmark's order: geomorphology first, then each ERA5 pair."""
    unknown = [c for c in geomorphology if c not in GEOMORPHOLOGY] + [
        v for v in atmospheric if v not in ATMOSPHERIC
    ]
    if unknown:
        raise ValueError(f"unknown channel(s) {unknown}; allowed: {GEOMORPHOLOGY + ATMOSPHERIC}")
    geo = [c for c in GEOMORPHOLOGY if c in geomorphology]
    atm = [c for v in ATMOSPHERIC if v in atmospheric for c in atmospheric_pair(v)]
    return geo + atm


def statistics_key(channel: str) -> str:
    """Key of a channel in statistics.json (ERA5 statistics are shared by primary and secondary)."""
    for prefix in ("primary_date_", "secondary_date_"):
        if channel.startswith(prefix):
            return channel[len(prefix):]
    return channel


UNITS = {
    "insar_difference": "rad",
    "insar_coherence": "1",  # 0-255 scaled coherence
    "dem": "m",
    "total_column_water_vapour": "kg m-2",
    "surface_pressure": "Pa",
    "vertical_integral_of_temperature": "K kg m-2",
    MASK_VAR: "1",
}

LABELS = ("Non_Deformation", "Deformation", "Earthquake")
NEGATIVE_LABEL = "Non_Deformation"
ACTIVITY_TYPES = ("Mogi", "Sill", "Dyke", "Spheroid", "Earthquake", "Unidentified")
INTENSITY_LEVELS = ("None", "Low", "Medium", "High")
PHASES = ("Rest", "Unrest", "Rebound", "None")
FLAGS = (
    "corrupted",
    "processing_error",
    "glacier_fringes",
    "orbital_fringes",
    "atmospheric_fringes",
    "low_coherence",
    "no_info",
    "image_artifacts",
)
ATMOSPHERIC_FRINGE_LEVELS = (0, 1, 2, 3)  # none, stratified, turbulent, both
# Classes of the headline task; "Deformation" is the reported one.
CLASSES = ("Non_Deformation", "Deformation")
DEFORMATION_CLASS = 1

# Published temporal splits, by primary date, inclusive.
SPLITS: dict[str, tuple[date, date]] = {
    "train": (date(2014, 1, 1), date(2019, 5, 31)),
    "val": (date(2019, 6, 1), date(2019, 12, 31)),
    "test": (date(2020, 1, 1), date(2021, 12, 31)),
}

# Side of the published frames in pixels: annotation polygons are in these coordinates.
PUBLISHED_FRAME_SIZE = 1000

ANNOTATIONS_FILE = "annotations.json"
TIMESERIES_FILE = "quality_timeseries.json"
STATISTICS_FILE = "statistics.json"
FRAME_NAMES_FILE = "frame_names.json"  # optional: {frame_id: "Volcano A, Volcano B"}
CUBE_SUFFIX = ".zarr"


def is_descending(frame_id: str) -> bool:
    """Pass direction from a frame id such as `128D_09016_110500` (relative orbit + A/D)."""
    token = frame_id.split("_", 1)[0]
    if not token or token[-1] not in "AD":
        raise ValueError(f"frame id {frame_id!r} does not name a pass direction (expected e.g. 128D_...)")
    return token[-1] == "D"
