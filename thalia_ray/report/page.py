"""The report page: the sections of a run (by its kind, see `runs`) or of a sweep (`sweeps`), written as
one self-contained HTML file (see `html`).

A section that cannot be drawn (no test predictions, dataset not reachable) says why instead.
"""
from __future__ import annotations

from thalia_ray.report.html import document
from thalia_ray.report.runs import run_sections
from thalia_ray.report.sweeps import sweep_sections
from thalia_ray.storage import Location, local
from thalia_ray.store.layout import ExperimentStore
from thalia_ray.store.records import StoreError, utc_now

PAGE = "index.html"
REPORT = "report"


def write_report(store: ExperimentStore, target: str, out: str | Location | None = None) -> Location:
    """Write the report of run or sweep `target`; returns the page's location.

    Default place: `{store}/runs/{id}/report/index.html`, or `{store}/sweeps/{id}/report/index.html`.
    """
    if store.sweep(target).loc.join("summary.json").exists():
        folder = store.sweep(target).loc.join(REPORT)
        title, sections = f"thalia-ray sweep {target}", sweep_sections(store, target)
    elif store.run(target).exists():
        folder = store.run(target).loc.join(REPORT)
        title, sections = f"thalia-ray run {target}", run_sections(store, target)
    else:
        raise StoreError(f"{target!r} is neither a run nor a sweep in {store.root.url}")
    page = (local(out) if out is not None else folder).join(PAGE)
    page.write_text(document(title, f"written {utc_now()} from {store.root.url}", sections))
    return page
