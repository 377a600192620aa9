"""`thalia-ray report`: one self-contained HTML page per run or sweep, built from the experiment store.

`page` writes a run's or a sweep's page: `runs` holds each run kind's sections (a registry by kind),
`sweeps` a sweep's, `html` the page's pieces; `figures` draws (matplotlib, PNG), `samples` reads gallery
samples back from the dataset, and `browser` checks a page in headless Chromium.
"""
