"""Storage traffic as a run records and shows it: sums per epoch, the history's columns, the priced
summary of `runs show` (pure: no storage involved)."""
from __future__ import annotations

from thalia_ray.store.records import format_run_details
from thalia_ray.traffic import Meter, Traffic, history_lines, request_cost


def _row(epoch: int, requests: int, hits: int, retries: int = 0, throttles: int = 0) -> dict:
    return {"epoch": epoch, "time/samples_per_s": 50.0, "time/epoch_s": 2.0,
            **Traffic(requests=requests, bytes=requests * 1000, cache_hits=hits, retries=retries,
                      throttles=throttles).metrics()}


def test_a_meter_sums_what_it_is_told_and_differences_give_a_tasks_share():
    meter = Meter()
    meter.add(requests=3, bytes=300)
    before = meter.snapshot()
    meter.add(requests=2, bytes=50, cache_hits=7, retries=1, throttles=1)
    assert meter.snapshot() - before == Traffic(requests=2, bytes=50, cache_hits=7, retries=1, throttles=1)
    assert not Traffic() and Traffic(cache_hits=1)


def test_history_columns_round_trip_and_total():
    rows = [_row(1, 3000, 100, retries=4, throttles=3), _row(2, 200, 2900)]
    assert Traffic.from_metrics(rows[0]).requests == 3000 and Traffic.from_metrics({"epoch": 1}) == Traffic()
    total = Traffic.total(rows)
    assert (total.requests, total.cache_hits, total.retries, total.throttles) == (3200, 3000, 4, 3)


def test_runs_show_lists_each_epochs_traffic_and_prices_the_requests():
    rows = [_row(1, 3000, 100, retries=4, throttles=3), _row(2, 200, 2900)]
    text = format_run_details({"run_id": "r1"}, rows, None, request_price=0.5)
    assert "storage   3,200 GET (16.0/sample)" in text  # 200 samples over the two epochs
    assert f"≈{request_cost(3200, 0.5):.4g} at 0.5/1000 GET" in text and request_cost(3200, 0.5) == 1.6
    assert "4 retries (3 throttled" in text
    assert "epoch 1   3,000 GET (30.0/sample)" in text and "epoch 2   200 GET (2.0/sample)" in text


def test_a_run_without_object_storage_shows_no_storage_lines():
    assert history_lines([{"epoch": 1, "time/samples_per_s": 1.0, "time/epoch_s": 1.0}], 0.0004) == []
    assert "storage" not in format_run_details({"run_id": "r1"}, [{"epoch": 1}], None)


def test_the_report_tables_each_epochs_traffic_with_its_cost():
    from thalia_ray.report.runs import _storage

    html = _storage([_row(1, 3000, 100, retries=4, throttles=3), _row(2, 200, 2900)], 0.5)
    assert html is not None and "Storage traffic" in html
    for cell in ("3,000", "30.0", "2,900", "3,200", "1.6", "0.5 per 1,000 GETs"):
        assert cell in html
    assert _storage([{"epoch": 1}], 0.5) is None
