"""Open a Snakemake report in headless Chromium and walk it as a reader does: for every category in the menu, click
it, and for every result in its table click the eye button (a figure must then show as a loaded image, a table as
its rows) and the information button (its caption). Used by tests/test_report_browser.py; also runnable:

    python tests/_report_browser.py results/report.html [screenshot.png]

prints the walk as JSON (and saves a screenshot of the first figure's view). Chromium is driven over the DevTools
protocol (tornado's websocket client, already installed with Jupyter): no extra Python package, no chromedriver.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")

# Runs in the page; returns the walk. `app` and `categories` are the report's own globals (its React app, its
# results by category); the clicks go through the page's own links and buttons.
WALK_JS = r"""
(async () => {
  const sleep = ms => new Promise(r => setTimeout(r, ms));
  const until = async (what, f, ms = 20000) => {
    const t0 = Date.now();
    while (Date.now() - t0 < ms) { const v = f(); if (v) return v; await sleep(25); }
    throw new Error('timed out waiting for ' + what);
  };
  const link = text => [...document.querySelectorAll('a')].find(a => a.textContent.trim() === text);
  const rows = () => [...document.querySelectorAll('table tbody tr')];
  const openCategory = async (cat) => {
    app.setView({navbarMode: 'menu'});  // the home breadcrumb
    // A report of one category lists it as "Results" in the menu, not by its name.
    const item = () => link(cat) || (Object.keys(categories).length === 1 ? link('Results') : null);
    (await until('menu item ' + cat, item)).click();
    await until('results of ' + cat, () => rows().length > 0);
  };
  await until('the report app', () => typeof app !== 'undefined' && link('Statistics'));
  const results = [];
  for (const cat of Object.keys(categories).sort()) {
    await openCategory(cat);
    const n = rows().length;
    for (let i = 0; i < n; i++) {
      await openCategory(cat);
      const row = rows()[i];
      const label = row.querySelector('td').textContent.trim();
      const [eye, info] = [...row.querySelectorAll('a')].slice(-2);
      const entry = {category: cat, label};
      if (eye.getAttribute('href') === '#') {
        eye.click();
        const img = await until('the image of ' + label, () => {
          const im = [...document.querySelectorAll('img')].find(m => m.src === app.state.contentPath);
          return im && im.complete && im.naturalWidth > 0 ? im : null;
        });
        entry.image = [img.naturalWidth, img.naturalHeight];
      } else {
        entry.download = eye.getAttribute('download');
        entry.download_bytes = atob(eye.href.split(',')[1] || '').length;
      }
      const before = new Set(document.querySelectorAll('.prose'));  // e.g. the workflow's description
      info.click();
      const caption = await until('the caption of ' + label,
                                  () => [...document.querySelectorAll('.prose')].find(el => !before.has(el)));
      entry.caption = caption.innerText.trim();
      entry.info = /description/i.test(document.body.innerText);
      results.push(entry);
    }
  }
  return JSON.stringify(results);
})()
"""


def find_chromium() -> str | None:
    return next((p for p in map(shutil.which, CHROMIUM_NAMES) if p), None)


class DevTools:
    """A headless Chromium with one page, driven over the DevTools protocol."""

    def __init__(self, chromium: str, profile: Path) -> None:
        self.proc = subprocess.Popen(
            [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
             "--remote-debugging-port=0", "--remote-allow-origins=*", f"--user-data-dir={profile}",
             "--window-size=1400,900", "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)  # its own process group: close() ends its helper processes too
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not (port_file.is_file() and port_file.read_text().strip()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{chromium} did not open its DevTools port")
            time.sleep(0.1)
        port = port_file.read_text().split()[0]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as resp:
            pages = [t for t in json.loads(resp.read()) if t["type"] == "page"]
        self.ws_url = pages[0]["webSocketDebuggerUrl"]

    def close(self) -> None:
        """End Chromium and its helpers (they write into the profile until they exit)."""
        for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(timeout=wait)
                time.sleep(0.5)  # the group's other processes, after the browser process
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (subprocess.TimeoutExpired, ProcessLookupError):
                continue
            break

    def walk_report(self, report: Path, screenshot: Path | None = None, timeout: float = 120) -> list[dict]:
        """Load `report` and run WALK_JS; optionally a PNG screenshot of the first figure's view."""
        from tornado.websocket import websocket_connect

        async def run() -> list[dict]:
            ws = await websocket_connect(self.ws_url, max_message_size=1 << 28)
            ids = iter(range(1, 1 << 30))

            async def call(method: str, **params) -> dict:
                msg_id = next(ids)
                await ws.write_message(json.dumps({"id": msg_id, "method": method, "params": params}))
                while True:
                    raw = await ws.read_message()
                    if raw is None:
                        raise ConnectionError("the DevTools websocket closed")
                    msg = json.loads(raw)
                    if msg.get("id") == msg_id:
                        if "error" in msg:
                            raise RuntimeError(f"{method}: {msg['error']}")
                        return msg["result"]

            await call("Page.enable")
            await call("Page.navigate", url=report.resolve().as_uri())
            res = await call("Runtime.evaluate", expression=WALK_JS, awaitPromise=True, returnByValue=True)
            if "exceptionDetails" in res:
                raise RuntimeError(f"walking the report failed: {res['exceptionDetails']}")
            walk = json.loads(res["result"]["value"])
            if screenshot is not None:
                figure = next((r for r in walk if "image" in r), None)
                if figure is not None:  # show it again, with its caption in the side bar
                    await call("Runtime.evaluate", awaitPromise=True, expression=(
                        "(async () => { const a = [...document.querySelectorAll('a')].find(a => a.textContent.trim() "
                        f"=== {json.dumps(figure['category'])}); app.setView({{navbarMode: 'menu'}}); "
                        "await new Promise(r => setTimeout(r, 200)); "
                        "[...document.querySelectorAll('a')].find(a => a.textContent.trim() === "
                        f"{json.dumps(figure['category'])}).click(); await new Promise(r => setTimeout(r, 200)); "
                        "const row = [...document.querySelectorAll('table tbody tr')].find(r => "
                        f"r.querySelector('td').textContent.trim() === {json.dumps(figure['label'])}); "
                        "const [eye, info] = [...row.querySelectorAll('a')].slice(-2); eye.click(); "
                        "await new Promise(r => setTimeout(r, 200)); info.click(); "
                        "await new Promise(r => setTimeout(r, 500)); })()"))
                shot = await call("Page.captureScreenshot", format="png")
                screenshot.write_bytes(base64.b64decode(shot["data"]))
            ws.close()
            return walk

        return asyncio.run(asyncio.wait_for(run(), timeout))


def walk(report: Path, screenshot: Path | None = None) -> list[dict]:
    chromium = find_chromium()
    if chromium is None:
        raise FileNotFoundError(f"no Chromium found ({', '.join(CHROMIUM_NAMES)})")
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as profile:
        browser = DevTools(chromium, Path(profile))
        try:
            return browser.walk_report(report, screenshot)
        finally:
            browser.close()


if __name__ == "__main__":
    print(json.dumps(walk(Path(sys.argv[1]), Path(sys.argv[2]) if len(sys.argv) > 2 else None), indent=1))
