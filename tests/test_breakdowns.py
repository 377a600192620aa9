"""Leaderboard breakdowns: subgroup recall and AP against all negatives, per volcano from frame_names.json."""
from __future__ import annotations

import io
import json
import math

import pandas as pd

import pytest

from thalia_ray.config import load_config
from thalia_ray.data.annotations import AnnotationError, load_frame_names
from thalia_ray.store import ExperimentStore
from thalia_ray.leaderboard import breakdown, leaderboard_text

# (frame, intensity, label, score, pred): two frames, Etna's frame also covers Stromboli.
ROWS = [
    ("A", "High", 1, 0.9, 1), ("A", "Low", 1, 0.3, 0), ("A", "None", 0, 0.6, 1),
    ("B", "High", 1, 0.8, 1), ("B", "None", 0, 0.2, 0), ("B", "None", 0, 0.1, 0),
]


def _store_with_run(tmp_path, frame_names: dict[str, str] | None) -> ExperimentStore:
    root = tmp_path / "data"
    root.mkdir()
    if frame_names is not None:
        (root / "frame_names.json").write_text(json.dumps(frame_names))
    store = ExperimentStore(tmp_path / "store")
    record = store.run("r1")
    record.write_config(load_config(overrides=[f"data.root={root}"]))
    record.set_status("running", task="classification", model="resnet18")
    record.write_results({"test/f1_deformation": 0.8}, best_epoch=1)
    record.write_predictions("test", [
        {"key": f"k{i}", "frame_id": f, "intensity": level, "activity_type": "Sill", "label": label,
         "score": score, "pred": pred}
        for i, (f, level, label, score, pred) in enumerate(ROWS)
    ])
    record.set_status("finished")
    return store


def test_intensity_groups_of_positives_only_are_not_scored_ap_1(tmp_path) -> None:
    store = _store_with_run(tmp_path, None)
    by_intensity = breakdown(store, "r1", "intensity")
    # High: positives 0.9 and 0.8 against the negatives 0.6, 0.2, 0.1 rank first: AP 1, recall 1.
    assert by_intensity["High"]["ap"] == 1.0 and by_intensity["High"]["recall"] == 1.0
    # Low: the positive at 0.3 ranks behind the negative at 0.6: AP 1/2, and it is missed.
    assert by_intensity["Low"]["ap"] == 0.5 and by_intensity["Low"]["recall"] == 0.0
    assert math.isnan(by_intensity["None"]["recall"]) and by_intensity["None"]["false_alarms"] == 1 / 3
    assert breakdown(store, "r1", "volcano") == {}  # no frame_names.json: no volcano breakdown


def test_volcano_breakdown_from_the_dataset_roots_frame_names(tmp_path) -> None:
    store = _store_with_run(tmp_path, {"A": "Etna, Stromboli", "B": "Vesuvius"})
    by_volcano = breakdown(store, "r1", "volcano")
    assert set(by_volcano) == {"Etna", "Stromboli", "Vesuvius"}
    assert by_volcano["Etna"] == by_volcano["Stromboli"] == breakdown(store, "r1", "frame_id")["A"]
    assert by_volcano["Vesuvius"]["n"] == 3 and by_volcano["Vesuvius"]["n_deformation"] == 1
    text = leaderboard_text(store, fmt="markdown")
    assert "Deformation by volcano" in text and "| volcano | n | n_deformation | recall | false_alarms | ap |" in text


def test_breakdown_tables_for_programs_hold_the_subgroup_columns(tmp_path, capsys) -> None:
    from thalia_ray.cli import main

    store = _store_with_run(tmp_path, {"A": "Etna, Stromboli", "B": "Vesuvius"})
    assert main(["leaderboard", "--store", str(tmp_path / "store"), "--format", "csv", "--breakdown", "volcano"]) == 0
    frame = pd.read_csv(io.StringIO(capsys.readouterr().out))
    assert list(frame.columns) == ["run_id", "volcano", "n", "n_deformation", "recall", "false_alarms", "ap"]
    vesuvius = frame.set_index("volcano").loc["Vesuvius"]
    assert vesuvius["recall"] == breakdown(store, "r1", "volcano")["Vesuvius"]["recall"] == 1.0
    assert vesuvius["false_alarms"] == 0.0
    assert main(["leaderboard", "--store", str(tmp_path / "store"), "--format", "json", "--breakdown", "intensity"]) == 0
    rows = {r["intensity"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["Low"]["ap"] == 0.5 and rows["None"]["recall"] is None  # NaN is a JSON null


def test_frame_names_format_is_checked(tmp_path) -> None:
    (tmp_path / "frame_names.json").write_text(json.dumps({"A": ["Etna"]}))
    with pytest.raises(AnnotationError, match="frame_names.json"):
        load_frame_names(tmp_path)


def test_real_frame_names_parse(shared_meta) -> None:
    names = load_frame_names(shared_meta)
    assert len(names) == 38 and all(names.values())
    assert "Campi Flegrei" in names["022D_04826_121209"]


def test_dataset_provided_volcano_names_cannot_become_spreadsheet_formulas(tmp_path, capsys) -> None:
    """Names from frame_names.json reach the CSV as text: a leading =, +, -, @, tab or CR gets a quote."""
    import csv

    from thalia_ray.cli import main

    hostile = ["=HYPERLINK(\"http://evil\")", "+cmd|' /C calc'!A0", "-2+3", "@SUM(1)"]
    _store_with_run(tmp_path, {"A": ", ".join(hostile), "B": "Vesuvius"})
    assert main(["leaderboard", "--store", str(tmp_path / "store"), "--format", "csv", "--breakdown", "volcano"]) == 0
    out = capsys.readouterr().out
    rows = list(csv.DictReader(io.StringIO(out, newline="")))
    names = [r["volcano"] for r in rows]
    assert sorted(names) == sorted(["'" + name for name in hostile] + ["Vesuvius"])
    assert all(not name.startswith(("=", "+", "-", "@", "\t", "\r")) for name in names)
    frame = pd.read_csv(io.StringIO(out))
    assert frame["recall"].dtype.kind == "f" and frame["n"].dtype.kind == "i"  # numbers stay numbers
