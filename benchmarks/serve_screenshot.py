"""The page of `scm serve` in a real browser: headless Chromium (the system's, e.g. Debian's `chromium` package)
driven by Playwright for Python; used by tests/test_serve_browser.py and, by hand, for the README's screenshot:

    python benchmarks/serve_screenshot.py --ckpt runs/demo/runs/scd --teacher demo/teacher --out demo/serve.png

`drive(url)` loads the page, waits for the first image, moves the seed slider and (when the model is
conditional) the class select, and checks after each move that a new image was shown whose pixels differ and
that the displayed timing is a number; it returns what it saw and, with `screenshot`, saves the page.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
PIXELS = """(sel) => { const img = document.querySelector(sel); const c = document.createElement('canvas');
  c.width = img.naturalWidth; c.height = img.naturalHeight; const g = c.getContext('2d'); g.drawImage(img, 0, 0);
  return c.toDataURL('image/png'); }"""


def browser_path() -> str | None:
    return next((p for p in map(shutil.which, BROWSERS) if p), None)


def _seq(page, sel: str) -> int:
    return int(page.get_attribute(sel, "data-seq") or 0)


def _wait_new_image(page, sel: str, after: int, timeout_s: float = 60) -> int:
    page.wait_for_function(f"() => Number(document.querySelector('{sel}').dataset.seq || 0) > {after}",
                           timeout=timeout_s * 1000)
    page.wait_for_function(f"() => document.querySelector('{sel}').complete", timeout=timeout_s * 1000)
    return _seq(page, sel)


def drive(url: str, screenshot: Path | None = None, teacher: bool = False, settle_s: float = 0.0) -> dict:
    """Load the page at `url`, move its controls, check each change; returns {'images', 'ms', 'seqs'}."""
    from playwright.sync_api import sync_playwright

    path = browser_path()
    if path is None:
        raise RuntimeError(f"no Chromium found (looked for {', '.join(BROWSERS)}): apt-get install chromium")
    seen = {"images": [], "ms": [], "seqs": []}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=path, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 860})
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(url)
            seq = _wait_new_image(page, "#student-img", 0)

            def record():
                seen["seqs"].append(seq)
                seen["images"].append(page.evaluate(PIXELS, "#student-img"))
                seen["ms"].append(page.inner_text("#student-ms").strip())

            record()
            page.fill("#seed-number", "7")  # the number box and the slider are one control
            page.dispatch_event("#seed-number", "input")
            seq = _wait_new_image(page, "#student-img", seq)
            record()
            page.eval_on_selector("#seed", "(e) => { e.value = 123; e.dispatchEvent(new Event('input')); }")
            seq = _wait_new_image(page, "#student-img", seq)
            record()
            if page.is_visible("#class"):
                options = page.eval_on_selector_all("#class option", "(os) => os.map(o => o.value)")
                page.select_option("#class", options[-1])
                seq = _wait_new_image(page, "#student-img", seq)
                record()
            if teacher:
                page.wait_for_function("() => document.querySelector('#teacher-img').complete && "
                                       "Number(document.querySelector('#teacher-img').dataset.seq || 0) > 0",
                                       timeout=120_000)
                seen["teacher_ms"] = page.inner_text("#teacher-ms").strip()
            if settle_s:
                time.sleep(settle_s)
            if screenshot is not None:
                screenshot.parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(screenshot))
            if errors:
                raise RuntimeError(f"the page raised: {errors}")
        finally:
            browser.close()
    for ms in seen["ms"]:
        if not re.fullmatch(r"\d+(\.\d+)?", ms):
            raise AssertionError(f"the displayed time {ms!r} is not a number")
    return seen


@contextlib.contextmanager
def serving(ckpt, teacher=None, port: int = 8765, extra=(), timeout_s: float = 120):
    """`scm serve` in a subprocess on 127.0.0.1:`port` (CPU), waited for until it answers: its URL."""
    cmd = [sys.executable, "-m", "scm", "serve", "--ckpt", str(ckpt), "--port", str(port), "--device", "cpu",
           *(["--teacher", str(teacher)] if teacher else []), *map(str, extra)]
    server = subprocess.Popen(cmd)
    try:
        url = f"http://127.0.0.1:{port}/"
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                urllib.request.urlopen(url + "api/info", timeout=2).read()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the server did not start: {' '.join(cmd)}") from None
                time.sleep(0.2)
        yield url
    finally:
        server.terminate()
        server.wait(30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--teacher", default=None)
    ap.add_argument("--out", type=Path, default=Path("demo/serve.png"))
    ap.add_argument("--port", type=int, default=8765)
    args = ap.parse_args()
    with serving(args.ckpt, args.teacher, args.port) as url:
        seen = drive(url, args.out, teacher=bool(args.teacher), settle_s=8.0)  # the teacher catches up
    print(f"{len(seen['images'])} images shown, times {seen['ms']} ms (teacher {seen.get('teacher_ms')}); "
          f"screenshot {args.out}")


if __name__ == "__main__":
    main()
