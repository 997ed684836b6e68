"""Shared helpers for the benchmark scripts: machine description, robust timing, result files."""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from scm.app.report import Report

RESULTS = Path(__file__).resolve().parent / "results"


@torch.no_grad()
def awake(net: torch.nn.Module) -> torch.nn.Module:
    """Give a fresh network's zero-initialised parameters (the U-Net's output gain, a DiT's gates and output
    layer) non-zero values, so that its output and tangent depend on every layer, as after training."""
    for p in net.parameters():
        if not p.any():
            p.fill_(1.0) if p.numel() == 1 else p.normal_(0, 0.02)
    return net


def machine() -> dict:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn, device: torch.device, repeats: int = 10, warmup: int = 2) -> dict:
    """Median and spread of fn's wall time in milliseconds."""
    for _ in range(warmup):
        fn()
    sync(device)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        samples.append((time.perf_counter() - start) * 1e3)
    return {"median_ms": statistics.median(samples), "min_ms": min(samples), "max_ms": max(samples), "n": repeats}


def time_interleaved(fns: dict, device: torch.device, repeats: int = 10, warmup: int = 2) -> dict:
    """Time several functions in alternation (round-robin), so that a noisy machine affects all alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            samples[name].append((time.perf_counter() - start) * 1e3)
    return {
        name: {"median_ms": statistics.median(v), "min_ms": min(v), "max_ms": max(v), "n": repeats}
        for name, v in samples.items()
    }


def write_results(name: str, payload: dict, report: Report, out_dir: Path = RESULTS) -> tuple[Path, Path]:
    """The figures as JSON and the report as Markdown, both stamped with the command and the machine."""
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "machine": machine(), **payload}
    json_path, md_path = out_dir / f"{name}.json", out_dir / f"{name}.md"
    json_path.write_text(json.dumps(payload, indent=2) + "\n")
    report.blocks.insert(0, ("text", f"Command: `{payload['command']}`  \nMachine: {payload['machine']}"))
    report.write(md_path)
    return json_path, md_path
