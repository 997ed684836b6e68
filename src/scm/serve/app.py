"""The web side of `scm serve`: a Starlette app over one student (and optionally a teacher), and the server.

Endpoints (GET; HEAD too, as GET without a body, except on /api/generate; anything else is 404, or 405 with an
Allow header, as JSON):

    /                  the page (page.html; its script and style at /static/page.js, /static/page.css)
    /api/info          the models: method, sampler, allowed steps/NFEs and the default one (2 steps for a
                       consistency run, the NFE a diffusion run is normally sampled at, TEACHER_NFE, for one served
                       alone), height, width, channels, classes and their names, whether they take guidance and the
                       scales accepted (guidance_range: min (exclusive), max, default, decimals), batch sizes,
                       "conditioning" ("text", "labels" or "none"), for a text model "prompt_max_chars" and
                       "example_prompts", the teacher (or null)
    /api/generate      ?model=student|teacher &seed= &steps= &class= &guidance= &batch= &prompt= &client=   (GET
                       only: HEAD is 405, see `_get_only`; `prompt`, URL-encoded UTF-8, is required by a text model
                       and refused by others)
                       → 200 image/png (one image, or a grid for batch 4 / 16); a video run's image/gif (the
                         clip, or the clips side by side, looping at the data's frame rate); an audio run's
                         application/json (one WAV per clip and their spectrogram PNG, base64:
                         `scm.serve.models.encode_sample`); timings in headers:
                         X-Generation-Ms (network + sampler for all images), X-Ms-Per-Image,
                         X-Images-Per-Second, X-Images, X-NFE, X-Steps, X-Seed, X-Model, X-Server-Ms (arrival to
                         response: waiting, decoding and PNG encoding included)
                       → 400 {"error": "...", "parameter": name} for a bad, unknown or repeated parameter (an
                         error repeats at most 64 characters of a name or value: `scm.serve.models.bounded_echo`)
                       → 409 {"error": "superseded ...", "superseded": true}: a newer request from the same
                         client arrived before this one started, so it was dropped without generating
                       → 503 {"error": "busy ..."}: too many requests are waiting for this model
    /api/stats         per model: requests, generated, superseded, gone, busy, failed, images, waiting, running

Why PNG with headers rather than JSON with base64: the browser shows the bytes as they come (an object URL of
the response's blob), a third smaller than base64, and the timings are a header away; errors are JSON.

One generation at a time per model, latest wins per client. Each model has a `Worker`: a single asyncio task
that takes requests in arrival order from a table of *slots*, at most one slot per client, and runs each
generation in the model's own one-thread executor (the event loop never blocks; a burst cannot start more than
one generation per model, so memory stays bounded). A request that names a client whose slot is still waiting
takes over that slot in place (keeping its place in the queue, so a client that sends on every input event is not
pushed to the back) and the request it replaces is answered 409 at once, without generating. So while a
slider moves, the image follows at the rate the model can generate: the generation under way finishes and is
shown, the newest position is generated next, every position in between is dropped. The alternative, an
asyncio.Lock with per-client sequence numbers, drops the same requests but only when their turn comes: until
then they hold their connections (a browser has six per host) and their memory. Requests without a client id
each get their own slot (never superseded). A request whose client has disconnected before its turn is skipped;
a generation cannot be interrupted, so one under way when its client leaves runs to the end and is thrown away.
At most `max_waiting` slots wait per model; more are answered 503. Requests that wait together are batched:
when the worker takes the first waiting request, it takes with it, in queue order, every waiting request with
the same steps and guidance (seeds, classes and prompts may differ: image i of a request still depends only on its
seed, i and its condition, as in `scm sample`), up to `max_batch` images, and generates them in one network call
(`ServedModel.generate_many`). So many pages at once cost a few batched calls rather than one call each
(benchmarks/serve_load.py measures it).

The student and the teacher have separate workers, so a slow 35-NFE teacher never delays the student. On a CPU
each worker's thread runs torch with its share of the cores (`threads`: with two models on two cores, one each,
so the two never compete). The runs should be loaded in a thread that then ends, as `scm serve` does: torch's
OpenMP keeps a team of threads for every thread that ran a parallel operation, and while a team of another
thread exists (the loader's), libgomp counts more threads than cores and stops spinning between parallel
regions, which made a worker's batch-1 generation 2× slower on the 2-core VM (tiny U-Net: 78 vs 38 ms).

Requests must name this server in their Host header when it listens on a loopback address (`allowed_hosts`; by
default `scm serve` allows localhost, 127.0.0.1 and ::1 there): otherwise a page on any web site could point its
own domain at 127.0.0.1 (DNS rebinding) and use the models from the visitor's browser as same-origin. Other Host
headers get 400 without reaching the app.

Connections are closed when they have not sent a whole request head within `IDLE_TIMEOUT_S` of opening or of
their previous response (`make_server`): neither a silent socket nor one that sends half a request, or one byte a
second, holds a connection for longer. A request that has arrived is answered however long it takes.

Nothing a request says can reach a file: the runs are loaded once, before the server starts, from paths given
by the operator; the page and its two static files are read from the package when the app is built, and are
the only files served.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.resources
import itertools
import logging
import math
import socket
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from scm.defaults import MAX_CONNECTIONS
from scm.errors import InvalidSetting, ScmError, require_modules
from scm.serve.models import SEED_MAX, ServedModel, bounded_echo, parse_query

__all__ = ["GONE", "IDLE_TIMEOUT_S", "SUPERSEDED", "Worker", "bind", "create_app", "make_server", "require",
           "url_of"]

log = logging.getLogger("scm.serve")

SUPERSEDED = "superseded"  # a worker's answer for a request replaced in its slot by a newer one of its client
GONE = "gone"              # … for a request whose client disconnected before its turn


def require() -> None:
    """MissingDependency (extra "serve") unless Starlette and uvicorn are importable."""
    require_modules("serving", "serve", "starlette", "uvicorn")


@dataclass
class _Job:
    payload: object                           # what the worker's `run_batch` is given (a Query, or a callable)
    disconnected: Callable[[], Awaitable[bool]]
    future: asyncio.Future
    group: object = None                      # jobs of one (non-None) group may be generated together …
    size: int = 1                             # … up to `max_batch` images in all


def _call_each(payloads: list) -> list:
    """The default `run_batch`: each payload is a callable; its result, or the exception it raised."""
    out = []
    for run in payloads:
        try:
            out.append(run())
        except Exception as e:
            out.append(e)
    return out


@dataclass
class Worker:
    """One model's queue: one generation at a time, at most one waiting request per client (latest wins), and
    waiting requests of one group (same sampler settings) generated together in one batch."""

    model: ServedModel
    max_waiting: int = 64
    threads: int | None = None  # torch's intra-op threads in the worker's thread (None: torch's default)
    run_batch: Callable[[list], list] = _call_each  # payloads → a result (or an exception) for each
    max_batch: int = 64         # images per joint generation
    stats: dict = field(default_factory=lambda: dict.fromkeys(
        ("requests", "generated", "superseded", "gone", "busy", "failed", "images", "batches"), 0))

    def __post_init__(self):
        self.executor = ThreadPoolExecutor(1, thread_name_prefix=f"scm-serve-{self.model.name}",
                                           initializer=_torch_threads, initargs=(self.threads,))
        self._slots: OrderedDict[object, _Job] = OrderedDict()
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self.running = False

    def submit(self, key, payload, disconnected: Callable[[], Awaitable[bool]], *, group=None,
               size: int = 1) -> asyncio.Future | None:
        """Queue `payload` under `key` (a client id, or a key of its own); the future gets its result, SUPERSEDED
        or GONE, or its exception. None (nothing queued) when `max_waiting` other requests are waiting."""
        loop = asyncio.get_running_loop()
        self.stats["requests"] += 1
        old = self._slots.get(key)
        if old is None and len(self._slots) >= self.max_waiting:
            self.stats["busy"] += 1
            return None
        job = _Job(payload, disconnected, loop.create_future(), group, size)
        self._slots[key] = job  # a key already present keeps its place in the queue
        if old is not None and not old.future.done():
            self.stats["superseded"] += 1
            old.future.set_result(SUPERSEDED)
        if self._task is None or self._task.done():
            self._wake = asyncio.Event()
            self._task = loop.create_task(self._loop(), name=f"scm-serve-{self.model.name}")
        self._wake.set()
        return job.future

    def _take_group(self) -> list[_Job]:
        """The first waiting job, and after it, in queue order, the waiting jobs of its group that fit."""
        _, first = self._slots.popitem(last=False)
        jobs, images = [first], first.size
        if first.group is not None:
            for key, job in list(self._slots.items()):
                if job.group == first.group and images + job.size <= self.max_batch:
                    del self._slots[key]
                    jobs.append(job)
                    images += job.size
        return jobs

    async def _present(self, job: _Job) -> bool:
        """False (and the job answered GONE) when its handler is done or its client has left."""
        if job.future.done():  # the handler was cancelled (its client left)
            return False
        try:
            gone = await job.disconnected()
        except Exception:  # an unreadable connection is a gone client
            gone = True
        if gone:
            self.stats["gone"] += 1
            job.future.set_result(GONE)
        return not gone

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._slots:
                self._wake.clear()
                await self._wake.wait()
                continue
            jobs = [job for job in self._take_group() if await self._present(job)]
            if not jobs:
                continue
            self.running = True
            try:
                results = await loop.run_in_executor(self.executor, self.run_batch, [j.payload for j in jobs])
            except asyncio.CancelledError:
                raise
            except Exception as e:  # handed to the requests; the worker goes on
                results = [e] * len(jobs)
            finally:
                self.running = False
            self.stats["batches"] += 1
            for job, result in zip(jobs, results, strict=True):
                if isinstance(result, Exception):
                    self.stats["failed"] += 1
                    if not job.future.done():
                        job.future.set_exception(result)
                    continue
                self.stats["generated"] += 1
                self.stats["images"] += result.images
                if not job.future.done():
                    job.future.set_result(result)

    def describe(self) -> dict:
        return {**self.stats, "waiting": len(self._slots), "running": self.running}

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for job in self._slots.values():
            if not job.future.done():
                job.future.set_result(GONE)
        self._slots.clear()
        self.executor.shutdown(wait=False, cancel_futures=True)


def _torch_threads(n: int | None) -> None:
    if n is not None:
        import torch

        torch.get_num_threads()  # torch's lazy per-thread set-up first, so that it cannot undo the next line
        torch.set_num_threads(n)


# -- the app ----------------------------------------------------------------------------------------------------------
STATIC = {"page.js": "text/javascript; charset=utf-8", "page.css": "text/css; charset=utf-8"}
SECURITY = {"X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer", "X-Frame-Options": "DENY"}
PAGE_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; media-src blob:; "
               "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")  # blob: audio


def _package_file(name: str) -> bytes:
    return importlib.resources.files("scm.serve").joinpath(name).read_bytes()


LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


def host_of(header: str) -> str:
    """The host of an HTTP Host header, lowercased, without its port: "[::1]:8000" → "::1", "Local:80" → "local"."""
    h = header.strip().lower()
    if h.startswith("["):  # an IPv6 literal, RFC 3986 §3.2.2
        return h[1:h.index("]")] if "]" in h else h
    return h.rpartition(":")[0] if h.count(":") == 1 else h


def default_allowed_hosts(host: str) -> tuple[str, ...] | None:
    """The Host names a server listening on `host` answers to unless told otherwise: the loopback names on a
    loopback address (refusing DNS rebinding), any (None) on another address, whose names only its operator knows."""
    import ipaddress

    try:
        loopback = host.lower() == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    return tuple(dict.fromkeys((*LOOPBACK_NAMES, host.lower()))) if loopback else None


class HostGuard:
    """ASGI middleware: HTTP requests whose Host header is not one of `allowed` get 400 (JSON) and never reach the
    app. Starlette's TrustedHostMiddleware drops an IPv6 literal's brackets wrongly ("[::1]:8000" → "["), hence
    this one."""

    def __init__(self, app, allowed):
        self.app, self.allowed = app, frozenset(host_of(h) for h in allowed)

    async def __call__(self, scope, receive, send):
        if scope["type"] in ("http", "websocket"):
            header = dict(scope["headers"]).get(b"host", b"").decode("latin-1")
            if host_of(header) not in self.allowed:
                from starlette.responses import JSONResponse

                message = f"Host {bounded_echo(header)!r} is not served here (allowed: " \
                          f"{', '.join(sorted(self.allowed))})"
                await JSONResponse({"error": message}, status_code=400, headers=SECURITY)(scope, receive, send)
                return
        await self.app(scope, receive, send)


@dataclass
class _Served:
    """What the app's routes read (`app.state.served`): the models, their workers, the page's files."""

    models: dict[str, ServedModel]
    workers: dict[str, Worker]
    static: dict[str, bytes]  # the page and its script and style, read from the package once
    warm_up: bool
    keys: itertools.count = field(default_factory=itertools.count)  # a key of its own for a request without client


def _json(body: dict, status: int = 200):
    from starlette.responses import JSONResponse

    return JSONResponse(body, status_code=status, headers={**SECURITY, "Cache-Control": "no-store"})


def _error(status: int, message: str, **extra):
    return _json({"error": message, **extra}, status)


async def index(request):
    from starlette.responses import Response

    return Response(request.app.state.served.static["page.html"], media_type="text/html; charset=utf-8",
                    headers={**SECURITY, "Content-Security-Policy": PAGE_POLICY, "Cache-Control": "no-cache"})


async def static_file(request):
    from starlette.responses import Response

    name = request.path_params["name"]
    if name not in STATIC:
        return _error(404, "not found")
    return Response(request.app.state.served.static[name], media_type=STATIC[name],
                    headers={**SECURITY, "Cache-Control": "no-cache"})


async def info(request):
    models = request.app.state.served.models
    return _json({"student": models["student"].describe(),
                  "teacher": models["teacher"].describe() if "teacher" in models else None, "seed_max": SEED_MAX})


async def stats(request):
    return _json({name: w.describe() for name, w in request.app.state.served.workers.items()})


async def generate(request):
    """/api/generate: validate, queue in the model's worker (latest wins per client), answer PNG or JSON."""
    start, served = time.perf_counter(), request.app.state.served
    try:
        model, q = parse_query(request.query_params.multi_items(), served.models)
    except InvalidSetting as e:
        return _error(400, str(e), parameter=e.key)
    key = ("client", q.client) if q.client else ("request", next(served.keys))
    worker = served.workers[model.name]
    future = worker.submit(key, q, request.is_disconnected, group=(q.steps, q.guidance), size=q.batch)
    if future is None:
        return _error(503, f"busy: {worker.max_waiting} requests are waiting for the {model.name}; try again")
    try:
        outcome = await future
    except ScmError as e:  # a setting the sampler refuses that the checks above let through
        return _error(400, str(e), parameter=e.key)
    except Exception as e:  # the server keeps serving (out of memory, a device error …)
        log.exception("generation failed")
        return _error(500, f"generation failed: {type(e).__name__}: {e}")
    if outcome == SUPERSEDED:
        return _error(409, "superseded: a newer request from this client arrived before this one started",
                      superseded=True)
    if outcome == GONE:  # nobody is listening; answered for completeness
        return _error(409, "the client disconnected before this request started", gone=True)
    return _answer(outcome, model, q, start)


def _answer(outcome, model: ServedModel, q, start: float):
    """The image(s) or clips of a generation (PNG, GIF or audio JSON), with its timings in headers (module
    docstring)."""
    from starlette.responses import Response

    ms = 1000 * outcome.seconds
    per_image = ms / outcome.images
    headers = {
        **SECURITY, "Cache-Control": "no-store",
        "X-Model": model.name, "X-Seed": str(q.seed), "X-Steps": str(q.steps), "X-NFE": str(outcome.nfe),
        "X-Images": str(outcome.images), "X-Generation-Ms": f"{ms:.3f}", "X-Ms-Per-Image": f"{per_image:.3f}",
        "X-Images-Per-Second": f"{1000 / per_image:.1f}" if per_image > 0 else "inf",
        "X-Server-Ms": f"{1000 * (time.perf_counter() - start):.3f}",
    }
    return Response(outcome.body, media_type=outcome.media_type, headers=headers)


async def not_found(request, exc):
    """Starlette's HTTP errors (404, 405 …) as JSON, with their headers (a 405's Allow: the methods it takes)."""
    from starlette.responses import JSONResponse

    status = getattr(exc, "status_code", 404)
    message = "not found" if status == 404 else str(getattr(exc, "detail", "")) or "error"
    headers = {**SECURITY, "Cache-Control": "no-store", **(getattr(exc, "headers", None) or {})}
    return JSONResponse({"error": message}, status_code=status, headers=headers)


@contextlib.asynccontextmanager
async def lifespan(app):
    """Warm every model up (one generation per batch size; a captured one also per padded joint batch up to the
    worker's max_batch) before the first request; close the workers at the end."""
    loop, served = asyncio.get_running_loop(), app.state.served
    if served.warm_up:
        for w in served.workers.values():
            await loop.run_in_executor(w.executor, w.model.warm_up, w.max_batch)
    try:
        yield
    finally:
        for w in served.workers.values():
            await w.close()


def create_app(student: ServedModel, teacher: ServedModel | None = None, *, max_waiting: int = 64,
               warm_up: bool = True, threads: int | str | None = "auto", allowed_hosts=None):
    """The Starlette app serving `student` (and `teacher` beside it). With `warm_up`, each model generates once
    per batch size at start-up, before the first request is answered. `threads`: torch's intra-op threads of
    each model's worker; "auto" shares the calling thread's among the models on a CPU (none set on a GPU).
    `allowed_hosts`: the names requests must give in their Host header (None: any; `default_allowed_hosts`)."""
    require()
    import torch
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.middleware import Middleware
    from starlette.routing import Route

    models = {"student": student, **({"teacher": teacher} if teacher is not None else {})}
    if threads == "auto":
        on_cpu = any(m.device.type == "cpu" for m in models.values())
        threads = max(1, torch.get_num_threads() // len(models)) if on_cpu else None
    workers = {name: Worker(m, max_waiting, threads, run_batch=m.generate_many) for name, m in models.items()}
    routes = [Route("/", index), Route("/api/info", info), Route("/api/stats", stats),
              _get_only(Route("/api/generate", generate)), Route("/static/{name}", static_file)]
    guard = [] if allowed_hosts is None else [Middleware(HostGuard, allowed=allowed_hosts)]
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={HTTPException: not_found}, middleware=guard)
    app.state.served = _Served(models, workers, {name: _package_file(name) for name in ("page.html", *STATIC)},
                               warm_up)
    return app


def _get_only(route):
    """`route` answering GET only. Starlette lets HEAD into every GET route, running the endpoint and dropping the
    body; on /api/generate that is a whole generation (seconds of the worker, the queue's place of a real request)
    for nothing. Headers only without the work cannot be had either: a HEAD answer carries the headers a GET
    would (RFC 9110 §9.3.2), and here those (X-NFE, X-Generation-Ms, Content-Length …) are the generation's. So
    HEAD there is 405 with Allow: GET, as for any other method the resource does not take (§15.5.6)."""
    route.methods = {"GET"}
    return route


# -- the server -----------------------------------------------------------------------------------------------------
def bind(host: str = "127.0.0.1", port: int = 8000) -> socket.socket:
    """A listening TCP socket on (host, port) (port 0: a free one); OSError if it cannot be had."""
    if not (isinstance(port, int) and 0 <= port <= 65535):
        raise InvalidSetting("port", port, "must be an integer in 0..65535")
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                         flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://{f'[{host}]' if ':' in host else host}:{port}/"


def _deadline_protocol(seconds: float):
    """uvicorn's h11 HTTP protocol, closing a connection that has not sent a whole request head within `seconds`
    of opening or of the end of its previous response.

    uvicorn has no such timeout of its own (up to 0.55 at least): its only timer, keep-alive, starts after a
    response and stops for good at the first byte received, so a connection that never sends, or sends half a
    request (or one byte every few seconds), is held until the client lets go. The deadline here does not move
    when bytes arrive (a trickle cannot extend it) and is off while a request that has arrived is being answered.
    """
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class DeadlineH11Protocol(H11Protocol):
        _deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm_deadline()

        def handle_events(self) -> None:
            cycle = self.cycle
            super().handle_events()
            if self.cycle is not cycle:  # a whole request head arrived: it is the app's now
                self._cancel_deadline()

        def on_response_complete(self) -> None:
            self._arm_deadline()  # before: a pipelined request that the next line parses cancels it
            super().on_response_complete()

        def connection_lost(self, exc) -> None:
            self._cancel_deadline()
            super().connection_lost(exc)

        def _arm_deadline(self) -> None:
            self._cancel_deadline()
            self._deadline = self.loop.call_later(seconds, self._deadline_passed)

        def _cancel_deadline(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _deadline_passed(self) -> None:
            self._deadline = None
            if not self.transport.is_closing():
                self.transport.close()  # no answer: nothing was asked (as uvicorn's keep-alive timeout does)

    return DeadlineH11Protocol


# the largest request head accepted (uvicorn's default is 16 KiB): a prompt of MAX_PROMPT_CHARS characters, each up
# to 4 bytes of UTF-8 written as 3 characters of percent-encoding each, fits with the other parameters
MAX_HEAD_BYTES = 64 * 1024

# the longest a connection may stay open without a whole request head: from its start, or from the end of its
# previous response (its keep-alive). A browser sends its request at once and reconnects when a kept-alive
# connection was closed; a slow generation is not affected (the time counts only while no request is in hand).
IDLE_TIMEOUT_S = 10.0

# MAX_CONNECTIONS (scm.defaults): the most connections open at once; a request that arrives on one more is answered
# 503 at once (without reaching the app), so that a client opening connections by the thousand exhausts neither
# descriptors nor memory. A page uses up to 6 (a browser's per-host limit), the 20-client load benchmark 20.


def make_server(app, *, log_level: str = "warning", access_log: bool = False, idle_timeout: float = IDLE_TIMEOUT_S,
                max_connections: int = MAX_CONNECTIONS):
    """A uvicorn server for `app`; run it with `.run(sockets=[bind(...)])` (in any thread; `should_exit = True`
    stops it). A connection without a whole request head `idle_timeout` seconds after it opened, or after its
    previous response, is closed (`IDLE_TIMEOUT_S`); a request that arrives while `max_connections` connections
    (its own included) are open, or as many requests are in hand, is answered 503 Service Unavailable
    (`MAX_CONNECTIONS`; uvicorn's `limit_concurrency`)."""
    require()
    import uvicorn

    if isinstance(idle_timeout, bool) or not (isinstance(idle_timeout, (int, float)) and 0 < idle_timeout < math.inf):
        raise InvalidSetting("idle_timeout", idle_timeout, "must be a number of seconds > 0")
    if isinstance(max_connections, bool) or not (isinstance(max_connections, int) and max_connections >= 2):
        raise InvalidSetting("max_connections", max_connections, "must be a whole number ≥ 2")
    # h11 (not httptools, were it installed): the protocol the deadline is built on; no WebSocket: none is served
    config = uvicorn.Config(app, log_level=log_level, access_log=access_log, lifespan="on",
                            timeout_graceful_shutdown=2, http=_deadline_protocol(idle_timeout), ws="none",
                            timeout_keep_alive=idle_timeout, h11_max_incomplete_event_size=MAX_HEAD_BYTES,
                            limit_concurrency=max_connections)
    return uvicorn.Server(config)

