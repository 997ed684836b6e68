"""The page of `scm serve` in a real browser (headless Chromium driven by Playwright): it loads, the seed and
class controls change the image, and the displayed timing is a number; a video model's clip plays (an animated
GIF of all its frames, whose shown pixels change over time), an audio model's clips load in <audio> players.
Run by `make test-browser` (which installs what is missing); `make test` skips it, with the reason, when no
browser or no Playwright is present."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from serve_screenshot import browser_path, drive, serving

pytest.importorskip("starlette", reason="scm serve needs starlette and uvicorn: pip install scm[serve]")
pytest.importorskip("uvicorn", reason="scm serve needs starlette and uvicorn: pip install scm[serve]")
pytest.importorskip("playwright", reason="the browser test needs Playwright for Python: make test-browser")
if browser_path() is None:
    pytest.skip("no Chromium on this machine (apt-get install chromium): make test-browser", allow_module_level=True)

from test_serve import CLASSES, make_run, make_text_run


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_page_follows_its_controls(tmp_path):
    cond = ["conditional=true", f"net.label_dim={CLASSES}"]
    teacher = make_run(tmp_path / "teacher", "tiny-28-diffusion", cond)
    student = make_run(tmp_path / "scd", "tiny-28-scd", [*cond, "net.guidance_embed=true", "loss.guidance=1,2"],
                       teacher=str(teacher))
    with serving(student, teacher, _free_port(), ["--teacher-nfe", 5], timeout_s=60) as url:
        seen = drive(url, tmp_path / "page.png", teacher=True)
    assert (tmp_path / "page.png").stat().st_size > 1000
    assert len(seen["images"]) == 4, seen["seqs"]  # first image, two seed moves, one class change
    assert seen["seqs"] == sorted(set(seen["seqs"]))  # each step showed a new image ...
    assert all(a != b for a, b in zip(seen["images"], seen["images"][1:], strict=False))  # ... with other pixels
    assert all(float(ms) > 0 for ms in seen["ms"]) and float(seen["teacher_ms"]) > 0


def test_a_text_model_takes_a_typed_prompt(tmp_path):
    """A text model's page has a prompt box (at most MAX_PROMPT_CHARS characters, an example prompt to start
    with); typing another prompt shows a new image."""
    from playwright.sync_api import sync_playwright
    from serve_screenshot import PIXELS, _wait_new_image

    from scm.serve.models import MNIST_PROMPTS
    from scm.text import MAX_PROMPT_CHARS

    run = make_text_run(tmp_path / "text")
    with serving(run, None, _free_port(), timeout_s=60) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=browser_path(), args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page()
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(url)
            seq = _wait_new_image(page, "#student-img", 0)
            assert page.is_visible("#prompt") and not page.is_visible("#class")
            assert page.input_value("#prompt") == MNIST_PROMPTS[0]
            assert page.get_attribute("#prompt", "maxlength") == str(MAX_PROMPT_CHARS)
            first = page.evaluate(PIXELS, "#student-img")
            page.fill("#prompt", "a thin right-leaning digit 1")  # fill() fires the input event
            _wait_new_image(page, "#student-img", seq)
            assert page.evaluate(PIXELS, "#student-img") != first
            assert not errors, errors
        finally:
            browser.close()


def _launch(p):
    return p.chromium.launch(executable_path=browser_path(), args=["--no-sandbox", "--disable-gpu"])


def _watch(page) -> list[str]:
    """The page's uncaught errors and console errors (a media source the page's policy refuses is one), but the
    browser's own request for /favicon.ico (the server has none)."""
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(f"{m.text} ({m.location.get('url')})")
            if m.type == "error" and not m.location.get("url", "").endswith("/favicon.ico") else None)
    return errors


def test_a_video_model_plays_its_clip(tmp_path, monkeypatch):
    """The page of a video run shows its clip as an animated GIF of all 8 frames at the data's rate, and the
    pixels the <img> shows change while it plays; the seed still changes the clip."""
    import io
    import time
    import urllib.request

    from PIL import Image
    from playwright.sync_api import sync_playwright
    from serve_screenshot import _wait_new_image

    from scm.runs import RunDir

    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the server's warm-up: small networks on a shared machine
    run = make_run(tmp_path / "video", "video-tiny-8x32-sct", ["net.depth=1"])
    RunDir(run).write_media({"modality": "video", "fps": 5.0, "frames": 8, "stride": 8})
    with serving(run, None, _free_port(), timeout_s=120) as url, sync_playwright() as p:
        browser = _launch(p)
        try:
            page = browser.new_page()
            errors = _watch(page)
            gifs = []
            page.on("response", lambda r: gifs.append(r) if "/api/generate" in r.url and r.ok else None)
            page.goto(url)
            seq = _wait_new_image(page, "#student-img", 0)
            assert "8 frames of 32×32×1 at 5 fps" in page.inner_text("#student-desc")
            assert gifs[-1].headers["content-type"] == "image/gif"
            body = urllib.request.urlopen(gifs[-1].url, timeout=60).read()  # the same answer (the same seed);
            assert Image.open(io.BytesIO(body)).n_frames == 8                 # Chromium keeps no no-store body
            shown = set()
            for _ in range(15):  # 1.5 s: the 8 frames of 0.2 s each loop; what the page shows, painted
                shown.add(page.locator("#student-img").screenshot())
                time.sleep(0.1)
            assert len(shown) >= 3, "the clip does not play"
            page.fill("#seed-number", "9")
            page.dispatch_event("#seed-number", "input")
            _wait_new_image(page, "#student-img", seq)
            assert "seed=9" in gifs[-1].url and urllib.request.urlopen(gifs[-1].url, timeout=60).read() != body
            assert not errors, errors
        finally:
            browser.close()


def test_an_audio_model_has_a_player_per_clip(tmp_path, monkeypatch):
    """The page of an audio run shows its spectrogram and one <audio> player per clip that loads the WAV (1 s at
    16 kHz); asking for 4 clips gives 4 players."""
    from playwright.sync_api import sync_playwright
    from serve_screenshot import _wait_new_image

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    run = make_run(tmp_path / "audio", "audio-tiny-16k-sct", ["net.depth=1"])
    loaded = ("() => { const a = [...document.querySelectorAll('#student-audio audio')]; return a.length === {n} && "
              "a.every((e) => e.readyState >= 1 && Math.abs(e.duration - 1) < 0.01); }")
    with serving(run, None, _free_port(), timeout_s=120) as url, sync_playwright() as p:
        browser = _launch(p)
        try:
            page = browser.new_page()
            errors = _watch(page)
            page.goto(url)
            seq = _wait_new_image(page, "#student-img", 0)  # the spectrogram
            assert "16000 samples × 1 at 16000 Hz" in page.inner_text("#student-desc")
            page.wait_for_function(loaded.replace("{n}", "1"), timeout=30_000)
            assert page.evaluate("() => document.querySelector('#student-img').naturalWidth") > 100
            page.select_option("#batch", "4")
            _wait_new_image(page, "#student-img", seq)
            page.wait_for_function(loaded.replace("{n}", "4"), timeout=30_000)
            assert not errors, errors
        finally:
            browser.close()
