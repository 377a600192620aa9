"""Open a report in headless Chromium and check it the way a reader's browser sees it.

A small DevTools-protocol client (over aiohttp's websocket, already a Ray dependency) loads the page,
collects console messages, uncaught exceptions and failed loads, asks the page whether every image
decoded, and takes a full-page screenshot. Chromium comes from the system (`apt-get install chromium`).
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from thalia_ray.errors import ThaliaError

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
MAX_HEIGHT = 6000  # px of the screenshot; long pages are cut there
TIMEOUT_S = 60.0
SCREENSHOT = "screenshot.png"
IMAGES_JS = "JSON.stringify(Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth]))"


class BrowserError(ThaliaError, RuntimeError):
    """No usable headless browser, or the page could not be loaded in it."""


@dataclass
class PageCheck:
    errors: list[str] = field(default_factory=list)  # console errors, exceptions, failed loads
    images: list[tuple[str, bool, int]] = field(default_factory=list)  # (alt, complete, naturalWidth)
    screenshot: bytes = b""

    @property
    def broken_images(self) -> list[str]:
        return [alt for alt, complete, width in self.images if not complete or width <= 0]


def find_browser() -> str:
    for name in BROWSERS:
        found = shutil.which(name)
        if found:
            return found
    raise BrowserError(f"no headless browser found (looked for {', '.join(BROWSERS)}): apt-get install chromium")


def check_page(page: Path, browser: str | None = None) -> PageCheck:
    """Load `page` (a local HTML file) in headless Chromium: errors, image states and a screenshot."""
    # Chromium runs in its own process group, ended whole, so its helper processes do not outlive the check;
    # one still flushing into the profile as it exits must not fail a check that has already passed.
    with tempfile.TemporaryDirectory(prefix="thalia-chromium-", ignore_cleanup_errors=True) as profile:
        process = subprocess.Popen(
            [browser or find_browser(), "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--disable-dev-shm-usage", "--remote-debugging-port=0", f"--user-data-dir={profile}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            endpoint = _devtools_endpoint(process)
            return asyncio.run(asyncio.wait_for(_inspect(endpoint, page.resolve().as_uri()), TIMEOUT_S))
        finally:
            _signal_group(process, signal.SIGTERM)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                _signal_group(process, signal.SIGKILL)


def _signal_group(process: subprocess.Popen, sig: int) -> None:
    """Signal the browser and every helper process it started (its process group)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, sig)


def _devtools_endpoint(process: subprocess.Popen) -> str:
    """The browser's `ws://127.0.0.1:PORT/devtools/browser/...` address, read from its stderr."""
    assert process.stderr is not None
    seen = []
    for line in process.stderr:
        seen.append(line.rstrip())
        found = re.search(r"DevTools listening on (ws://\S+)", line)
        if found:
            return found.group(1)
    raise BrowserError("the browser exited before it opened DevTools: " + " | ".join(seen[-5:]))


class _Session:
    """Commands and events of one DevTools websocket."""

    def __init__(self, socket: Any) -> None:
        self.socket, self.next_id, self.events = socket, 0, []

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        await self.socket.send_str(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads((await self.socket.receive()).data)
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise BrowserError(f"{method}: {message['error']}")
                return message.get("result", {})
            self.events.append(message)

    async def wait_for(self, method: str) -> dict[str, Any]:
        for event in self.events:
            if event.get("method") == method:
                return event
        while True:
            message = json.loads((await self.socket.receive()).data)
            self.events.append(message)
            if message.get("method") == method:
                return message


async def _inspect(endpoint: str, url: str) -> PageCheck:
    import aiohttp

    http = endpoint.replace("ws://", "http://").split("/devtools/")[0]
    async with aiohttp.ClientSession() as client:
        async with client.put(f"{http}/json/new?about:blank") as response:
            target = await response.json()
        async with client.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0) as socket:
            session = _Session(socket)
            for domain in ("Page", "Runtime", "Log"):
                await session.call(f"{domain}.enable")
            await session.call("Emulation.setDeviceMetricsOverride", width=1280, height=900, deviceScaleFactor=1,
                               mobile=False)
            await session.call("Page.navigate", url=url)
            await session.wait_for("Page.loadEventFired")
            images = await session.call("Runtime.evaluate", expression=IMAGES_JS, returnByValue=True)
            size = (await session.call("Page.getLayoutMetrics"))["cssContentSize"]
            shot = await session.call("Page.captureScreenshot", format="png", captureBeyondViewport=True,
                                      clip={"x": 0, "y": 0, "width": size["width"],
                                            "height": min(size["height"], MAX_HEIGHT), "scale": 1})
            return PageCheck(errors=_errors(session.events),
                             images=[tuple(i) for i in json.loads(images["result"]["value"])],
                             screenshot=base64.b64decode(shot["data"]))


def _errors(events: list[dict[str, Any]]) -> list[str]:
    found = []
    for event in events:
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            found.append("console: " + " ".join(str(a.get("value", a.get("description"))) for a in params["args"]))
        elif method == "Runtime.exceptionThrown":
            found.append("exception: " + params["exceptionDetails"].get("text", ""))
        elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
            found.append(f"log ({params['entry'].get('source')}): {params['entry'].get('text')}")
    return found


def screenshot_beside(page: Any) -> Any:
    """Check a written report (a storage Location) and save `screenshot.png` next to it.

    Raises BrowserError naming the console errors and undecoded images, after saving the screenshot.
    """
    with tempfile.TemporaryDirectory(prefix="thalia-report-") as scratch:
        local = Path(page.path) if page.protocol == "file" else Path(scratch) / page.name
        if page.protocol != "file":
            local.write_bytes(page.read_bytes())
        check = check_page(local)
    target = page.parent().join(SCREENSHOT)
    target.write_bytes(check.screenshot)
    problems = check.errors + [f"image did not decode: {alt}" for alt in check.broken_images]
    if problems:
        raise BrowserError(f"{page.url}: " + "; ".join(problems))
    return target
