"""`scm serve`: the real server (uvicorn in a thread, and `scm serve` in a subprocess) on runs with fresh weights:
its page, its answers, its refusals, and one generation at a time per model with superseded requests dropped; a
text-to-image run takes prompts (checked, batched together)."""

import asyncio
import contextlib
import http.client
import importlib.util
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import cli

SERVE = all(importlib.util.find_spec(m) is not None for m in ("starlette", "uvicorn"))
needs_serve = pytest.mark.skipif(not SERVE, reason="starlette and uvicorn are not installed: pip install scm[serve]")
ROOT = Path(__file__).resolve().parents[1]
CLASSES = 3
THREADS = 1  # torch's intra-op threads of the test server's workers and of the reference computations


def make_run(path: Path, preset: str, overrides=(), **flags) -> Path:
    """A run directory with one checkpoint of fresh weights (the zero-initialised ones given small values, so
    that images depend on the noise): what `scm serve` loads, without training."""
    from scm.config import make_config, to_dict
    from scm.nets import build_net
    from scm.runs import RunDir, ema_key

    cfg = make_config(preset, None, list(overrides), data="shapes", out=str(path), **flags)
    run = RunDir(path)
    run.write_config(to_dict(cfg))
    torch.manual_seed(0)
    net = build_net(cfg.net, cfg.loss.sigma_d)
    with torch.no_grad():
        for p in net.parameters():
            if not p.any():
                p.fill_(1.0) if p.numel() == 1 else p.normal_(0, 0.05)
    ema = {ema_key(cfg.ema.stds[0], k): v for k, v in net.state_dict().items()}
    run.save(1, {"ema": ema}, {"step": 1}, keep=1)
    return path


def make_text_run(path: Path, method: str = "sct", overrides=(), *, dtype: str = "bfloat16", encoder=None,
                  **flags) -> Path:
    """A text-to-image run (dit-tiny-text-28, one block) with fresh weights, as `make_run`: its prompts are those of
    the builtin encoder (or of `encoder`, a `scm.text` encoder), stored as `dtype` (so prompts are rounded to it)."""
    from scm.config import make_config, to_dict
    from scm.nets import build_net
    from scm.runs import RunDir, ema_key
    from scm.text import BuiltinEncoder, TextConfig

    encoder = encoder or BuiltinEncoder(64, 16)
    cfg = make_config(f"dit-tiny-text-28-{method}", None, ["net.depth=1", f"net.text_dim={encoder.width}",
                                                           f"net.text_pooled_dim={encoder.pooled_width}",
                                                           *overrides], data="captions", out=str(path), **flags)
    cfg.text = TextConfig(dict(encoder.spec), encoder.max_tokens, encoder.width, encoder.pooled_width, dtype, 0.0)
    cfg.validate()
    run = RunDir(path)
    run.write_config(to_dict(cfg))
    torch.manual_seed(0)
    net = build_net(cfg.net, cfg.loss.sigma_d)
    with torch.no_grad():
        for p in net.parameters():  # the zero-initialised ones (the cross-attention's output too) made small
            if not p.any():
                p.fill_(1.0) if p.numel() == 1 else p.normal_(0, 0.05)
    run.save(1, {"ema": {ema_key(cfg.ema.stds[0], k): v for k, v in net.state_dict().items()}}, {"step": 1}, keep=1)
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    cond = ["conditional=true", f"net.label_dim={CLASSES}"]
    teacher = make_run(root / "teacher", "tiny-28-diffusion", cond)
    student = make_run(root / "scd", "tiny-28-scd", [*cond, "net.guidance_embed=true", "loss.guidance=1,2"],
                       teacher=str(teacher))
    sct = make_run(root / "sct", "tiny-28-sct")  # unconditional, no guidance input
    text = make_text_run(root / "text")  # prompts (the builtin encoder), no guidance input
    return {"teacher": teacher, "student": student, "sct": sct, "text": text}


@contextlib.contextmanager
def running(app, **server_options):
    """The app under uvicorn in a background thread, on a free port of 127.0.0.1: its base URL. `server_options`
    go to `make_server` (idle_timeout …)."""
    from scm.serve import bind, make_server, url_of

    sock = bind("127.0.0.1", 0)
    server = make_server(app, **server_options)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield url_of(sock).rstrip("/")
    finally:
        server.should_exit = True
        thread.join(10)


def served(runs, teacher_nfe=5):
    from scm.runs import load_run
    from scm.serve import ServedModel, check_pair

    student_run, teacher_run = load_run(runs["student"]), load_run(runs["teacher"])
    check_pair(student_run, teacher_run)
    return ServedModel(student_run, "student"), ServedModel(teacher_run, "teacher", steps=(teacher_nfe,))


@pytest.fixture(scope="module")
def server(runs):
    from scm.serve import create_app

    student, teacher = served(runs)
    threads = torch.get_num_threads()
    # warms up: one generation per model and batch size before serving; one torch thread per model, as the
    # references below (`reference_png`), so that the same arithmetic gives the same bytes
    app = create_app(student, teacher, threads=THREADS)
    with running(app) as url:
        yield url
    torch.set_num_threads(threads)  # the workers' setting is torch's default for new threads: undone


@pytest.fixture(scope="module")
def plain_server(runs):
    """An unconditional consistency model without guidance, alone."""
    from scm.runs import load_run
    from scm.serve import ServedModel, create_app

    with running(create_app(ServedModel(load_run(runs["sct"]), "student"), warm_up=False)) as url:
        yield url


@pytest.fixture(scope="module")
def text_server(runs):
    """A text-to-image consistency model, alone."""
    from scm.runs import load_run
    from scm.serve import ServedModel, create_app

    threads = torch.get_num_threads()
    with running(create_app(ServedModel(load_run(runs["text"]), "student"), warm_up=False, threads=THREADS)) as url:
        yield url
    torch.set_num_threads(threads)


def get(url: str, path: str, timeout: float = 60, host: str | None = None):
    """(status, headers, body) of GET url+path (with this Host header instead of url's)."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"Host": host} if host else {})
        r = conn.getresponse()
        return r.status, dict(r.getheaders()), r.read()
    finally:
        conn.close()


def png(body: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(body))
    img.load()
    return img


def reference_png(run_dir, n_images, sampler, **kw) -> bytes:
    """What the server must answer, computed here from a separately loaded copy of the run."""
    from scm.generate import generate
    from scm.images import encode_png, grid, to_uint8
    from scm.runs import load_run

    def compute():
        torch.set_num_threads(THREADS)
        images, _ = generate(load_run(run_dir), n_images, sampler, batch=n_images, progress=False, **kw)
        return encode_png(grid(images) if n_images > 1 else to_uint8(images)[0])

    threads = torch.get_num_threads()
    try:
        with ThreadPoolExecutor(1) as pool:
            return pool.submit(compute).result()
    finally:
        torch.set_num_threads(threads)


# -- the page and the model description ---------------------------------------------------------------------------
@needs_serve
def test_info_describes_both_models(server):
    status, headers, body = get(server, "/api/info")
    assert status == 200 and headers["content-type"].startswith("application/json")
    info = json.loads(body)
    s, t = info["student"], info["teacher"]
    assert (s["method"], s["steps_kind"], s["steps"], s["default_steps"]) == ("scd", "steps", [1, 2, 4], 2)
    assert (s["height"], s["width"], s["channels"], s["classes"], s["class_names"]) == (28, 28, 1, 3, ["0", "1", "2"])
    assert s["guidance"] is True and s["default_guidance"] == 1.0 and s["batches"] == [1, 4, 16]
    assert (t["method"], t["steps_kind"], t["steps"], t["guidance"]) == ("diffusion", "nfe", [5], True)
    assert info["seed_max"] == 2**31 - 1


@needs_serve
def test_page_and_its_files_only(server):
    status, headers, body = get(server, "/")
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in headers["content-security-policy"]
    page = body.decode()
    for element in ("seed", "seed-number", "class", "steps", "guidance", "batch", "student-img", "student-ms",
                    "student-ips", "teacher-img", "teacher-ms"):
        assert f'id="{element}"' in page, element
    assert not re.search(r"(src|href)=\"(https?:)?//", page)  # nothing fetched from elsewhere
    for name, kind in (("page.js", "javascript"), ("page.css", "text/css")):
        status, headers, body = get(server, f"/static/{name}")
        assert status == 200 and kind in headers["content-type"] and body
        assert b"http://" not in body and b"https://" not in body
    for path in ("/static/../pyproject.toml", "/static/app.py", "/static/%2e%2e/models.py", "/etc/passwd",
                 "/api/nothing", "/api/generate/../../config.json"):
        status, _, body = get(server, path)
        assert status == 404 and json.loads(body)["error"] == "not found", path
    parts = urlsplit(server)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    conn.request("POST", "/api/generate?seed=1", body=b"{}")
    r = conn.getresponse()
    assert r.status == 405 and "error" in json.loads(r.read())
    conn.close()


# -- generation ----------------------------------------------------------------------------------------------------
@needs_serve
def test_generate_png_sizes_determinism_and_timings(server, runs):
    from scm.generate import Sampler

    sizes = {1: (28, 28), 4: (2 * 29 + 1, 2 * 29 + 1), 16: (4 * 29 + 1, 4 * 29 + 1)}
    for batch, size in sizes.items():
        status, headers, body = get(server, f"/api/generate?seed=3&batch={batch}")
        assert status == 200 and headers["content-type"] == "image/png"
        assert png(body).size == size and png(body).mode == "L"
        assert headers["x-images"] == str(batch) and headers["x-nfe"] == "2" and headers["x-steps"] == "2"
        ms, per_image = float(headers["x-generation-ms"]), float(headers["x-ms-per-image"])
        assert ms > 0 and per_image == pytest.approx(ms / batch, rel=1e-2, abs=2e-3)
        assert float(headers["x-images-per-second"]) == pytest.approx(1000 / per_image, rel=0.05)
        assert float(headers["x-server-ms"]) >= ms * 0.99
    a = get(server, "/api/generate?seed=11&steps=1&class=2&guidance=1.5")[2]
    b = get(server, "/api/generate?seed=11&steps=1&class=2&guidance=1.5")[2]
    c = get(server, "/api/generate?seed=12&steps=1&class=2&guidance=1.5")[2]
    assert a == b and a != c
    # exactly what `generate` gives for the same settings (image i from (seed, i), as `scm sample`)
    assert a == reference_png(runs["student"], 1, Sampler(steps=1), seed=11, class_label=2, guidance=1.5)
    grid4 = get(server, "/api/generate?seed=5&steps=4&batch=4")[2]
    assert grid4 == reference_png(runs["student"], 4, Sampler(steps=4), seed=5, guidance=1.0)


@needs_serve
def test_teacher_draws_the_same_noise(server, runs):
    from scm.generate import Sampler

    status, headers, body = get(server, "/api/generate?model=teacher&seed=7&class=1&guidance=2")
    assert status == 200 and headers["x-model"] == "teacher" and headers["x-nfe"] == "5"
    assert body == reference_png(runs["teacher"], 1, Sampler(nfe=5), seed=7, class_label=1, guidance=2.0)
    unguided = get(server, "/api/generate?model=teacher&seed=7&class=1&batch=4")[2]
    assert unguided == reference_png(runs["teacher"], 4, Sampler(nfe=5), seed=7, class_label=1)
    student = get(server, "/api/generate?model=student&seed=7&class=1&guidance=2")[2]
    assert student == reference_png(runs["student"], 1, Sampler(steps=2), seed=7, class_label=1, guidance=2.0)
    assert get(server, "/api/generate?model=teacher&steps=35")[0] == 400  # the teacher runs at its one NFE


BAD = [
    ("seed=-1", "seed"), ("seed=abc", "seed"), ("seed=2147483648", "seed"), ("seed=1.5", "seed"), ("seed=", "seed"),
    ("seed=%201", "seed"), ("steps=3", "steps"), ("steps=0", "steps"), ("batch=5", "batch"), ("batch=64", "batch"),
    ("class=3", "class"), ("class=-1", "class"), ("guidance=0", "guidance"), ("guidance=10.5", "guidance"),
    ("guidance=nan", "guidance"), ("guidance=inf", "guidance"), ("guidance=1e1", "guidance"),
    ("model=student2", "model"), ("client=a%20b", "client"), ("client=" + "x" * 65, "client"),
    ("ckpt=/etc/passwd", "ckpt"), ("path=../../demo/teacher", "path"), ("seed=1&seed=2", "seed"),
    ("model=teacher&steps=4", "steps"),
]


@needs_serve
@pytest.mark.parametrize(("query", "parameter"), BAD)
def test_bad_parameters_are_400_naming_the_parameter(server, query, parameter):
    status, headers, body = get(server, f"/api/generate?{query}")
    assert status == 400 and headers["content-type"].startswith("application/json"), (query, body)
    answer = json.loads(body)
    assert answer["parameter"] == parameter and answer["error"].startswith(f"{parameter}="), answer
    assert b"root:" not in body  # unknown parameters (file paths included) are refused, never read


@needs_serve
def test_model_without_classes_or_guidance_refuses_them(plain_server):
    info = json.loads(get(plain_server, "/api/info")[2])
    assert info["teacher"] is None and info["student"]["classes"] == 0 and info["student"]["guidance"] is False
    for query, parameter in (("class=0", "class"), ("guidance=1", "guidance"), ("model=teacher", "model")):
        status, _, body = get(plain_server, f"/api/generate?{query}")
        assert status == 400 and json.loads(body)["parameter"] == parameter, body
    assert "no teacher" in json.loads(get(plain_server, "/api/generate?model=teacher")[2])["error"]
    status, _, body = get(plain_server, "/api/generate?seed=1&steps=1&batch=16")
    assert status == 200 and png(body).size == (117, 117)
    status, _, body = get(plain_server, "/api/generate?prompt=a+thick+seven")
    answer = json.loads(body)
    assert status == 400 and answer["parameter"] == "prompt" and "takes no prompt" in answer["error"]
    assert info["student"]["conditioning"] == "none" and info["student"]["example_prompts"] == []


# -- prompts: a text-to-image model --------------------------------------------------------------------------------
@needs_serve
def test_text_model_generates_from_prompts(text_server, runs):
    """/api/info says the model takes prompts (and offers examples); an image is exactly `generate`'s for the same
    prompt and seed (URL-encoded UTF-8, the empty prompt too), and the prompt changes it."""
    from urllib.parse import quote

    from scm.generate import Sampler
    from scm.serve.models import MNIST_PROMPTS
    from scm.text import MAX_PROMPT_CHARS

    s = json.loads(get(text_server, "/api/info")[2])["student"]
    assert (s["conditioning"], s["prompt_max_chars"], s["classes"], s["guidance"]) == ("text", MAX_PROMPT_CHARS, 0,
                                                                                        False)
    assert s["example_prompts"] == list(MNIST_PROMPTS)  # the run recorded no sample-grid prompts
    for prompt, batch in (("a thick seven", 1), ("ein dünner Strich ✓", 4), ("", 1)):
        status, headers, body = get(text_server, f"/api/generate?seed=3&batch={batch}&prompt={quote(prompt)}")
        assert status == 200 and headers["content-type"] == "image/png", body
        assert body == reference_png(runs["text"], batch, Sampler(steps=2), seed=3, prompt=prompt), prompt
    other = get(text_server, "/api/generate?seed=3&prompt=a+thin+one")[2]
    assert other != get(text_server, "/api/generate?seed=3&prompt=a+thick+seven")[2]
    longest = quote("ü" * MAX_PROMPT_CHARS)  # 12,000 characters of request line: accepted (16 KiB would not be)
    assert get(text_server, f"/api/generate?steps=1&prompt={longest}")[0] == 200


@needs_serve
@pytest.mark.parametrize("query, parameter, needle", [
    ("seed=1", "prompt", "give a prompt"), ("prompt=a%00b", "prompt", "NUL"),
    ("prompt=" + "x" * 2001, "prompt", "at most 2000"), ("prompt=a&prompt=b", "prompt", "more than once"),
    ("prompt=a&class=1", "class", "class"), ("prompt=a&guidance=2", "guidance", "no guidance")])
def test_text_model_refuses_bad_prompts(text_server, query, parameter, needle):
    status, _, body = get(text_server, f"/api/generate?{query}")
    answer = json.loads(body)
    assert status == 400 and answer["parameter"] == parameter, answer
    assert needle in answer["error"] and len(answer["error"]) < 300, answer


def test_requests_with_different_prompts_share_a_call(runs, tmp_path):
    """Prompts, like seeds, may differ within a joint call: each request gets what it gets alone. The examples
    offered are the run's recorded sample-grid prompts where there are some; a teacher must share the prompts."""
    import shutil

    from scm.errors import RunError
    from scm.runs import load_run
    from scm.serve import check_pair
    from scm.serve.models import Query, ServedModel

    model = ServedModel(load_run(runs["text"]), "student")
    queries = [Query("student", None, 3, 2, None, None, 1, "a thick seven"),
               Query("student", None, 3, 2, None, None, 4, "a thin one"),
               Query("student", None, 3, 2, None, None, 1, "")]
    together = model.generate_many(queries)
    for q, joint in zip(queries, together, strict=True):
        a = np.asarray(Image.open(io.BytesIO(model.generate(q).png)), dtype=int)
        b = np.asarray(Image.open(io.BytesIO(joint.png)), dtype=int)
        assert a.shape == b.shape and np.abs(a - b).max() <= 1 and joint.batched == 3
    assert not np.array_equal(np.asarray(Image.open(io.BytesIO(together[0].png))),
                              np.asarray(Image.open(io.BytesIO(together[2].png))))
    recorded = tmp_path / "recorded"
    shutil.copytree(runs["text"], recorded)
    (recorded / "samples").mkdir(exist_ok=True)
    (recorded / "samples" / "prompts.txt").write_text("000000.png\ta thin one\n000001.png\tseven\n"
                                                     "000002.png\ta thin one\n", encoding="utf-8")
    assert ServedModel(load_run(recorded), "student").describe()["example_prompts"] == ["a thin one", "seven"]
    unconditional_teacher = make_run(tmp_path / "teacher", "tiny-28-diffusion")
    with pytest.raises(RunError, match="prompts"):
        check_pair(load_run(runs["text"]), load_run(unconditional_teacher))


# -- robustness: disconnects, one generation at a time, superseded requests -----------------------------------------
@needs_serve
def test_clients_that_leave_do_not_break_the_server(server):
    host, port = urlsplit(server).hostname, urlsplit(server).port
    before = json.loads(get(server, "/api/stats")[2])["teacher"]
    for request in (b"GET /api/generate?model=teacher&batch=16&seed=1 HTTP/1.1\r\nHost: x\r\n\r\n",  # then leaves
                    b"GET /api/generate?model=teacher&batch=16&seed=2 HTTP/1.1\r\nHost: x\r\n\r\n",  # queued, leaves
                    b"GET /api/generate?seed=1 HTTP/1.1\r\nHost",  # a request cut in the middle
                    b"\x16\x03\x01garbage\r\n\r\n"):  # not HTTP at all
        with socket.create_connection((host, port), timeout=10) as s:
            s.sendall(request)
            time.sleep(0.05)
    status, _, body = get(server, "/api/generate?seed=4&batch=4")
    assert status == 200 and png(body).size == (59, 59)
    status, _, body = get(server, "/api/generate?model=teacher&seed=4")
    assert status == 200 and png(body).size == (28, 28)
    after = json.loads(get(server, "/api/stats")[2])["teacher"]
    assert after["requests"] - before["requests"] == 3 and after["failed"] == before["failed"]
    assert after["waiting"] == 0 and not after["running"]


@needs_serve
def test_superseded_requests_are_dropped_over_http(server):
    """One page (one client id) asks the teacher for four grids in a row: the first is generated, the ones
    replaced while they waited are answered 409 at once, the newest is generated."""
    before = json.loads(get(server, "/api/stats")[2])["teacher"]
    results = {}

    def ask(i):
        results[i] = get(server, f"/api/generate?model=teacher&client=page-1&batch=16&guidance=3&seed={100 + i}")

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
        time.sleep(0.03)
    for t in threads:
        t.join(60)
    statuses = [results[i][0] for i in range(4)]
    after = json.loads(get(server, "/api/stats")[2])["teacher"]
    assert set(statuses) <= {200, 409} and statuses[-1] == 200 and 409 in statuses, statuses
    assert after["generated"] - before["generated"] == statuses.count(200) < 4
    assert after["superseded"] - before["superseded"] == statuses.count(409)
    answer = json.loads(results[statuses.index(409)][2])
    assert answer["superseded"] is True and "newer request" in answer["error"]
    assert png(results[3][2]).size == (117, 117) and results[3][1]["x-seed"] == "103"
    # requests without a client id, or from other clients, never supersede each other
    others = {}
    threads = [threading.Thread(target=lambda i=i: others.__setitem__(i, get(
        server, f"/api/generate?model=teacher&client=page-{i}&seed={i}")[0])) for i in range(2, 5)]
    threads.append(threading.Thread(target=lambda: others.__setitem__("none", get(server, "/api/generate?seed=9")[0])))
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert set(others.values()) == {200}


def test_worker_latest_wins_one_at_a_time():
    """The worker itself, with jobs it cannot tell from generations: one runs at a time; a newer job of the same
    client replaces the waiting one in its place (answered SUPERSEDED at once); other clients keep theirs; a job
    whose client left is skipped; over `max_waiting` waiting jobs, new ones are refused."""
    from scm.serve.app import GONE, SUPERSEDED, Worker
    from scm.serve.models import Generated

    class Model:
        name = "fake"

    async def scenario():
        worker = Worker(Model(), max_waiting=3)
        release, order, running = threading.Event(), [], []

        def job(tag, wait=False):
            def run():
                running.append(tag)
                assert len(running) == 1, running  # never two at once
                if wait:
                    release.wait(10)
                order.append(tag)
                running.remove(tag)
                return Generated(b"", 1, 0.0, 1, 1, 1)
            return run

        async def present():
            return False

        async def left():
            return True

        first = worker.submit("a", job("a1", wait=True), present)
        await asyncio.sleep(0.05)  # a1 is generating
        b = worker.submit("b", job("b1"), present)
        a2 = worker.submit("a", job("a2"), present)
        gone = worker.submit("c", job("c1"), left)
        a3 = worker.submit("a", job("a3"), present)  # replaces a2 in place: ahead of c
        assert a2.done() and a2.result() == SUPERSEDED and not b.done()
        assert worker.submit("d", job("d1"), present) is None  # b, a3, c1 wait: full
        release.set()
        results = await asyncio.gather(first, b, a3, gone)
        assert order == ["a1", "b1", "a3"] and results[3] == GONE
        assert all(isinstance(r, Generated) for r in results[:3])
        assert worker.describe() == {"requests": 6, "generated": 3, "superseded": 1, "gone": 1, "busy": 1,
                                          "failed": 0, "images": 3, "batches": 3, "waiting": 0, "running": False}
        failing = worker.submit("e", lambda: 1 / 0, present)
        with pytest.raises(ZeroDivisionError):
            await failing
        assert worker.stats["failed"] == 1 and isinstance(await worker.submit("e", job("e2"), present), Generated)
        await worker.close()

    asyncio.run(scenario())


# -- the command --------------------------------------------------------------------------------------------------
@needs_serve
def test_scm_serve_command(runs):
    """`scm serve` in its own process on a free port: it says where, serves the page and both models."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    cmd = [sys.executable, "-m", "scm", "serve", "--ckpt", str(runs["student"]), "--teacher", str(runs["teacher"]),
           "--teacher-nfe", "3", "--port", "0", "--device", "cpu"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    try:
        line = proc.stderr.readline()
        match = re.search(r"at (http://127\.0\.0\.1:\d+)/", line)
        assert match, line
        url = match.group(1)
        info = json.loads(get(url, "/api/info")[2])
        assert info["teacher"]["steps"] == [3] and info["student"]["steps"] == [1, 2, 4]
        status, headers, body = get(url, "/api/generate?model=teacher&seed=1&class=0")
        assert status == 200 and headers["x-nfe"] == "3" and png(body).size == (28, 28)
        assert get(url, "/")[0] == 200
        # on 127.0.0.1 it answers to the loopback names only: a site pointing its own name here (DNS rebinding) is
        # refused before reaching the app
        port = urlsplit(url).port
        for name in (f"localhost:{port}", f"[::1]:{port}", "127.0.0.1"):
            assert get(url, "/api/info", host=name)[0] == 200, name
        status, _, body = get(url, "/api/generate?model=teacher&seed=1&class=0", host=f"evil.example:{port}")
        assert status == 400 and "evil.example" in json.loads(body)["error"]
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, proc.stderr.read()


@needs_serve
def test_scm_serve_refuses_bad_settings(runs, tmp_path):
    s, t, sct = (str(runs[k]) for k in ("student", "teacher", "sct"))
    code, text = cli("serve", "--ckpt", s, "--teacher", sct, "--port", 0)
    assert code == 2 and "--teacher" in text and "diffusion" in text, text
    code, text = cli("serve", "--ckpt", s, "--teacher", t, "--teacher-nfe", 4, "--port", 0)
    assert code == 2 and "--teacher-nfe" in text and "odd" in text, text
    code, text = cli("serve", "--ckpt", sct, "--teacher", t, "--port", 0)  # unconditional vs 3 classes
    assert code == 2 and "--teacher" in text and "classes" in text, text
    code, text = cli("serve", "--ckpt", tmp_path / "nothing", "--port", 0)
    assert code == 2 and "no such run directory" in text, text
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        code, text = cli("serve", "--ckpt", s, "--port", taken.getsockname()[1])
    assert code == 2 and "cannot listen" in text, text


def test_host_names_and_the_default_allowed_hosts():
    from scm.serve.app import default_allowed_hosts, host_of

    assert [host_of(h) for h in ("LocalHost:8000", "[::1]:80", "[::1]", "127.0.0.1", "::1", "")] == \
        ["localhost", "::1", "::1", "127.0.0.1", "::1", ""]
    assert set(default_allowed_hosts("127.0.0.1")) == {"localhost", "127.0.0.1", "::1"}
    assert set(default_allowed_hosts("127.0.0.2")) == {"localhost", "127.0.0.1", "::1", "127.0.0.2"}
    assert set(default_allowed_hosts("::1")) == set(default_allowed_hosts("localhost")) == {"localhost", "127.0.0.1",
                                                                                            "::1"}
    assert default_allowed_hosts("0.0.0.0") is None and default_allowed_hosts("192.168.1.5") is None


def test_scm_serve_without_starlette_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "starlette", None)  # `import starlette` now fails, as when not installed
    code, text = cli("serve", "--ckpt", tmp_path)
    assert code != 0 and "pip install scm[serve]" in text, text


def test_worker_batches_the_waiting_requests_of_one_group():
    """Requests that wait together with the same sampler settings (group) go to the model in one call, in queue
    order, up to `max_batch` images; other groups wait for their own call."""
    from scm.serve.app import Worker
    from scm.serve.models import Generated

    class Model:
        name = "fake"

    async def scenario():
        calls, release = [], threading.Event()

        def run_batch(payloads):
            calls.append(list(payloads))
            if payloads[0] == "x":
                release.wait(10)
            return [Generated(b"", 1, 0.0, 1, 1, 1, len(payloads)) for _ in payloads]

        async def present():
            return False

        worker = Worker(Model(), run_batch=run_batch, max_batch=3)
        first = worker.submit("a", "x", present, group="g")
        await asyncio.sleep(0.05)  # x is generating; the others queue behind it
        rest = [worker.submit(k, k, present, group="h" if k == "o" else "g") for k in ("b", "c", "o", "d", "e")]
        release.set()
        results = await asyncio.gather(first, *rest)
        assert calls == [["x"], ["b", "c", "d"], ["o"], ["e"]]
        assert [r.batched for r in results] == [1, 3, 3, 1, 3, 1]
        assert worker.stats["batches"] == 4 and worker.stats["generated"] == 6
        await worker.close()

    asyncio.run(scenario())


def test_generate_many_equals_each_request_alone(runs):
    """A joint call gives each request the images it gets alone (seeds and classes differ within the batch)."""
    from scm.runs import load_run
    from scm.serve.models import Query, ServedModel

    model = ServedModel(load_run(runs["student"]), "student")
    queries = [Query("student", None, 3, 2, 1, 1.5, 1), Query("student", None, 9, 2, None, 1.5, 4),
               Query("student", None, 3, 2, 2, 1.5, 1)]
    together = model.generate_many(queries)
    for q, joint in zip(queries, together, strict=True):
        alone = model.generate(q)
        a = np.asarray(Image.open(io.BytesIO(alone.png)), dtype=int)
        b = np.asarray(Image.open(io.BytesIO(joint.png)), dtype=int)
        # uint8 images: a batch's different float rounding may move a pixel across a quantisation step, no more
        assert a.shape == b.shape and np.abs(a - b).max() <= 1 and joint.batched == 3
    with pytest.raises(ValueError, match="share steps and guidance"):
        model.generate_many([queries[0], Query("student", None, 3, 1, 1, 1.5, 1)])
    # --t-mid: another intermediate time for 2+ steps, told by /api/info; a diffusion run refuses one
    shifted = ServedModel(model.run, "student", t_mid=0.7)
    assert shifted.describe()["t_mid"] == 0.7 and model.describe()["t_mid"] == model.run.cfg.t_mid
    assert shifted.sampler(2).times(model.run)[1] == 0.7 and shifted.sampler(4).times(model.run)[1] == 0.7
    assert not np.array_equal(np.asarray(Image.open(io.BytesIO(shifted.generate(queries[0]).png))),
                              np.asarray(Image.open(io.BytesIO(model.generate(queries[0]).png))))
    from scm.errors import SamplerError

    with pytest.raises(SamplerError, match="t_mid"):
        ServedModel(load_run(runs["teacher"]), "teacher", steps=(5,), t_mid=0.7)


def test_a_captured_model_pads_the_joint_batch_and_gives_the_eager_images(runs):
    """--captured: one compiled graph per (batch, steps), the joint batch padded to a power of two (6 images → 8);
    warm_up captures the request sizes before the first request, and with the server's largest joint batch every
    padded size up to it, so that no joint batch is captured on first use; a new guidance scale is no new graph;
    the images are the eager model's. A diffusion run is not captured."""
    import torch._dynamo

    from scm.runs import load_run
    from scm.serve.models import Query, ServedModel, captured_batch

    assert [captured_batch(n) for n in (1, 2, 3, 4, 5, 16, 17, 64)] == [1, 2, 4, 4, 8, 16, 32, 64]
    run = load_run(runs["student"])
    eager, captured = ServedModel(run, "student"), ServedModel(run, "student", batches=(1, 4), captured=True)
    assert captured.describe()["captured"] and not eager.describe()["captured"]
    assert not ServedModel(load_run(runs["teacher"]), "teacher", steps=(5,), captured=True).captured
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    captured.warm_up()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2  # batches 1 and 4 at the default 2 steps
    captured.warm_up(max_joint=6)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 4  # + the joint sizes 2 and 8 (1 and 4 had theirs)
    queries = [Query("student", None, 3, 2, 1, 1.5, 1), Query("student", None, 9, 2, None, 1.5, 4),
               Query("student", None, 5, 2, 2, 1.5, 1)]
    for a, b in zip(eager.generate_many(queries), captured.generate_many(queries), strict=True):
        x, y = (np.asarray(Image.open(io.BytesIO(g.png)), dtype=int) for g in (a, b))
        # another batch (8 rows, not 6) may round a pixel across one quantisation step, no more
        assert x.shape == y.shape and np.abs(x - y).max() <= 1 and b.batched == 3
    breaks = {k: dict(torch._dynamo.utils.counters[k]) for k in ("graph_break", "unimplemented")}
    assert not any(breaks.values()), breaks
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 4  # the padded batch of 8 was captured already
    # another guidance scale is an input of the same graph (a Python float would be compiled in: a graph per scale)
    a, b = (m.generate_many([Query("student", None, 4, 2, 1, 1.2, 4)])[0] for m in (eager, captured))
    x, y = (np.asarray(Image.open(io.BytesIO(g.png)), dtype=int) for g in (a, b))
    assert np.abs(x - y).max() <= 1 and torch._dynamo.utils.counters["stats"]["unique_graphs"] == 4
    torch._dynamo.reset()
