"""`scm serve` against hostile or careless clients, on a real server (uvicorn in a thread): HEAD never generates,
idle and half-sent connections are closed after a bounded time, error messages never echo more than a short
prefix of what they were sent; and what /api/info says a model takes (its default NFE, its guidance range) is what
the server does."""

import asyncio
import http.client
import json
import math
import select
import socket
import time
from urllib.parse import urlsplit

import pytest
import torch
from test_serve import CLASSES, get, make_run, needs_serve, running

IDLE = 1.0  # the test servers' idle timeout (seconds): short, so that the tests are quick
SLACK = 2.0  # what a loaded 2-core machine may add to it
ALLOWED = ("127.0.0.1", "localhost")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-reliability")
    cond = ["conditional=true", f"net.label_dim={CLASSES}"]
    teacher = make_run(root / "teacher", "tiny-28-diffusion", cond)
    student = make_run(root / "scd", "tiny-28-scd", [*cond, "net.guidance_embed=true", "loss.guidance=1,2"],
                       teacher=str(teacher))
    return {"teacher": teacher, "student": student}


@pytest.fixture(scope="module")
def models(runs):
    from scm.runs import load_run
    from scm.serve import ServedModel

    return {"student": ServedModel(load_run(runs["student"]), "student"),
            "teacher": ServedModel(load_run(runs["teacher"]), "teacher", steps=(5,))}


@pytest.fixture(scope="module")
def server(models):
    """A student and its teacher, answering to ALLOWED only, closing connections idle for IDLE seconds."""
    from scm.serve import create_app

    threads = torch.get_num_threads()
    app = create_app(models["student"], models["teacher"], warm_up=False, threads=1, allowed_hosts=ALLOWED)
    with running(app, idle_timeout=IDLE) as url:
        yield url
    torch.set_num_threads(threads)


def address(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname, parts.port


def request(url: str, method: str, path: str, headers=None):
    """(status, headers, body) of one request of any method."""
    conn = http.client.HTTPConnection(*address(url), timeout=60)
    try:
        conn.request(method, path, headers=headers or {})
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def stats(url: str) -> dict:
    return json.loads(get(url, "/api/stats")[2])


# -- 1. HEAD --------------------------------------------------------------------------------------------------------
@needs_serve
def test_head_on_generate_is_refused_without_generating(server):
    before = stats(server)
    for query in ("seed=1", "model=teacher&seed=2&batch=16", "seed=abc"):
        status, headers, body = request(server, "HEAD", f"/api/generate?{query}")
        assert (status, headers["allow"], body) == (405, "GET", b""), (query, headers)
    assert stats(server) == before  # not queued, not generated: the workers never saw them
    # other methods are told the same
    status, headers, body = request(server, "POST", "/api/generate?seed=1")
    assert status == 405 and headers["allow"] == "GET" and "error" in json.loads(body)


@needs_serve
def test_head_on_the_page_and_its_files_is_get_without_body(server):
    for path in ("/", "/static/page.js", "/static/page.css", "/api/info"):
        status, headers, body = request(server, "HEAD", path)
        get_status, get_headers, get_body = get(server, path)
        assert (status, body) == (200, b"") and get_status == 200, path
        assert headers["content-type"] == get_headers["content-type"], path
        assert int(headers["content-length"]) == len(get_body), path
    status, headers, _ = request(server, "POST", "/")
    assert status == 405 and set(headers["allow"].split(", ")) == {"GET", "HEAD"}


# -- 2. idle and half-sent connections -------------------------------------------------------------------------------
def seconds_until_closed(sock: socket.socket, trickle: bytes = b"", every: float = 0.2,
                         limit: float = IDLE + 10) -> float:
    """Seconds from now until the server closes `sock` (inf: not within `limit`), sending one byte of `trickle`
    every `every` seconds meanwhile (a client that is slow on purpose). Whatever the server answers is read."""
    start, sent = time.monotonic(), 0
    while time.monotonic() - start < limit:
        if sent < len(trickle):
            try:
                sock.sendall(trickle[sent:sent + 1])
            except OSError:  # reset: the server has closed it
                return time.monotonic() - start
            sent += 1
        readable, _, _ = select.select([sock], [], [], every)
        if readable:
            try:
                if not sock.recv(65536):
                    return time.monotonic() - start
            except OSError:
                return time.monotonic() - start
    return math.inf


HALF_SENT = [
    b"",  # connects, sends nothing
    b"GET /api/gen",  # half a request line
    b"GET /api/info HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: slo",  # half the headers
]


@needs_serve
@pytest.mark.parametrize("sent", HALF_SENT, ids=["silent", "half-line", "half-headers"])
def test_idle_and_half_sent_connections_are_closed(server, sent):
    with socket.create_connection(address(server), timeout=10) as s:
        s.sendall(sent)
        waited = seconds_until_closed(s)
    assert IDLE * 0.8 <= waited <= IDLE + SLACK, waited


@needs_serve
def test_a_trickled_request_head_is_closed_on_time(server):
    """A client that sends one byte every 0.2 s never lets the connection go quiet: the timeout bounds the whole
    request head, from the connection's start, not the silence between bytes."""
    endless = b"GET /api/info HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 1000
    with socket.create_connection(address(server), timeout=10) as s:
        waited = seconds_until_closed(s, trickle=endless)
    assert waited <= IDLE + SLACK, waited


@needs_serve
def test_kept_alive_connections_are_closed_when_idle_or_half_sent(server):
    for then in (b"", b"GET /api/info HTTP/1.1\r\nHo"):
        conn = http.client.HTTPConnection(*address(server), timeout=10)
        try:
            for _ in range(2):  # one connection, two requests in a row: kept alive between them
                conn.request("GET", "/api/info")
                r = conn.getresponse()
                assert r.status == 200 and json.loads(r.read())["student"]
            conn.sock.sendall(then)
            waited = seconds_until_closed(conn.sock)
        finally:
            conn.close()
        assert IDLE * 0.8 <= waited <= IDLE + SLACK, (then, waited)


@needs_serve
def test_a_request_that_arrived_is_answered_however_long_it_takes():
    """The timeout is on receiving a request, not on answering it: a generation slower than it completes."""
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    async def slow(request):
        await asyncio.sleep(3 * IDLE)
        return PlainTextResponse("done")

    with running(Starlette(routes=[Route("/", slow)]), idle_timeout=IDLE) as url:
        assert get(url, "/", timeout=30)[::2] == (200, b"done")


def test_the_idle_timeout_is_a_documented_bounded_default():
    from scm.serve.app import IDLE_TIMEOUT_S, make_server

    assert 2 <= IDLE_TIMEOUT_S <= 60
    config = make_server(lambda *a: None).config
    assert config.timeout_keep_alive == IDLE_TIMEOUT_S
    with pytest.raises(ValueError, match="idle_timeout"):
        make_server(lambda *a: None, idle_timeout=0)


# -- 3. bounded echoes -------------------------------------------------------------------------------------------------
LONG = 10_000  # characters: a request line h11 still accepts whole (its limit on an incomplete head is 16 KiB)
SHORT_ANSWER = 600  # bytes: the most an error answer may take, whatever it was sent


@needs_serve
@pytest.mark.parametrize("parameter", ["seed", "steps", "class", "guidance", "batch", "model", "client", "unknown"])
def test_errors_echo_a_short_prefix_of_a_long_value(server, parameter):
    query = f"{parameter}={'7' * LONG}" if parameter != "unknown" else f"{'p' * LONG}=1"
    status, _, body = get(server, f"/api/generate?{query}")
    assert status == 400 and len(body) < SHORT_ANSWER, (status, len(body))
    answer = json.loads(body)
    assert "…" in answer["error"] and f"{LONG} characters" in answer["error"], answer
    assert answer["error"].startswith(f"{answer['parameter']}=")
    if parameter != "unknown":
        assert answer["parameter"] == parameter
    else:
        assert answer["parameter"].startswith("ppp") and len(answer["parameter"]) < 100


@needs_serve
def test_errors_echo_a_short_prefix_of_a_long_header_or_path(server):
    port = address(server)[1]
    status, _, body = request(server, "GET", "/api/info", headers={"Host": "evil" * (LONG // 4) + f":{port}"})
    assert status == 400 and len(body) < SHORT_ANSWER and f"{LONG + 1 + len(str(port))} characters" in \
        json.loads(body)["error"]
    status, _, body = get(server, "/api/" + "x" * LONG)
    assert status == 404 and len(body) < SHORT_ANSWER
    # beyond what the HTTP parser takes in one piece: refused before the app, and as briefly
    status, _, body = get(server, f"/api/generate?seed={'1' * 100_000}")
    assert status == 400 and len(body) < SHORT_ANSWER


def test_bounded_echo():
    from scm.serve.models import ECHO_MAX, bounded_echo

    assert bounded_echo("seed") == "seed" and bounded_echo("x" * ECHO_MAX) == "x" * ECHO_MAX
    long = bounded_echo("x" * 100_000)
    assert long == "x" * ECHO_MAX + "…(100000 characters)"


# -- 4. a diffusion run served alone --------------------------------------------------------------------------------
@needs_serve
def test_a_diffusion_run_alone_starts_at_its_recommended_nfe(models):
    from scm.sampling import TEACHER_NFE
    from scm.serve import ServedModel, create_app
    from scm.serve.models import DIFFUSION_NFES, parse_query

    alone = ServedModel(models["teacher"].run, "student")
    assert alone.steps == DIFFUSION_NFES and alone.default_steps == TEACHER_NFE
    assert parse_query([("seed", "1")], {"student": alone})[1].steps == TEACHER_NFE
    # an NFE list without it: the allowed NFE nearest it
    assert ServedModel(models["teacher"].run, "student", steps=(3, 5, 9)).default_steps == 9
    # consistency runs keep 2 steps
    assert models["student"].default_steps == 2
    with running(create_app(alone, warm_up=False, threads=1), idle_timeout=IDLE) as url:
        info = json.loads(get(url, "/api/info")[2])["student"]
        assert (info["steps_kind"], info["default_steps"]) == ("nfe", TEACHER_NFE)
        status, headers, _ = get(url, "/api/generate?seed=1")
        assert status == 200 and headers["x-nfe"] == str(TEACHER_NFE) and headers["x-steps"] == str(TEACHER_NFE)


# -- 5. the guidance range ------------------------------------------------------------------------------------------
@needs_serve
def test_info_reports_the_guidance_range_the_server_accepts(server, models):
    from scm.errors import InvalidSetting

    info = json.loads(get(server, "/api/info")[2])
    for name, default in (("student", 1.0), ("teacher", 1.0)):
        r = info[name]["guidance_range"]
        assert r == {"min": 0.0, "min_exclusive": True, "max": 10.0, "default": default, "decimals": 6}, r
        model, smallest = models[name], f"{10 ** -r['decimals']:.{r['decimals']}f}"
        for accepted in (smallest, str(r["max"]), f"{r['max']:.{r['decimals']}f}", str(r["default"])):
            assert model.check({"guidance": accepted}).guidance == float(accepted), accepted
        too_fine = f"{1 + 10 ** -r['decimals']:.{r['decimals'] + 1}f}"
        for refused in (str(r["min"]), f"{r['max'] + 10 ** -r['decimals']:.{r['decimals']}f}", too_fine):
            with pytest.raises(InvalidSetting, match="guidance"):
                model.check({"guidance": refused})


def test_a_model_without_guidance_reports_no_range(tmp_path):
    from scm.runs import load_run
    from scm.serve import ServedModel

    plain = ServedModel(load_run(make_run(tmp_path / "sct", "tiny-28-sct")), "student").describe()
    assert plain["guidance"] is False and plain["guidance_range"] is None


# -- 4. connections at once -------------------------------------------------------------------------------------------
@needs_serve
def test_a_request_past_the_connection_limit_is_answered_503_at_once():
    """With `max_connections` connections open (idle ones count), a request on one more is answered 503 without
    reaching the app; once they close, requests are served again. The default is bounded and documented."""
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    from scm.defaults import MAX_CONNECTIONS
    from scm.serve.app import make_server

    reached = []

    async def hello(request):
        reached.append(1)
        return PlainTextResponse("hello")

    with running(Starlette(routes=[Route("/", hello)]), idle_timeout=30, max_connections=3) as url:
        held = [socket.create_connection(address(url), timeout=10) for _ in range(2)]
        time.sleep(0.3)  # the server has accepted them
        try:
            start = time.monotonic()
            status, _, body = request(url, "GET", "/")
            assert status == 503 and not reached and time.monotonic() - start < 5, (status, body)
        finally:
            for sock in held:
                sock.close()
        time.sleep(0.3)
        assert request(url, "GET", "/")[::2] == (200, b"hello") and reached == [1]
    assert make_server(lambda *a: None).config.limit_concurrency == MAX_CONNECTIONS >= 64
    with pytest.raises(ValueError, match="max_connections"):
        make_server(lambda *a: None, max_connections=1)
