"""`thalia-ray report`: one self-contained HTML page per run or sweep, built from the experiment store.

`figures` draws (matplotlib, PNG), `samples` reads gallery samples back from the dataset, `page`
assembles the HTML, and `browser` checks a page in headless Chromium.
"""
