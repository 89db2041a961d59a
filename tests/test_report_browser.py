"""The run report and the comparison page rendered by a real browser (headless Chromium): every section
laid out, every image decoded, nothing wider than the window, no chart labels drawn over each other.

The page has no script; the measurement is injected through the DevTools protocol
(`--remote-debugging-pipe`: JSON messages on file descriptors 3 and 4, no port, no extra library),
and the full-page screenshot is checked where each section lies. Skipped where no Chromium is
installed (`.ci/run` installs Debian's, so CI runs them).
"""

import base64
import json
import os
import pathlib
import select
import shutil
import signal
import subprocess
import time

import cv2
import numpy as np
import pytest

from keras_seg import report
from test_train import Trainer, make_config, tiny_data  # noqa: F401 (fixture)

CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
# The closed network refuses Chromium's background connections: these flags keep it from trying.
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--hide-scrollbars", "--remote-debugging-pipe"]
# A small laptop's window: the page's widest block (the 900-px learning curves) must fit without scrolling.
WINDOW = (1024, 768)
TIMEOUT = 60.0

# .ci/run installs Chromium and sets KERAS_SEG_REQUIRE_BROWSER=1: there a missing browser fails these tests, elsewhere
# they skip.
pytestmark = pytest.mark.skipif(CHROMIUM is None and os.environ.get("KERAS_SEG_REQUIRE_BROWSER") != "1",
                                reason="no Chromium installed (apt-get install chromium)")

# Run in the page: each <h2>/<h3> block (the heading and what follows it up to the next heading) and its
# painted box, the images, the SVG charts' texts, and anything reaching past the window's width.
MEASURE = r"""
(async () => {
  await Promise.all([...document.images].map(i => i.decode().catch(() => null)));
  const box = r => ({top: r.top + scrollY, bottom: r.bottom + scrollY, left: r.left, right: r.right,
                     width: r.width, height: r.height});
  const blocks = [];
  for (const heading of document.querySelectorAll('h2, h3')) {
    let content = {top: Infinity, bottom: -Infinity, height: 0, elements: 0};
    for (let e = heading.nextElementSibling; e && !/^H[123]$/.test(e.tagName); e = e.nextElementSibling) {
      const r = e.getBoundingClientRect();
      content.elements += 1;
      if (r.height > 0 && r.width > 0) {
        content.top = Math.min(content.top, r.top + scrollY);
        content.bottom = Math.max(content.bottom, r.bottom + scrollY);
      }
    }
    content.height = content.bottom > content.top ? content.bottom - content.top : 0;
    blocks.push({tag: heading.tagName, text: heading.textContent, heading: box(heading.getBoundingClientRect()),
                 content: content.height ? {top: content.top, bottom: content.bottom, height: content.height}
                                         : {height: 0, elements: content.elements}});
  }
  const images = [...document.images].map(i => ({alt: i.alt, complete: i.complete, naturalWidth: i.naturalWidth,
                                                  naturalHeight: i.naturalHeight,
                                                  box: box(i.getBoundingClientRect())}));
  const charts = [...document.querySelectorAll('svg')].map(svg => {
    const texts = [...svg.querySelectorAll('text')].filter(t => !t.hasAttribute('transform')).map(t => {
      const r = t.getBoundingClientRect();
      return {text: t.textContent, left: r.left, right: r.right, top: r.top, bottom: r.bottom};
    });
    const marks = svg.querySelectorAll('rect, polyline, circle, line').length;
    return {box: box(svg.getBoundingClientRect()), marks, texts};
  });
  const width = document.documentElement.clientWidth;
  const overflowing = [...document.body.querySelectorAll('*')].filter(e => {
    const r = e.getBoundingClientRect();
    return r.width > 0 && (r.right > width + 0.5 || r.left < -0.5);
  }).map(e => `<${e.tagName.toLowerCase()}> ${Math.round(e.getBoundingClientRect().right)} px`);
  return {width, scrollWidth: document.documentElement.scrollWidth, height: document.documentElement.scrollHeight,
          text: document.body.innerText.length, blocks, images, charts, overflowing: overflowing.slice(0, 10)};
})()
"""


class Chromium:
    """Headless Chromium driven over `--remote-debugging-pipe` (DevTools protocol, one page)."""

    def __init__(self, profile_dir, log_path):
        to_browser_read, self._to_browser = os.pipe()
        self._from_browser, from_browser_write = os.pipe()
        self._log = open(log_path, "wb")
        # The protocol's pipe is the child's fds 3 (commands in) and 4 (replies out); bash puts them there (dash
        # takes one-digit descriptors only, and a Python pre-exec hook is unsafe beside TensorFlow's threads).
        self.process = subprocess.Popen(
            ["bash", "-c", f'exec "$0" "$@" 3<&{to_browser_read} 4>&{from_browser_write}', CHROMIUM, *FLAGS,
             f"--user-data-dir={profile_dir}", f"--window-size={WINDOW[0]},{WINDOW[1]}", "about:blank"],
            pass_fds=(to_browser_read, from_browser_write), stdin=subprocess.DEVNULL, stdout=self._log,
            stderr=self._log, start_new_session=True)
        os.close(to_browser_read)
        os.close(from_browser_write)
        self._buffer, self._next_id, self.session = b"", 0, None
        targets = self.call("Target.getTargets")["targetInfos"]
        page = next(t for t in targets if t["type"] == "page")
        self.session = self.call("Target.attachToTarget", targetId=page["targetId"], flatten=True)["sessionId"]
        self.call("Emulation.setDeviceMetricsOverride", width=WINDOW[0], height=WINDOW[1], deviceScaleFactor=1,
                  mobile=False)

    def call(self, method, **params):
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params}
        if self.session and not method.startswith("Target."):
            message["sessionId"] = self.session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + TIMEOUT
        while True:
            while b"\0" in self._buffer:
                raw, self._buffer = self._buffer.split(b"\0", 1)
                reply = json.loads(raw)
                if reply.get("id") == self._next_id:
                    if "error" in reply:
                        raise RuntimeError(f"{method}: {reply['error']}")
                    return reply["result"]
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._from_browser], [], [], left)[0]:
                raise TimeoutError(f"Chromium did not answer {method} in {TIMEOUT:.0f} s")
            chunk = os.read(self._from_browser, 1 << 20)
            if not chunk:
                raise RuntimeError(f"Chromium closed the pipe during {method} (exit {self.process.poll()})")
            self._buffer += chunk

    def evaluate(self, expression):
        result = self.call("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"in the page: {result['exceptionDetails']}")
        return result["result"]["value"]

    def open(self, path):
        """Loads a local file and waits until it and its images are loaded."""
        self.call("Page.navigate", url=pathlib.Path(path).resolve().as_uri())
        deadline = time.monotonic() + TIMEOUT
        while self.evaluate("document.readyState") != "complete" or self.evaluate("location.href") == "about:blank":
            if time.monotonic() > deadline:
                raise TimeoutError(f"{path} did not load in {TIMEOUT:.0f} s")
            time.sleep(0.1)

    def screenshot(self) -> np.ndarray:
        """The whole page (beyond the window too) as a BGR image."""
        data = self.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)["data"]
        return cv2.imdecode(np.frombuffer(base64.b64decode(data), np.uint8), cv2.IMREAD_COLOR)

    def close(self):
        for fd in (self._to_browser, self._from_browser):
            os.close(fd)
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)  # its own session: the browser and its helpers
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self._log.close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if CHROMIUM is None:
        pytest.fail("KERAS_SEG_REQUIRE_BROWSER=1 but no chromium, chromium-browser nor google-chrome on PATH")
    directory = tmp_path_factory.mktemp("chromium")
    chromium = Chromium(directory / "profile", directory / "chromium.log")
    yield chromium
    chromium.close()


@pytest.fixture(scope="module")
def two_runs(tiny_data, tmp_path_factory):  # noqa: F811
    """Two real 6-step runs of the tiny data (validated at steps 3 and 6), differing in learning rate."""
    root = tmp_path_factory.mktemp("runs")
    runs = []
    for name, rate in (("a", "0.001"), ("b", "0.01")):
        runs.append(str(root / name))
        Trainer(make_config(tiny_data, runs[-1], "--iters", "6", "--val-every", "3", "--no-export",
                            "--warmup-iters", "0", "--learning-rate", rate), log=lambda _: None).run()
    return runs


def non_blank(region) -> bool:
    """Something drawn: not one flat colour."""
    return region.size > 0 and int(region.max()) - int(region.min()) > 40


def check_laid_out(browser, path, headings, images, charts, keep=None):
    """The page at `path` in the browser: the `headings` in order, each with content of non-zero height drawn
    in the screenshot, `images` decoded images and `charts` SVG charts with marks, none of their horizontal
    labels over another, and nothing wider than the window."""
    browser.open(path)
    page = browser.evaluate(MEASURE)
    shot = browser.screenshot()
    if keep:
        cv2.imwrite(keep, shot)
    assert page["text"] > 200 and non_blank(shot), "the page is blank"
    assert [b["text"] for b in page["blocks"] if b["tag"] == "H2"] == headings
    for block in page["blocks"]:
        content = block["content"]
        assert content["height"] > 0, f"{block['tag']} {block['text']!r}: nothing laid out under it ({content})"
        band = shot[int(content["top"]):int(np.ceil(content["bottom"]))]
        assert non_blank(band), f"{block['tag']} {block['text']!r}: its region of the screenshot is blank"
    assert len(page["images"]) == images
    for image in page["images"]:
        assert image["complete"] and image["naturalWidth"] > 0 and image["naturalHeight"] > 0, (
            f"{image['alt']}: image not decoded ({image})")
        assert image["box"]["width"] > 0 and image["box"]["height"] > 0, image
        assert non_blank(shot[int(image["box"]["top"]):int(image["box"]["bottom"]),
                              int(image["box"]["left"]):int(image["box"]["right"])]), f"{image['alt']} drawn blank"
    assert len(page["charts"]) == charts
    for chart in page["charts"]:
        assert chart["box"]["width"] > 0 and chart["box"]["height"] > 0 and chart["marks"] > 0, chart["box"]
        texts = chart["texts"]
        for i, a in enumerate(texts):
            for b in texts[i + 1:]:
                apart = (a["right"] <= b["left"] + 1 or b["right"] <= a["left"] + 1
                         or a["bottom"] <= b["top"] + 1 or b["bottom"] <= a["top"] + 1)
                assert apart, f"chart labels drawn over each other: {a['text']!r} and {b['text']!r}"
    assert page["scrollWidth"] <= page["width"] and not page["overflowing"], (
        f"wider than the {page['width']}-px window: {page['overflowing']}")
    return page


RUN_SECTIONS = ["Did it converge?", "Which classes fail?", "Where does it go wrong in the image?",
                "Where did the time go?", "Configuration"]


@pytest.mark.slow  # trains two runs (20-60 s on CPU-E)
def test_a_run_report_is_laid_out_in_a_browser(browser, two_runs, tmp_path):
    run = two_runs[0]
    page = check_laid_out(browser, os.path.join(run, "report.html"), RUN_SECTIONS,
                          images=8, charts=3 + 1 + 1)  # 4 worst + 4 best; 3 curves, per-class bars, confusion
    assert [b["text"] for b in page["blocks"] if b["tag"] == "H3"] == [
        "Confused with what?", "The 4 worst val images", "The 4 best val images"]


@pytest.mark.slow  # trains two runs (20-60 s on CPU-E)
def test_a_comparison_page_is_laid_out_in_a_browser(browser, two_runs, tmp_path):
    out = str(tmp_path / "compare.html")
    report.write_comparison(two_runs, out, k=2)
    check_laid_out(browser, out, ["Learning curves", "Per-class IoU", "The same val images"],
                   images=4, charts=3 + 1)  # run a's 2 worst and 2 best; 3 curves, per-class bars


def test_the_layout_check_fails_on_a_page_that_is_broken(browser, tmp_path):
    """The checks above can fail: an empty section, an image that does not decode, overlapping chart labels and
    a block wider than the window are each caught (a page written by hand, no run needed)."""
    gradient = np.repeat(np.linspace(0, 255, 40, dtype=np.uint8)[None, :, None], 20, axis=0).repeat(3, axis=2)
    png = base64.b64encode(cv2.imencode(".png", gradient)[1].tobytes()).decode()
    chart = ('<svg width="300" height="60"><rect x="0" y="0" width="50" height="20" fill="red"/>'
             '<text x="10" y="30">{}</text><text x="{}" y="30">second label</text></svg>')
    good = (f"<h1>t</h1><h2>One</h2><p>{'words ' * 60}</p><h2>Two</h2>{chart.format('first', 150)}"
            f'<h2>Three</h2><figure><img alt="ok" src="data:image/png;base64,{png}"></figure>')
    broken = {
        "nothing laid out": good.replace("<h2>Two</h2>", "<h2>Two</h2><div></div><h2>Empty</h2>"),
        "not decoded": good.replace(png, png[:20]),
        "drawn over each other": good.replace(chart.format("first", 150), chart.format("first", 14)),
        "wider than": good.replace("<h2>Three</h2>", f'<h2>Three</h2><div style="width:{WINDOW[0] + 200}px">w</div>'),
    }
    path = tmp_path / "page.html"
    path.write_text(f"<!DOCTYPE html><html><body>{good}</body></html>")
    check_laid_out(browser, path, ["One", "Two", "Three"], images=1, charts=1)
    for why, body in broken.items():
        path.write_text(f"<!DOCTYPE html><html><body>{body}</body></html>")
        headings = ["One", "Two", "Empty", "Three"] if why == "nothing laid out" else ["One", "Two", "Three"]
        with pytest.raises(AssertionError, match=why):
            check_laid_out(browser, path, headings, images=1, charts=1)
