"""The page of `scm serve` in a real browser (headless Chromium driven by Playwright): it loads, the seed and
class controls change the image, and the displayed timing is a number. Run by `make test-browser` (which installs
what is missing); `make test` skips it, with the reason, when no browser or no Playwright is present."""

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
