"""Measuring a run: sample it with a sampler setting, score the samples against a reference, and describe the
result as one row. `evaluate_setting` is the one generate → measure → grid → row routine that `scm eval`, the
demo and the benchmarks share."""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from scm._checks import describe_shape
from scm.conditioning import Conditioning
from scm.data import load_dataset
from scm.data.prepared import is_prepared, load_prepared
from scm.errors import DataError, SamplerError
from scm.generate import Sampler, generate, sample_shape
from scm.images import grid, report_scale, save_png
from scm.metrics import measure, open_reference
from scm.metrics.quality import METRICS, FeatureSpace, RefStats
from scm.runs import LoadedRun

__all__ = ["evaluate", "evaluate_setting", "open_checked_reference"]


def evaluate_setting(run: LoadedRun, sampler: Sampler, space: FeatureSpace, ref: RefStats, n: int, *,
                     seed: int = 0, batch: int = 256, guidance: float | None = None, grid_path: Path | None = None,
                     grid_count: int = 64, progress: bool = False, prompts: list[str] | None = None,
                     captured: bool = False) -> tuple[dict, torch.Tensor]:
    """Generate n samples (a text run: sample i from prompt i mod their number), score them (metric, KID,
    precision, recall, recognisability; prompt adherence where the prompts are captioned MNIST's) and, with
    `grid_path`, save a grid of the first `grid_count` (enlarged for small images). Non-finite samples score ∞
    instead of failing. `captured`: a consistency run's sampler and network as one compiled graph (`generate`).
    Returns (row, images)."""
    images, seconds = generate(run, n, sampler, batch=batch, seed=seed, guidance=guidance, progress=progress,
                               prompt=prompts, captured=captured)
    finite = bool(torch.isfinite(images).all())
    labels = asked_labels(run, space, n)
    scores = measure(images, space, ref, seed=seed, labels=labels) if finite else {space.metric: math.inf}
    if prompts and finite:
        scores |= prompt_adherence([prompts[i % len(prompts)] for i in range(n)], images, space)
    name = sampler.describe(run) + (f", guidance {guidance:g}" if guidance is not None else "")
    row = {"sampler": name, "nfe": sampler.evaluations(run), "n": n, "seed": seed, "finite": finite,
           "seconds_per_image": seconds / n, "images_per_second": n / seconds, **scores}
    if grid_path is not None:
        row["grid"] = str(save_samples_grid(images[:grid_count].nan_to_num(0), grid_path))
    return row, images


def asked_labels(run: LoadedRun, space: FeatureSpace, n: int) -> torch.Tensor | None:
    """The class each of n samples of a class-conditional run is generated with (sample i: class i mod the
    number of classes, `Conditioning.sample_inputs`), when the space's classifier judges as many classes; else
    None (no class accuracy)."""
    classes = Conditioning.of_run(run.cfg).classes
    judge = space.classifier if space.per_item else None
    if not classes or judge is None or getattr(judge, "num_classes", None) != classes:
        return None
    return torch.arange(n) % classes


def save_samples_grid(items: torch.Tensor, path: Path) -> Path:
    """A grid of samples by modality: images as a PNG grid; video clips as an animated GIF grid and audio as
    a PNG of spectrograms, one row per clip (`scm.media`). Returns the path written (a GIF's suffix is .gif)."""
    if items.ndim == 5:
        from scm.media import save_gif_grid

        return save_gif_grid(items, path.with_suffix(".gif"))
    if items.ndim == 3:
        from scm.media import save_spectrogram_grid

        return save_spectrogram_grid(items, path)
    save_png(grid(items, scale=report_scale(items.shape)), path)
    return path


def evaluate(run: LoadedRun, samplers: list[Sampler], ref: str, n: int, *, metric: str = "fd", batch: int = 256,
             seed: int = 0, inception=None, log=print, guidance: float | None = None,
             prompts: list[str] | None = None, captured: bool = False) -> dict:
    """Every sampler setting of `samplers` against the reference `ref` (a data set or a statistics file). A run
    on latents is measured on its decoded samples, so `ref` must be images (those the latents came from). A text
    run samples from `prompts`, by default the first captions of a captioned `ref` (`mnist-captions:test`: the
    held-out captions), sample i from item i's. `captured`: as `evaluate_setting`'s."""
    prompts = eval_prompts(run, ref, n, prompts)
    space, stats = open_checked_reference(run, samplers, ref, n, metric=metric, inception=inception, log=log,
                                          guidance=guidance, prompts=prompts)
    rows = []
    for s in samplers:
        row, _ = evaluate_setting(run, s, space, stats, n, seed=seed, batch=batch, guidance=guidance, prompts=prompts,
                                  captured=captured)
        rows.append(row)
        log(f"{row['sampler']}: {space.metric} {row[space.metric]:.2f}, {row['images_per_second']:.1f} img/s"
            + (f", digit accuracy {row['digit_accuracy']:.1%}" if row.get("digit_accuracy") is not None else "")
            + (f", class accuracy {row['accuracy']:.1%}" if row.get("accuracy") is not None else "")
            + (f", temporal consistency {row['temporal_consistency']:.1%}" if "temporal_consistency" in row else ""))
    return {"run": str(run.checkpoint), "method": run.cfg.method, "ema_std": run.ema_std, "step": run.step,
            "reference": stats.source, "metric": space.metric, "n": n, "batch": batch, "seed": seed,
            "guidance": guidance, "prompts": len(prompts) if prompts else None, "captured": captured,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "rows": rows}


def eval_prompts(run: LoadedRun, ref: str, n: int, prompts: list[str] | None) -> list[str] | None:
    """The prompts a text run is evaluated with: those given, else the first captions of the first n items of the
    captioned reference data set; None for other runs (which refuse prompts)."""
    conditioning = Conditioning.of_run(run.cfg)
    if prompts is not None or not conditioning.text:
        conditioning.check(None, None, prompts)
        return prompts
    data = None
    if not str(ref).endswith(".npz"):
        data = load_dataset(ref)
    if data is None or getattr(data, "captions", None) is None:
        raise SamplerError(f"prompt: this model is text-conditioned, and the reference {ref} has no captions to "
                           "prompt it with: give prompts, or a captioned reference such as mnist-captions:test",
                           key="prompt")
    return data.caption_of(torch.arange(min(n, len(data))))


def prompt_adherence(prompts: list[str], images: torch.Tensor, space: FeatureSpace) -> dict:
    """Digit accuracy and attribute agreement of samples with their prompts (`scm.data.captions.adherence`), for
    prompts in captioned MNIST's grammar judged by the MNIST classifier; {} otherwise."""
    from scm.data.captions import adherence, parse_caption

    if space.key != "classifier:mnist" or not any(parse_caption(p)[0] is not None for p in prompts):
        return {}
    _, probs = space.embed(images)
    return adherence(prompts, images, probs)


def check_counts(n: int, batch: int = 1, metric: str = "fd") -> None:
    """The sample count, batch size and metric of an evaluation, checked before anything is loaded."""
    if not (isinstance(n, int) and not isinstance(n, bool) and n >= 2):
        raise SamplerError(f"n={n!r}: need at least 2 samples per setting (a covariance needs two)", key="n")
    if not (isinstance(batch, int) and not isinstance(batch, bool) and batch >= 1):
        raise SamplerError(f"batch={batch!r}: must be a positive integer", key="batch")
    if metric not in METRICS:
        raise SamplerError(f"metric={metric!r}: use fd (a classifier's features) or fid (Inception)", key="metric")


def open_checked_reference(run: LoadedRun, samplers: list[Sampler], ref: str, n: int, *, metric: str = "fd",
                           inception=None, log=print, guidance: float | None = None,
                           prompts: list[str] | None = None) -> tuple[FeatureSpace, RefStats]:
    """Check the sample count, every sampler setting, the conditioning and the reference against the run before
    anything is computed; then the reference's feature space and statistics (for `evaluate_setting`)."""
    check_counts(n)
    for s in samplers:
        s.times(run)  # every setting is checked before anything is computed
    Conditioning.of_run(run.cfg).check(None, guidance, prompts)
    if run.latent is not None and is_prepared(Path(ref)) and load_prepared(ref).latent is not None:
        raise DataError(f"reference {ref}: latents; this run's samples are decoded to images, so the reference must "
                        "be the images the latents were encoded from", key="ref")
    space, stats = open_reference(ref, metric, inception, log=log)
    shape = sample_shape(run)  # a run on latents is measured on its decoded images, against images
    if stats.shape != shape:
        what = "decoded images" if run.latent is not None else "samples"
        raise DataError(f"reference {stats.source} is {describe_shape(stats.shape)}, but this run's {what} are "
                        f"{describe_shape(shape)}"
                        + ("; give the image data set the latents were encoded from" if run.latent else ""),
                        key="ref")
    return space, stats
