"""`scm eval`: sample a run with several sampler settings and measure each against a reference."""

from __future__ import annotations

import json
import time
from pathlib import Path

from scm.generate import Sampler, generate
from scm.metrics import measure, open_reference
from scm.runs import LoadedRun

__all__ = ["evaluate", "markdown_table"]


def evaluate(run: LoadedRun, samplers: list[Sampler], ref: str, n: int, *, metric: str = "fd", batch: int = 256,
             seed: int = 0, inception=None, log=print, images_out: dict | None = None,
             guidance: float | None = None) -> dict:
    space, stats = open_reference(ref, metric, inception, log=log)
    rows = []
    for s in samplers:
        images, seconds = generate(run, n, s, batch=batch, seed=seed, guidance=guidance)
        scores = measure(images, space, stats, seed=seed)
        name = s.describe(run) + (f", guidance {guidance:g}" if guidance is not None else "")
        row = {"sampler": name, "nfe": s.evaluations(run), "seconds_per_image": seconds / n,
               "images_per_second": n / seconds, **scores}
        rows.append(row)
        log(f"{row['sampler']}: {space.metric} {scores[space.metric]:.2f}, {row['images_per_second']:.1f} img/s")
        if images_out is not None:
            images_out[row["sampler"]] = images
    return {"run": str(run.checkpoint), "method": run.cfg.method, "ema_std": run.ema_std, "step": run.step,
            "reference": stats.source, "metric": space.metric, "n": n, "batch": batch, "seed": seed,
            "guidance": guidance,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "rows": rows}


def markdown_table(result: dict) -> str:
    m = result["metric"]
    has_conf = any("confident" in r for r in result["rows"])
    head = f"| sampler | NFE | {m} | KID | precision | recall |" + (" confident ≥ 0.9 | classes |" if has_conf else "")
    lines = [head + " s / image | images / s |", "|" + "---|" * (head.count("|") + 1)]
    for r in result["rows"]:
        cells = [r["sampler"], str(r["nfe"]), f"{r[m]:.2f}", f"{r['KID']:.4f}", f"{r['precision']:.3f}",
                 f"{r['recall']:.3f}"]
        if has_conf:
            cells += [f"{100 * r.get('confident', 0):.1f} %", str(r.get("classes", "-"))]
        cells += [f"{r['seconds_per_image']:.4f}", f"{r['images_per_second']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write(result: dict, out: Path) -> tuple[Path, Path]:
    out.parent.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out.with_suffix(".json"), out.with_suffix(".md")
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    md_path.write_text(f"# {result['metric']} of {result['run']} ({result['n']} samples vs {result['reference']})\n\n"
                       + markdown_table(result))
    return json_path, md_path
