"""The training loop: method-agnostic, it is handed an objective and never knows the maths.

`train(cfg)` reads top to bottom: set up (data, network, objective, training state, resume), then one
`train_step` per global batch (scm.train.step), with logs, EMA snapshots, checkpoints and sample grids in
between. Every random number is a function of (seed, step, slot) (scm.train.batches), so a resumed run continues
exactly.
"""

from __future__ import annotations

import contextlib
import math
import signal
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from scm.conditioning import Conditioning
from scm.config import TrainConfig, from_dict, to_dict
from scm.data import load_dataset
from scm.data.dataset import FINGERPRINT_ITEMS, Dataset, fingerprint
from scm.errors import ConfigError, DataError, RunError, TrainingStopped, UnverifiedWarning
from scm.files import atomic_write
from scm.integrity import one_unverified_warning
from scm.nets.attention_tuning import check_tables
from scm.runs import RunDir
from scm.train.batches import BatchPlan, micro_batches
from scm.train.build import build, build_objective
from scm.train.distributed import (
    DistInfo,
    barrier,
    disagreement,
    init_distributed,
    peer_failures,
    shard_evaluated,
)
from scm.train.ema import PowerEMA
from scm.train.logger import Logger
from scm.train.optim import learning_rate
from scm.train.resolve import resolve
from scm.train.samples import sample_grids
from scm.train.state import TrainState
from scm.train.step import train_step

__all__ = ["TrainResult", "train"]

# Fields that may differ between a run and its resumption (budget, bookkeeping, where it runs).
RESUMABLE_CHANGES = {"out", "kimg", "max_minutes", "device", "log_every", "ckpt_every_kimg", "keep_ckpts",
                     "sample_every_kimg", "sample_count", "sample_ode_steps", "t_mid", "tensorboard", "progress",
                     "max_bad_steps"}


@dataclass
class TrainResult:
    run_dir: str
    step: int
    kimg: float
    bad_steps: int
    net: torch.nn.Module
    ema: PowerEMA
    stats: dict = field(default_factory=dict)


def train(cfg: TrainConfig, *, resume: bool = False, data: Dataset | None = None) -> TrainResult:
    """Train the run `cfg` describes into `cfg.out` (or continue it there, with `resume`). Under torchrun, a peer
    process that stops or stops answering ends this one with TrainingStopped(reason="peer") (`peer_failures`).
    `data`: a data set already in memory (e.g. an `ImageData` of tensors) to train on instead of loading `cfg.data`."""
    cfg.validate()
    info = init_distributed(cfg.device)
    slots = info.world * cfg.grad_accum
    if cfg.batch % slots:  # each slot takes batch // slots examples: a remainder would be dropped silently
        raise ConfigError(f"batch={cfg.batch} must be divisible by the processes × grad_accum = {info.world} × "
                          f"{cfg.grad_accum} = {slots} (the batch is global)", key="batch")
    with peer_failures(info, RunDir(cfg.out).latest):
        return _train(cfg, info, resume, data)


def _train(cfg: TrainConfig, info: DistInfo, resume: bool, data: Dataset | None) -> TrainResult:
    check_tables()  # SCM_ATTENTION_TUNING, when set: a malformed table is refused before anything is loaded
    data = load_dataset(cfg.data) if data is None else data
    _same_data_everywhere(data, info)
    cfg, run = resolve(cfg, data), RunDir(cfg.out)
    torch.manual_seed(cfg.seed)  # the initial weights are a function of the seed (identical on every rank)
    built = build(cfg, data, info.device)
    latent = data.latent  # latents (scm.data.latents): recorded so that samples can be decoded
    media = {"modality": data.modality, **(data.media or {})}  # video/audio: written at the data's rate
    _prepare_run_dir(run, cfg, resume, info, latent, media)
    if built.teacher_info is not None and info.is_main:
        run.write_teacher(built.teacher_info)
    log = Logger(run, cfg, info)
    log.info(data.describe())
    trained = sum(p.numel() for p in built.net.parameters() if p.requires_grad)
    count = f"{built.net.num_parameters() / 1e6:.2f}M parameters"
    if trained < built.net.num_parameters():  # a LoRA student: its base is frozen
        count += f" ({trained / 1e6:.3f}M trained)"
    log.info(f"{cfg.method} | preset {cfg.preset} | {count} | {built.init_note} | {info.world} process(es) on "
             f"{info.device}")

    if built.teacher_module is not None and info.enabled and cfg.distributed == "fsdp":
        shard_evaluated(built.teacher_module)  # the teacher sharded like the student
        log.info(f"the teacher sharded with FSDP2 across {info.world} processes")
    objective = build_objective(cfg, built.teacher)
    state = TrainState.create(built.net, cfg, info, built.critic)
    if resume:
        _resume(state, run, info, log)
    plan, conditioning = BatchPlan(len(data), cfg.batch, cfg.seed), Conditioning.of_run(cfg)
    prompts = _grid_prompts(data, cfg) if conditioning.text else None
    if prompts and info.is_main:  # the grids' prompts: what they show, and `scm serve`'s example prompts
        run.samples_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(run.samples_dir / "prompts.txt", "".join(f"{i}\t{p}\n" for i, p in enumerate(prompts)))
    total_nimg = math.ceil(round(cfg.kimg * 1000) / cfg.batch) * cfg.batch  # whole steps
    deadline = time.monotonic() + 60 * cfg.max_minutes if cfg.max_minutes else math.inf
    stop, done = _StopFlag(), state.cur_nimg >= total_nimg
    log.start(state.cur_nimg, total_nimg)
    with stop.installed(), contextlib.closing(log):  # the bar ends before any error is printed
        while not done:
            lr = learning_rate(cfg.optim, state.kimg)
            batches = micro_batches(data, plan, state.step, info.rank, cfg.grad_accum, info.world, conditioning,
                                    info.device)
            result = train_step(state, objective, batches, cfg, lr, info)
            if not result.finite:
                log.warn(f"step {state.step - 1}: non-finite loss or gradient (loss {result.loss:.4g}, grad norm "
                         f"{result.grad_norm:.4g}); step skipped ({state.bad_steps} so far)")
            interrupted, out_of_time = _agree(info, stop.flag, time.monotonic() > deadline)
            done = state.cur_nimg >= total_nimg or out_of_time
            log.step(state.step, state.cur_nimg, lr, result, state.bad_steps, force=done)
            stopping = state.bad_run >= cfg.max_bad_steps or interrupted
            state.ema.snapshot(run, state.step, state.cur_nimg, cfg.batch, cfg.ema.snapshot_kimg,  # post-hoc EMA
                               due=_crossed(cfg.ema.snapshot_kimg, state.cur_nimg, cfg.batch), end=done or stopping,
                               write=info.is_main)
            if stopping:
                path = state.save(run, cfg.keep_ckpts, info)
                log.close()
                raise _stopped(state, path, diverged=not interrupted)
            if _crossed(cfg.ckpt_every_kimg, state.cur_nimg, cfg.batch) or done:
                log.info(f"checkpoint {state.save(run, cfg.keep_ckpts, info)}")
            if _crossed(cfg.sample_every_kimg, state.cur_nimg, cfg.batch) or done:
                weights = {k: v.to(info.device) for k, v in state.ema.weights().items()}  # gathers FSDP shards
                if info.is_main:
                    for p in sample_grids(cfg, weights, info.device, run.samples_dir, state.kimg, latent=latent,
                                          warn=log.warn, prompts=prompts, media=media):
                        log.info(f"samples {p}")
                barrier(info)
    log.close()
    return TrainResult(str(run.path), state.step, state.kimg, state.bad_steps, state.net, state.ema, log.last_metrics)


def _prepare_run_dir(run: RunDir, cfg: TrainConfig, resume: bool, info: DistInfo, latent: dict | None = None,
                     media: dict | None = None) -> None:
    """Refuse to overwrite another run, or to resume one with another configuration; write the resolved
    configuration and, for data in a VAE's latent space, the data's latent information (RUN/latent.json); for
    video or audio, the data's modality and frame or sample rate (RUN/media.json).
    `resume` where nothing was written yet (the first attempt died before its configuration) starts the run: the
    same command works in a requeue script whenever the previous attempt died."""
    if resume and run.config_path.is_file():
        old, new = to_dict(from_dict(run.read_config())), to_dict(cfg)
        if old.get("init") is None and new["method"] == "scd" and new["init"] == new["teacher"]:
            old["init"] = new["init"]  # recorded before `resolve` wrote it down: the same choice (paper App. G.2)
        diff = sorted(k for k in new if k not in RESUMABLE_CHANGES and old.get(k) != new[k])
        if diff:
            details = "; ".join(f"{k}: {old.get(k)!r} → {new[k]!r}" for k in diff[:4])
            raise RunError(f"{run.path} was started with a different configuration ({details})", key="resume")
    elif run.config_path.is_file():
        raise RunError(f"{run.path} already holds a run", key="out")
    elif run.path.is_dir() and any(not _scm_temporary(p) for p in run.path.iterdir()):
        raise RunError(f"{run.path} is not empty and holds no scm run", key="resume" if resume else "out")
    barrier(info)
    if info.is_main:
        for p in run.path.glob(".*.tmp-*"):  # left by an attempt killed while writing its configuration
            p.unlink(missing_ok=True)
        run.write_config(to_dict(cfg))
        run.write_latent(latent)
        run.write_media(media)
        run.clean_partial()


def _scm_temporary(path: Path) -> bool:
    """A file scm's atomic writer left behind when its process was killed (`scm.files.temporary_name`)."""
    return path.name.startswith(".") and ".tmp-" in path.name and path.is_file()


def _grid_prompts(data, cfg: TrainConfig) -> list[str]:
    """A text run's sample-grid prompts: the first captions of the first `sample_count` examples, the same for every
    grid of the run (and of its resumed parts)."""
    return data.caption_of(torch.arange(min(cfg.sample_count, len(data))))


def _resume(state: TrainState, run: RunDir, info: DistInfo, log: Logger) -> None:
    """Continue from the newest intact checkpoint: damaged ones (content, shapes or values: `RunDir.load`) are set
    aside as <step>.damaged and named in the log; no checkpoint at all starts the run from the beginning. Metric
    lines and EMA snapshots written after the checkpoint are dropped (the run writes them again)."""
    with warnings.catch_warnings(record=True) as notes:
        warnings.simplefilter("always", UnverifiedWarning)
        with one_unverified_warning(str(run.ckpt_dir)):
            ckpt, loaded, skipped = run.newest_intact(lambda p: RunDir.load(p, state.stems,
                                                                                 expect=state.expected_shapes()))
    _same_checkpoint_everywhere(run, ckpt, info)
    for note in notes:
        log.warn(str(note.message))
    for damaged, why in skipped:
        log.warn(f"skipped checkpoint {damaged}: {why}")
    barrier(info)
    if info.is_main:
        for damaged, why in skipped:
            log.warn(f"set aside as {run.set_aside(damaged, why)}")
        run.truncate_metrics(RunDir.step_of(ckpt) if ckpt is not None else 0)
        run.truncate_snapshots(RunDir.step_of(ckpt) if ckpt is not None else 0)
    barrier(info)
    if ckpt is None:
        log.info(f"{run.path} has no {'intact ' if skipped else ''}checkpoint yet: starting from the beginning")
        return
    state.load(ckpt, *loaded)
    log.info(f"resumed from {ckpt} at {state.kimg:.1f} kimg (step {state.step})")


def _same_checkpoint_everywhere(run: RunDir, ckpt: Path | None, info: DistInfo) -> None:
    """Every process reads the run directory (the main process alone writes it): on several machines it must be one
    shared folder, else the processes would continue from different checkpoints (or none) and train apart."""
    seen = disagreement(RunDir.step_of(ckpt) if ckpt is not None else -1, info,
                        lambda step: "no checkpoint" if step < 0 else f"step {step}")
    if seen:
        raise RunError(f"{run.path}: the processes of this run found different checkpoints in it ({seen}): every "
                       f"machine must see the same run directory, on a shared filesystem (rank 0 writes it, every "
                       f"rank reads it to resume)")


def _same_data_everywhere(data: Dataset, info: DistInfo) -> None:
    """Every process reads its own copy of the data (a shared folder or one copy per machine): processes that read
    different data would train on a batch that is not the one the seed describes, and silently. Compared: the size,
    then a fingerprint (`scm.data.dataset.fingerprint`: shape, labels, a sample of items)."""
    if not info.enabled:
        return
    seen = disagreement(len(data), info, lambda n: f"{n} items")
    if not seen:
        digest = fingerprint(data)
        seen = disagreement(int(digest[:15], 16), info, lambda v: f"fingerprint {v:015x}")
        if seen:
            seen += f"; compared: item shape, conditioning, labels and {FINGERPRINT_ITEMS} items spread over the set"
    if seen:
        raise DataError(f"{data.source}: the processes of this run read different data ({seen}): every machine must "
                        f"read the same data set, from a shared folder or an identical copy")


def _stopped(state: TrainState, path, diverged: bool) -> TrainingStopped:
    where = f"at {state.kimg:.1f} kimg (step {state.step})"
    if diverged:
        return TrainingStopped(f"{state.bad_run} consecutive steps had a non-finite loss or gradient {where}; "
                               f"stopped. The last good weights are in {path} (lower optim.lr, or set optim.grad_clip)",
                               reason="diverged", checkpoint=path)
    return TrainingStopped(f"interrupted {where}; checkpoint {path} saved", reason="interrupted", checkpoint=path)


def _agree(info: DistInfo, *flags: bool) -> tuple[bool, ...]:
    """Each flag, true on every process when it is true on any (so that all stop together). Under torchrun an
    all-reduce and a read: the loop's one synchronisation besides the step's."""
    if not info.enabled:
        return flags
    t = torch.tensor([float(f) for f in flags], device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return tuple(v > 0 for v in t.tolist())


def _crossed(every_kimg: float | None, cur_nimg: int, batch: int) -> bool:
    """Did the last step cross a multiple of every_kimg?"""
    if not every_kimg:
        return False
    every = max(1, int(every_kimg * 1000))
    return cur_nimg // every != (cur_nimg - batch) // every


class _StopFlag:
    """SIGINT/SIGTERM request a clean stop at the end of the current step."""

    def __init__(self):
        self.flag = False

    @contextlib.contextmanager
    def installed(self):
        def handler(signum, frame):
            self.flag = True

        old = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not in the main thread
                old[sig] = signal.signal(sig, handler)
        try:
            yield self
        finally:
            for sig, h in old.items():
                signal.signal(sig, h)
