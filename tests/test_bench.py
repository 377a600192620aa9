"""The benchmark harness itself: statistics, interleaving, ratios of known workloads, records, the CLI."""
from __future__ import annotations

import json
import time

import pytest

from thalia_ray.bench import harness
from thalia_ray.bench.harness import BenchResult, Rep, interleave, ratio, spread, timed_rate
from thalia_ray.bench.suites import SUITES, BenchOptions, resolve_params, run_suite
from thalia_ray.bench.sweep import reached, summarise_pairs
from thalia_ray.cli import main


def test_spread_median_quartiles_and_mad():
    s = spread([5, 1, 3, 2, 4])
    assert (s.n, s.median, s.q1, s.q3, s.iqr, s.mad, s.min, s.max) == (5, 3, 2, 4, 2, 1, 1, 5)
    one = spread([7.0])
    assert (one.median, one.iqr, one.mad) == (7.0, 0.0, 0.0)
    with pytest.raises(ValueError):
        spread([])


def test_interleave_rotates_the_starting_workload_and_drops_warmup():
    order: list[str] = []

    def workload(name: str):
        def run() -> Rep:
            order.append(name)
            return Rep(float(len(order)), 0.0)
        return run

    reps = interleave({"a": workload("a"), "b": workload("b")}, repeats=3, warmup=1)
    assert order == ["a", "b", "b", "a", "a", "b", "b", "a"]
    assert [r.value for r in reps["a"]] == [4.0, 5.0, 8.0]  # the first (warm-up) run is not kept
    assert [r.value for r in reps["b"]] == [3.0, 6.0, 7.0]
    with pytest.raises(ValueError):
        interleave({"a": workload("a")}, repeats=0)


def test_ratio_of_two_known_workloads():
    """One item per 50 ms sleep against one per 150 ms: the first is about 3× faster."""

    def sleeper(seconds: float):
        def fn() -> int:
            time.sleep(seconds)
            return 1
        return fn

    reps = interleave({"fast": timed_rate(sleeper(0.05)), "slow": timed_rate(sleeper(0.15))}, repeats=3)
    result = BenchResult("known", {})
    fast, slow = result.add("fast", "items/s", reps["fast"]), result.add("slow", "items/s", reps["slow"])
    assert all(r.extra["items"] == 1 and r.wall_s >= 0.05 for r in reps["fast"])
    r = ratio("fast vs slow", fast, slow, target=1.5)
    assert 1.5 < r.value < 3.2  # sleeps overshoot a little on a busy machine, never undershoot
    assert r.met is True and "meets" in r.verdict()
    missed = ratio("slow vs fast", slow, fast, target=1.0, why="it sleeps longer")
    assert missed.met is False
    assert "MISSES" in missed.verdict() and "it sleeps longer" in missed.verdict()


def test_ratio_of_costs_is_inverted_and_directions_must_match():
    result = BenchResult("costs", {})
    cheap = result.add("cheap", "worker-s", [Rep(10.0, 0.0), Rep(12.0, 0.0)], higher_is_better=False)
    dear = result.add("dear", "worker-s", [Rep(33.0, 0.0)], higher_is_better=False)
    assert ratio("saving", cheap, dear).value == pytest.approx(3.0)
    rate = result.add("rate", "items/s", [Rep(1.0, 0.0)])
    with pytest.raises(ValueError, match="opposite directions"):
        ratio("bad", rate, cheap)


def test_missed_target_says_by_how_much():
    r = harness.Ratio("x", "p", "b", value=4.0, target=5.0, why="small frames")
    assert r.verdict() == "MISSES ≥ 5× by 20 %: small frames"
    assert harness.Ratio("x", "p", "b", value=1.0).met is None


def test_record_is_written_to_the_store_as_json(tmp_path):
    result = BenchResult("demo", {"size": "small"}, machine={"cpu_count": 2, "gpus": []})
    a = result.add("a", "items/s", [Rep(10.0, 1.0), Rep(12.0, 1.0), Rep(11.0, 1.0)])
    b = result.add("b", "items/s", [Rep(5.0, 1.0)])
    result.ratios.append(ratio("a vs b", a, b, target=2.0))
    result.notes.append("a note")
    where = harness.write_record(result, str(tmp_path))
    assert where.path.startswith(str(tmp_path / "bench" / "demo-"))
    assert where.path.endswith(".json") and ":" not in where.name
    record = json.loads(where.read_text())
    assert record["suite"] == "demo" and record["machine"]["cpu_count"] == 2
    assert record["series"][0]["stats"]["median"] == 11.0 and len(record["series"][0]["reps"]) == 3
    assert record["ratios"][0] == {"name": "a vs b", "project": "a", "baseline": "b", "value": 2.2,
                                   "target": 2.0, "met": True, "why": ""}
    table = result.table()
    assert "a vs b: 2.20×" in table and "meets ≥ 2×" in table and "note: a note" in table


def test_label_efficiency_table_averages_seeds_and_figures_go_beside_the_record(tmp_path):
    import math

    from thalia_ray.bench import pretrain as pt

    assert pt.mean_spread([0.5, 0.7, math.nan]) == pytest.approx((0.6, math.sqrt(0.02)))  # NaN: one class only
    assert pt.mean_spread([0.4]) == (0.4, 0.0)
    outcomes = {("r · random init", 0.05): [{"test/auroc_deformation": 0.5, "test/ap_deformation": 0.2},
                                             {"test/auroc_deformation": 0.7, "test/ap_deformation": 0.4}]}
    head, rule, row, empty = pt.table(outcomes, ["r · random init", "r · mae"], [0.05])
    assert head == "| arm | 5 % AUROC | 5 % AP |" and rule == "| --- | --- | --- |"
    assert row == "| r · random init | 0.600 ± 0.141 | 0.300 ± 0.141 |" and empty == "| r · mae | – | – |"
    result = BenchResult("pretrain", {}, figures={"label-efficiency": b"\x89PNG fake"})
    where = harness.write_record(result, str(tmp_path))
    assert json.loads(where.read_text())["figures"] == ["label-efficiency"]
    figure = harness.figure_location(where, "label-efficiency")
    assert figure.path == where.path.removesuffix(".json") + "-label-efficiency.png"
    assert figure.read_bytes() == b"\x89PNG fake"


def test_params_presets_and_overrides():
    suite = SUITES["cube"]
    params = resolve_params(suite, BenchOptions(size="medium", params={"crop": "96"}))
    assert params["crop"] == 96 and params["size"] == suite.presets["medium"]["size"]
    with pytest.raises(ValueError, match="unknown parameter"):
        resolve_params(suite, BenchOptions(params={"cropp": "1"}))
    with pytest.raises(ValueError, match="unknown size"):
        resolve_params(suite, BenchOptions(size="huge"))
    with pytest.raises(ValueError, match="bad parameter value"):
        resolve_params(suite, BenchOptions(params={"crop": "wide"}))


def test_sweep_reached_within_one_percent():
    assert reached(0.995, 1.0) and not reached(0.98, 1.0)
    pairs = summarise_pairs([Rep(10, 0, {"best": 0.80})], [Rep(30, 0, {"best": 0.85})])
    assert pairs["all_reached"] is False and pairs["pairs"][0]["grid_best"] == 0.85


def test_cube_suite_end_to_end(tmp_path, capsys):
    """A real (tiny) suite through the CLI: table on stdout, JSON record with the machine in the store."""
    code = main(["bench", "cube", "--store", str(tmp_path), "--repeats", "2", "--param", "frames=1",
                 "--param", "size=32", "--param", "crop=16", "--param", "groups=3", "--param", "samples=3"])
    assert code == 0
    out = capsys.readouterr().out
    assert "cube windowed reads" in out and "windowed vs per-sample" in out
    (record_file,) = (tmp_path / "bench").glob("cube-*.json")
    record = json.loads(record_file.read_text())
    assert record["options"]["crop"] == 16 and record["options"]["repeats"] == 2
    assert [len(s["reps"]) for s in record["series"]] == [2, 2]
    assert all(rep["extra"]["items"] > 0 for s in record["series"] for rep in s["reps"])
    assert record["ratios"][0]["target"] == 5.0 and isinstance(record["ratios"][0]["met"], bool)
    assert {"cpu_model", "cpu_count", "gpus", "torch", "ray"} <= set(record["machine"])


def test_learnability_curve_scores_the_held_out_splits_the_pipeline_reads(synthetic_root):
    """The curve's samples are the service's own (same splits, crops and labels as the index), and the
    model it scores at each checkpoint is the one being trained."""
    from thalia_ray.bench import learnability
    from thalia_ray.data.index import SampleIndex

    p = {"crop": 32, "model": "resnet18", "lr": 1e-3, "batch_size": 8}
    cfg = learnability.run_config(str(synthetic_root), p, seed=0)
    index = SampleIndex.from_config(cfg.data, cfg.seed)
    test = learnability.split_arrays(cfg, "test")
    assert test["image"].shape == (len(index.samples("test")), 3, 32, 32)
    assert test["label"].tolist() == [s.label for s in index.samples("test")]
    points, counts = learnability.curve(cfg, [0, 2, 4])
    assert [p.steps for p in points] == [0, 2, 4] and points[0].seconds == 0 < points[1].seconds <= points[2].seconds
    assert all(0.0 <= p.test_auroc <= 1.0 for p in points) and len({p.test_auroc for p in points}) > 1
    assert counts["test_positives"] + counts["test_negatives"] == len(test["label"])
    assert counts["train_per_epoch"] == 2 * sum(s.label for s in index.samples("train"))  # balanced epochs


def test_gpu_suite_refuses_without_a_gpu(tmp_path, capsys):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the refusal path does not apply")
    with pytest.raises(harness.SuiteUnavailable, match="needs a CUDA GPU"):
        run_suite("gpu")
    assert main(["bench", "gpu", "--store", str(tmp_path)]) == harness.SuiteUnavailable.exit_code == 1  # no kind's
    assert "no numbers were measured" in capsys.readouterr().err
    assert not (tmp_path / "bench").exists()


def test_cli_lists_suites_and_rejects_unknown(capsys):
    assert main(["bench", "list"]) == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in ("cube", "shards", "pipeline", "train_step", "sweep", "synthetic", "gpu"))
    assert main(["bench", "nope"]) == 2
    assert "no benchmark suite 'nope'" in capsys.readouterr().err


def test_timed_run_counts_samples_and_separates_the_first_batch():
    from thalia_ray.bench.ingest import timed_run

    def batches():
        time.sleep(0.2)  # the epoch's start-up
        for n in (4, 4, 2):
            yield {"key": ["k"] * n}

    rep = timed_run(batches())
    assert rep.extra["items"] == 10 and rep.extra["first_batch_s"] >= 0.2
    assert rep.value == pytest.approx(10 / rep.wall_s) and rep.extra["steady"] > rep.value  # start-up left out


def test_dataloader_baseline_runs_the_pipelines_plan_and_work(synthetic_root, ray_cluster):
    """The baseline's persistent workers deliver the same epoch draw, with the same records, as Ray Data."""
    import numpy as np

    from thalia_ray.bench import ingest
    from thalia_ray.config import load_config
    from thalia_ray.data.index import SampleIndex
    from thalia_ray.data.pipeline import build_datasets, lane_name, set_epoch

    cfg = load_config(None, [f"data.root={synthetic_root}", "data.crop=32", "data.length=1",
                             "data.samples_per_read_task=4", "data.augmentations=false"])
    data = build_datasets(cfg, splits=("train",))
    plan = ingest.EpochPlan()
    loader = ingest.make_loader(1, plan)
    source = ingest.detached(data.sources["train"])
    index = SampleIndex.from_config(cfg.data, cfg.seed)
    for epoch in (0, 1):
        plan.chunks = [rows for _, rows in source.chunks(epoch)]
        base = {k: img for b in loader for k, img in zip(b["key"], b["image"].numpy())}
        set_epoch(data.epoch_control, epoch)
        lane = data.datasets[lane_name("train", epoch)]
        ours = {k: img for b in lane.iter_batches(batch_size=None, batch_format="numpy")
                for k, img in zip(b["key"], b["image"])}
        assert sorted(base) == sorted(ours) == sorted(s.key for s in index.epoch("train", epoch, cfg.seed))
        for key, image in ours.items():
            np.testing.assert_array_equal(base[key], image)  # same crop (seeded per epoch and key), same finalize
