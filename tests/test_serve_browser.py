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

from test_serve import CLASSES, make_run


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
