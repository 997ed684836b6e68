"""Load on `scm serve`: many pages asking for images at once.

    python benchmarks/serve_load.py [--ckpt RUN] [--clients 20] [--requests 50] [--steps N] [--batch 1]
                                    [--device cpu] [--as-consistency] [--captured] [--name serve_load]

Starts `scm serve` in its own process on a free port of 127.0.0.1 and runs `--clients` threads, each a page with
a client id of its own and one keep-alive connection, each sending `--requests` requests one after the other
(the next when the previous is answered) with varying seeds. Because every client has its own id and at most
one request under way, none is superseded: all requests are generated, one at a time per model, so latency is
mostly the wait behind the other clients. Records errors (any answer but 200, or a failed connection; must be
0), superseded answers (counted apart, expected 0), throughput (requests/s and images/s over the whole run),
latency percentiles as the clients see them, and the server's own figures (X-Generation-Ms, X-Server-Ms, and
/api/stats). A single client alone first gives the latency without queueing.

The model: `--ckpt`, by default the sCD student `make demo` trains (runs/demo/runs/scd, guidance 2) when this
checkout has one, else the committed diffusion teacher demo/teacher at 3 NFE (Heun), a stand-in for a few-step
model of the same network. `--as-consistency` serves a diffusion run's network as a consistency run instead: an
sCT run directory (in a temporary folder) holding its EMA weights, as an sCT student starts (`--init`); its images
are not a trained student's, its latency at 1 or 2 steps is (for a machine without a trained student, e.g. a lent
GPU). `--captured` serves it through the captured sampler (`scm serve --captured`: CUDA graphs on a GPU).
Writes benchmarks/results/<--name>.{json,md}.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import machine, write_results

from scm.app.report import Report

ROOT = Path(__file__).resolve().parents[1]
STUDENT = ROOT / "runs" / "demo" / "runs" / "scd"
TEACHER = ROOT / "demo" / "teacher"


def consistency_stand_in(teacher: Path, out: Path) -> Path:
    """An sCT run directory at `out` with the diffusion run `teacher`'s network and EMA weights (module docstring)."""
    import dataclasses

    from scm.config import make_config, to_dict
    from scm.runs import RunDir, ema_key, load_run

    run = load_run(teacher)
    if run.cfg.method != "diffusion" or not run.cfg.preset.endswith("-diffusion"):
        raise SystemExit(f"--as-consistency: {teacher} is not a diffusion run of a preset family (its preset: "
                         f"{run.cfg.preset}, method {run.cfg.method})")
    cfg = make_config(run.cfg.preset.removesuffix("-diffusion") + "-sct", None,
                      ["conditional=true"] if run.cfg.conditional else [], data=run.cfg.data, out=str(out))
    cfg = dataclasses.replace(cfg, net=run.cfg.net, loss=dataclasses.replace(cfg.loss, sigma_d=run.cfg.loss.sigma_d))
    folder = RunDir(out)
    folder.write_config(to_dict(cfg))
    weights = {ema_key(cfg.ema.stds[0], k): v.contiguous() for k, v in run.net.state_dict().items()}
    folder.save(1, {"ema": weights}, {"step": 1}, keep=1)
    return out


def start_server(ckpt: Path, device: str, captured: bool = False) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    cmd = [sys.executable, "-m", "scm", "serve", "--ckpt", str(ckpt), "--port", "0", "--device", device,
           *(["--captured"] if captured else [])]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    line = proc.stderr.readline()
    match = re.search(r"at http://([\d.]+):(\d+)/", line)
    if not match:
        proc.kill()
        raise SystemExit(f"scm serve did not start: {line}{proc.stderr.read()}")
    threading.Thread(target=proc.stderr.read, daemon=True).start()  # keep its stderr drained
    return proc, f"{match.group(1)}:{match.group(2)}"


def get_json(address: str, path: str) -> dict:
    host, port = address.split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=600)
    try:
        conn.request("GET", path)
        return json.loads(conn.getresponse().read())
    finally:
        conn.close()


def client(address: str, index: int, n: int, query: str, out: list) -> None:
    """One page: n requests in a row on one connection, seeds index·n … index·n + n − 1."""
    host, port = address.split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=600)
    for j in range(n):
        seed = index * n + j
        start = time.perf_counter()
        record = {"client": index, "seed": seed}
        try:
            conn.request("GET", f"/api/generate?{query}&seed={seed}&client=load-{index}")
            r = conn.getresponse()
            body = r.read()
            record.update(status=r.status, bytes=len(body), generation_ms=float(r.getheader("X-Generation-Ms", "nan")),
                          server_ms=float(r.getheader("X-Server-Ms", "nan")), images=int(r.getheader("X-Images", "0")))
        except (OSError, http.client.HTTPException, ValueError) as e:
            record.update(status=None, error=f"{type(e).__name__}: {e}")
            conn.close()
            conn = http.client.HTTPConnection(host, int(port), timeout=600)
        record["latency_ms"] = 1000 * (time.perf_counter() - start)
        record["end"] = time.perf_counter()
        out.append(record)
    conn.close()


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    if not values:
        return float("nan")
    k = (len(values) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def run_load(address: str, clients: int, requests: int, query: str) -> dict:
    records: list[dict] = []
    threads = [threading.Thread(target=client, args=(address, i, requests, query, records)) for i in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = max(r["end"] for r in records) - start
    ok = [r for r in records if r["status"] == 200]
    superseded = sum(r["status"] == 409 for r in records)
    lat = [r["latency_ms"] for r in ok]
    gen = [r["generation_ms"] for r in ok]
    wait = [r["server_ms"] - r["generation_ms"] for r in ok]
    images = sum(r["images"] for r in ok)
    return {
        "clients": clients, "requests_per_client": requests, "requests": len(records), "ok": len(ok),
        "errors": len(records) - len(ok) - superseded, "superseded": superseded,
        "error_examples": [r.get("error") or r["status"] for r in records if r["status"] not in (200, 409)][:5],
        "wall_s": wall, "requests_per_s": len(ok) / wall, "images_per_s": images / wall,
        "latency_ms": {"p50": percentile(lat, 50), "p95": percentile(lat, 95), "p99": percentile(lat, 99),
                       "max": max(lat, default=float("nan")), "mean": statistics.fmean(lat) if lat else float("nan")},
        "generation_ms_p50": percentile(gen, 50),
        "server_overhead_ms_p50": percentile(wait, 50),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", type=Path, default=None, help="the run to serve (default: see the module docstring)")
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--requests", type=int, default=50, help="requests per client")
    ap.add_argument("--steps", type=int, default=None, help="steps (consistency) or NFE (diffusion); default 2 / 3")
    ap.add_argument("--batch", type=int, default=1, choices=(1, 4, 16), help="images per request")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--as-consistency", action="store_true",
                    help="serve a diffusion run's network and weights as a consistency run (module docstring)")
    ap.add_argument("--captured", action="store_true", help="serve through the captured sampler (a consistency run)")
    ap.add_argument("--name", default="serve_load")
    args = ap.parse_args()
    served = ckpt = args.ckpt or (STUDENT if (STUDENT / "config.json").is_file() and not args.as_consistency
                                  else TEACHER)
    with tempfile.TemporaryDirectory() as tmp:
        if args.as_consistency:
            served = consistency_stand_in(ckpt, Path(tmp) / "stand-in")
        info, steps, alone, loaded, stats = measure(served, args)
    ckpt_name = str(ckpt.resolve().relative_to(ROOT) if ckpt.resolve().is_relative_to(ROOT) else ckpt)
    if args.as_consistency:
        ckpt_name += " (its network and EMA weights as an untrained sCT run)"
    report_results(args, ckpt_name, info, steps, alone, loaded, stats)


def measure(served: Path, args):
    """Serve `served` in its own process; one client alone, then `--clients` at once."""
    proc, address = start_server(served, args.device, args.captured)
    try:
        info = get_json(address, "/api/info")["student"]  # answered once the models are warm
        steps = args.steps or (3 if info["method"] == "diffusion" else 2)
        query = f"steps={steps}&batch={args.batch}"
        print(f"serving {served} ({info['method']}, {steps} {info['steps_kind']}) at {address}", file=sys.stderr)
        alone = run_load(address, 1, args.requests, query)
        print(f"1 client: p50 {alone['latency_ms']['p50']:.1f} ms", file=sys.stderr)
        loaded = run_load(address, args.clients, args.requests, query)
        stats = get_json(address, "/api/stats")
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    return info, steps, alone, loaded, stats


def report_results(args, ckpt_name: str, info: dict, steps: int, alone: dict, loaded: dict, stats: dict) -> None:
    model = {k: info[k] for k in ("run", "method", "height", "width", "channels", "classes", "guidance",
                                  "default_guidance", "checkpoint_step", "parameters", "device")}
    payload = {"ckpt": ckpt_name, "captured": args.captured, "model": model, "steps": steps,
               "steps_kind": info["steps_kind"], "batch": args.batch,
               "single_client": alone, "load": loaded, "server_stats": stats}
    sampler = f"{steps} {'NFE Heun' if info['steps_kind'] == 'nfe' else 'steps'}"
    sampler += ", captured" if args.captured else ""
    report = Report(f"scm serve under load: {args.clients} clients × {args.requests} requests "
                    f"({payload['ckpt']}, {sampler}, {args.batch} image{'s' if args.batch > 1 else ''} per request, "
                    f"{args.device})")
    rows = []
    for label, r in (("1 client (no queueing)", alone), (f"{args.clients} clients at once", loaded)):
        lat = r["latency_ms"]
        rows.append([label, r["requests"], r["errors"], r["superseded"], f"{r['requests_per_s']:.1f}",
                     f"{r['images_per_s']:.1f}", f"{lat['p50']:.1f}", f"{lat['p95']:.1f}", f"{lat['max']:.1f}",
                     f"{r['generation_ms_p50']:.1f}", f"{r['server_overhead_ms_p50']:.1f}"])
    report.table(["clients", "requests", "errors", "superseded", "requests / s", "images / s", "p50 latency (ms)",
                  "p95 latency (ms)", "max latency (ms)", "generation p50 (ms)", "server wait + PNG p50 (ms)"], rows)
    report.markdown_text(NOTES)
    print(report.to_markdown())
    json_path, md_path = write_results(args.name, payload, report)
    print(f"wrote {json_path} and {md_path} ({machine()['cpu']})")
    if loaded["errors"] or alone["errors"]:
        raise SystemExit(f"{loaded['errors'] + alone['errors']} requests failed: {loaded['error_examples']}")


NOTES = """## Notes

- Latency is what a client sees (request sent → PNG received). "generation" is the server's X-Generation-Ms
  (network and sampler only; for a request generated together with others, its share by images of the joint
  call); "server wait + PNG" is X-Server-Ms − X-Generation-Ms: the wait behind other requests in the model's
  queue, plus decoding and PNG encoding.
- The server runs one generation at a time per model, and the requests that wait together with the same steps
  and guidance go into one network call (different seeds and classes per image). Under load, the 20 clients'
  requests are therefore served in batches of up to 20 images: the throughput is that of batched generation,
  and the latency about one batched call plus one wait. Before the requests were batched (one call each) this
  benchmark gave 21.9 requests/s with p50 915 ms and p95 945 ms on the same machine.
- Every client has its own id, so nothing is superseded here; a page that sends on every input event has its
  older waiting request replaced (409) instead, see `scm.serve.app`.
"""


if __name__ == "__main__":
    main()
