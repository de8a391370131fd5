"""Open a prunekit report.html in headless Chromium: a full-page screenshot, and a check that every figure
loaded, decoded and shows.

    python scripts/report_screenshot.py runs/demo/report/report.html --out report.png

Two Chromium runs: the first loads a copy of the page with a small script added that measures every <img>
once the page has loaded (decoded or broken, its natural and displayed size, where it sits) and writes the
result into the DOM, which ``--dump-dom`` prints; the second screenshots the page as it is, as tall as the
first run measured it. The screenshot is then cropped at each figure: a figure that loaded but shows one
flat colour (blank, or hidden behind something) fails too.

Exit status 0 when every check passes, 1 with one line per problem otherwise, 2 when no Chromium is found
(Debian: ``apt-get install --no-install-recommends chromium``). ``check_report`` is the same as a function,
for tests.
"""
from __future__ import annotations

import argparse
import html
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
WIDTH = 1280          # CSS px of the window (the report's main column is 1100 px wide)
MAX_HEIGHT = 30_000   # the tallest screenshot taken (a long report is cut there, and said so)
MIN_SHOWN = (200, 100)  # a figure displayed smaller than this (w, h in CSS px) cannot be read
MAX_NATURAL = 5_000     # a figure wider or taller than this many pixels is a runaway figure

_PROBE = """<script>
window.addEventListener("load", () => {
  const doc = document.documentElement;
  const images = [...document.images].map((img) => {
    const r = img.getBoundingClientRect();
    const fig = img.closest("figure");
    return {id: fig ? fig.id : "", complete: img.complete, natural: [img.naturalWidth, img.naturalHeight],
            box: [r.left + window.scrollX, r.top + window.scrollY, r.width, r.height]};
  });
  const pre = document.createElement("pre");
  pre.id = "prunekit-probe";
  const wide = [...document.querySelectorAll(".scroll")].filter((d) => d.scrollWidth > d.clientWidth + 1)
    .map((d) => (d.querySelector("th") || d).textContent.slice(0, 40));
  pre.textContent = JSON.stringify({images: images, width: doc.clientWidth, scroll_width: doc.scrollWidth,
                                    height: doc.scrollHeight, wide_tables: wide});
  document.body.appendChild(pre);
});
</script>"""


def find_browser() -> Optional[str]:
    return next((path for path in map(shutil.which, BROWSERS) if path), None)


def _run(browser: str, *args: str, timeout: float) -> str:
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--mute-audio",
           "--no-first-run", "--disable-dev-shm-usage", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{Path(browser).name} failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
    return proc.stdout


def probe(page: Path, browser: str, timeout: float = 120) -> Dict[str, Any]:
    """What Chromium saw of every <img> of ``page`` once loaded (see _PROBE)."""
    text = page.read_text(encoding="utf-8")
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "probe.html"
        copy.write_text(text.replace("</body>", _PROBE + "</body>", 1), encoding="utf-8")
        dom = _run(browser, f"--window-size={WIDTH},1000", "--virtual-time-budget=20000", "--dump-dom",
                   copy.as_uri(), timeout=timeout)
    found = re.search(r'<pre id="prunekit-probe">(.*?)</pre>', dom, re.S)
    if not found:
        raise RuntimeError("the page did not finish loading in Chromium (no probe result in the DOM)")
    return json.loads(html.unescape(found.group(1)))


def screenshot(page: Path, out: Path, height: int, browser: str, timeout: float = 120) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    _run(browser, f"--window-size={WIDTH},{height}", "--virtual-time-budget=20000", f"--screenshot={out.resolve()}",
         page.resolve().as_uri(), timeout=timeout)
    if not out.is_file():
        raise RuntimeError(f"Chromium wrote no screenshot to {out}")
    return out


def _shown(shot: Any, box: List[float]) -> Optional[float]:
    """Standard deviation of the screenshot's pixels where a figure is displayed (None: outside the shot)."""
    x, y, w, h = (int(round(v)) for v in box)
    crop = shot[max(0, y):min(shot.shape[0], y + h), max(0, x):min(shot.shape[1], x + w), :3]
    return float(crop.std()) if crop.size and crop.shape[0] >= h // 2 else None


def check_report(page: Any, out: Any = None, browser: Optional[str] = None) -> Dict[str, Any]:
    """Probe and screenshot ``page`` (report.html); returns {"problems": [...], "images": n, "screenshot": path,
    "probe": {...}}. No problems means: every image decoded, has a sane natural size, is displayed readable
    and inside the window's width, shows more than one colour in the screenshot, and the page does not
    scroll sideways."""
    from matplotlib import image as mpimg

    page = Path(page)
    browser = browser or find_browser()
    if browser is None:
        raise FileNotFoundError("no Chromium found (Debian: apt-get install --no-install-recommends chromium)")
    seen = probe(page, browser)
    problems: List[str] = []
    images = seen["images"]
    if not images:
        problems.append("the page has no images")
    if seen["scroll_width"] > seen["width"] + 1:
        problems.append(f"the page scrolls sideways: {seen['scroll_width']} px wide in a {seen['width']} px window")
    height = min(MAX_HEIGHT, max(600, int(seen["height"])))
    out = Path(out) if out is not None else page.with_name(page.stem + "_screenshot.png")
    shot = mpimg.imread(screenshot(page, out, height, browser))
    for img in images:
        name = img["id"] or "an image"
        (nw, nh), (x, _, w, h) = img["natural"], img["box"]
        if not img["complete"] or nw == 0 or nh == 0:
            problems.append(f"{name}: broken image (not decoded)")
            continue
        if nw > MAX_NATURAL or nh > MAX_NATURAL:
            problems.append(f"{name}: {nw}×{nh} px is not a sane figure size")
        if w < MIN_SHOWN[0] or h < MIN_SHOWN[1]:
            problems.append(f"{name}: displayed at {w:.0f}×{h:.0f} CSS px, too small to read")
        if x < 0 or x + w > seen["width"] + 1:
            problems.append(f"{name}: displayed outside the window ({x:.0f}..{x + w:.0f} of {seen['width']} px)")
        spread = _shown(shot, img["box"])
        if spread is not None and spread < 0.02:
            problems.append(f"{name}: shows a single flat colour in the screenshot")
    for first in seen.get("wide_tables") or []:
        problems.append(f"note: a table wider than the page scrolls sideways (first header {first!r})")
    if seen["height"] > MAX_HEIGHT:
        problems.append(f"note: the screenshot stops at {MAX_HEIGHT} of {seen['height']} px")
    return {"problems": [p for p in problems if not p.startswith("note:")], "notes": [p for p in problems
            if p.startswith("note:")], "images": len(images), "screenshot": out, "probe": seen}


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("page", help="a report.html")
    p.add_argument("--out", help="the screenshot (default: <page>_screenshot.png beside the page)")
    p.add_argument("--browser", help="the Chromium binary (default: the first of chromium, google-chrome on PATH)")
    args = p.parse_args(argv)
    try:
        result = check_report(args.page, args.out, args.browser)
    except FileNotFoundError as e:
        print(e, file=sys.stderr)
        return 2
    for line in result["problems"] + result["notes"]:
        print(line)
    print(f"{result['images']} image(s) checked, {len(result['problems'])} problem(s); screenshot: "
          f"{result['screenshot']}")
    return 1 if result["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
