"""Reading training batches: data held in memory (`ImageData`, from an .npz) vs a prepared directory
(`PreparedData`, read by batch), as the data set grows; and MNIST all ways.

    python benchmarks/data_throughput.py [--sizes 50000 200000] [--batches 200] [--batch 256]

For each size N, N random 32×32×3 uint8 images with labels are written straight into a prepared directory
(`PreparedWriter`, no PNG encoding) and into an .npz of the same arrays. Each case runs in a fresh process, one
after the other (one torch thread): it opens the data with `load_dataset` (as `scm train --data` does),
reads a few warm-up batches, then times `data.batch(index)` for `--batches` random indices of `--batch` images,
and reports its peak resident memory (VmHWM) and, at the end, how much of its resident memory is anonymous
(RssAnon: arrays the process owns) and how much is mapped file pages (RssFile). MNIST (when
~/.cache/scm/mnist/mnist.npz exists): `load_dataset("mnist")` vs the same digits through
`scm.data.prepare.prepare("mnist", …)`, opened as a small set is by default (read into memory) and read by
batch (`load_prepared(..., in_memory=False)`, as a set larger than 64 MiB is). The files are freshly
written, so they are in the page cache: this measures reading, not a cold disk. Temporary data goes to a
temporary directory that is removed. Writes benchmarks/results/data_throughput.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import machine, write_results

from scm.app.report import Report

SHAPE = (3, 32, 32)
ROUNDS = 5


def _status() -> dict[str, float]:
    """VmHWM, VmRSS, RssAnon, RssFile of this process, in MB."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) / 1024
    return out


def worker(path: str, batches: int, batch: int, by_batch: bool) -> None:
    import torch

    from scm.data import load_dataset
    from scm.data.prepared import load_prepared

    torch.set_num_threads(1)  # steadier timings on a shared machine; the same for every case
    base = _status()["VmRSS"]
    start = time.perf_counter()
    data = load_prepared(path, in_memory=False) if by_batch else load_dataset(path)
    load_s = time.perf_counter() - start
    g = torch.Generator().manual_seed(0)
    index = [torch.randint(len(data), (batch,), generator=g) for _ in range(batches + 5)]
    for i in index[:5]:
        data.batch(i)
    calls = []
    for _ in range(ROUNDS):  # the same batches again; the median call (robust to a busy neighbour)
        for i in index[5:]:
            start = time.perf_counter()
            x, _ = data.batch(i)
            calls.append(time.perf_counter() - start)
    seconds = statistics.median(calls) * batches
    assert x.shape == (batch, *data.shape) and x.dtype == torch.float32
    s = _status()
    size = len(data) * math.prod(data.shape) / 2**20
    print(json.dumps({"n": len(data), "data_mb": size, "load_s": load_s, "batches_per_s": batches / seconds,
                      "images_per_s": batches * batch / seconds, "peak_rss_mb": s["VmHWM"], "base_rss_mb": base,
                      "rss_anon_mb": s["RssAnon"], "rss_file_mb": s["RssFile"]}))


def run_case(path: Path, args, by_batch: bool = False) -> dict:
    cmd = [sys.executable, __file__, "--worker", str(path), "--batches", str(args.batches), "--batch", str(args.batch),
           *(["--by-batch"] if by_batch else [])]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"worker for {path} failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def make_random(root: Path, n: int, chunk: int = 10_000) -> tuple[Path, Path]:
    """N random images with labels: a prepared directory and an .npz of the same arrays."""
    from scm.data.prepared import PreparedWriter

    rng = np.random.default_rng(n)
    out = root / f"random-{n}"
    writer = PreparedWriter(out, SHAPE, "uint8", n, labelled=True, key=f"random-{n}")
    for i in range(0, n, chunk):
        m = min(chunk, n - i)
        writer.append(rng.integers(0, 256, (m, *SHAPE), dtype=np.uint8), rng.integers(0, 10, m))
    writer.finish({"source": f"random uint8 ({n} images)", "class_names": [str(i) for i in range(10)]})
    images = np.memmap(out / "images.bin", dtype=np.uint8, mode="r", shape=(n, *SHAPE))
    labels = np.fromfile(out / "labels.bin", dtype="<i8")
    npz = root / f"random-{n}.npz"
    np.savez(npz, x=images, y=labels)  # written in pieces from the map
    return out, npz


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[50_000, 200_000])
    ap.add_argument("--batches", type=int, default=200)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--by-batch", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker, args.batches, args.batch, args.by_batch)

    rows = []
    with tempfile.TemporaryDirectory(prefix="scm-data-throughput-") as tmp:
        tmp = Path(tmp)
        for n in args.sizes:
            prepared, npz = make_random(tmp, n)
            rows.append({"case": "in memory (.npz)", "data": f"random 32×32×3, {n:,}", **run_case(npz, args)})
            rows.append({"case": "prepared (read by batch)", "data": f"random 32×32×3, {n:,}",
                         **run_case(prepared, args, by_batch=True)})
        from scm.data.builtin import data_dir

        if (data_dir() / "mnist" / "mnist.npz").is_file():
            from scm.data.prepare import prepare

            start = time.perf_counter()
            mnist = prepare("mnist", tmp / "mnist", resolution=28, progress=False)
            prepare_s = time.perf_counter() - start
            rows.append({"case": "in memory (`mnist`)", "data": "MNIST train, 60,000", **run_case("mnist", args)})
            rows.append({"case": "prepared (default: read into memory, 45 MB)", "data": "MNIST train, 60,000",
                         **run_case(mnist, args), "prepare_s": prepare_s})
            rows.append({"case": "prepared (read by batch)", "data": "MNIST train, 60,000",
                         **run_case(mnist, args, by_batch=True)})
    payload = {"batch": args.batch, "batches": args.batches, "rows": rows}
    report = Report(f"Reading training batches: in memory vs prepared, batch {args.batch}")
    header = ["data", "case", "size (MB)", "open (s)", "batches/s", "images/s", "peak RSS (MB)", "anonymous RSS (MB)",
              "file RSS (MB)"]
    report.table(header, [[r["data"], r["case"], f"{r['data_mb']:.0f}", f"{r['load_s']:.2f}",
                           f"{r['batches_per_s']:.0f}", f"{r['images_per_s']:,.0f}", f"{r['peak_rss_mb']:.0f}",
                           f"{r['rss_anon_mb']:.0f}", f"{r['rss_file_mb']:.0f}"] for r in rows])
    report.markdown_text(NOTES.format(base=np.median([r["base_rss_mb"] for r in rows]), batches=args.batches,
                                      batch=args.batch))
    print(report.to_markdown())
    json_path, md_path = write_results("data_throughput", payload, report)
    print(f"wrote {json_path} and {md_path} ({machine()['cpu']})")


NOTES = """## Notes

- Each case is a fresh process (one torch thread): `load_dataset`, 5 warm-up calls, then {batches} timed
  `data.batch(index)` calls of {batch} random indices, five times; batches/s is one over the median call (the
  gather plus the conversion to float32 in [-1, 1] that the training loop does). A process with torch and scm
  imported holds about {base:.0f} MB before it opens any data.
- In memory, the whole array is read into the process (anonymous memory: it grows with N). A prepared directory
  read by batch holds only the labels (8 bytes an image) and the batch it is building: each item is read with
  `os.preadv` into a fresh buffer, so its RSS does not depend on N. (A memory map was tried first: its peak RSS
  rose to the file's size, since on this kernel one page fault maps a whole large folio, and one random batch
  of 256 mapped ~400 MB of a 586 MB file; `MADV_RANDOM` and `MADV_DONTNEED` did not change that.)
- Reading by batch costs ~1 µs of Python per item; that is why sets up to 64 MiB (MNIST) are read into memory by
  default. Either way a batch costs well under a millisecond, against ~100 ms for a training step of the tiny
  net on this CPU.
- The files were just written, so they are in the page cache; on a cold disk the first epoch of a prepared set
  reads from the disk (random reads), later epochs from the cache while it fits in memory.
"""


if __name__ == "__main__":
    main()
