"""What a run reports: messages, a progress bar (kimg, img/s, loss, gradient norm, ETA), metrics as JSON lines
and, when tensorboard is installed, TensorBoard events. Only the main process writes.

The objective's statistics stay on the device and are summed there; they are read (one transfer, after one
all-reduce under torchrun) only when a metrics line is written, every `log_every` steps.
"""

from __future__ import annotations

import json
import sys
import time

import torch
from tqdm import tqdm

from scm.train.distributed import all_reduce_mean

__all__ = ["Logger"]


class Logger:
    def __init__(self, run, cfg, info):
        self.run, self.cfg, self.dist = run, cfg, info
        self.main = info.is_main
        self.bar = None
        self.tb = None
        self.last_metrics: dict = {}
        self._t0 = self._n0 = None
        self._last_t, self._last_n = None, None
        self._reset()
        if self.main and cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run.path / "tensorboard"))
            except ImportError:
                self.tb = None

    def _reset(self) -> None:
        self._sums: dict[str, torch.Tensor] = {}
        self._host = {"loss": 0.0, "grad_norm": 0.0}
        self._count = 0

    def info(self, msg: str) -> None:
        if self.main:
            (self.bar.write if self.bar is not None else lambda m: print(m, file=sys.stderr))(msg)

    def warn(self, msg: str) -> None:
        self.info(f"warning: {msg}")

    def start(self, cur_nimg: int, total_nimg: int) -> None:
        self._t0 = self._last_t = time.perf_counter()
        self._n0 = self._last_n = cur_nimg
        if not (self.main and self.cfg.progress):
            return
        if self.cfg.max_minutes:  # a time budget: the bar counts minutes
            self.bar = tqdm(total=60 * self.cfg.max_minutes, dynamic_ncols=True, file=sys.stderr, mininterval=0.5,
                            desc=f"{self.cfg.method} ({self.cfg.max_minutes:g}-min budget)",
                            bar_format="{desc} |{bar}| {elapsed}<{remaining} {postfix}")
        else:
            self.bar = tqdm(total=total_nimg, initial=cur_nimg, unit_scale=1e-3, unit="kimg",
                            dynamic_ncols=True, file=sys.stderr, desc=self.cfg.method, mininterval=0.5,
                            bar_format="{desc} {n:.1f}/{total:.1f} kimg |{bar}| {elapsed}<{remaining} {postfix}")

    def step(self, step: int, cur_nimg: int, lr: float, result, bad_steps: int, force: bool = False) -> None:
        """Record a step (a StepResult); every `log_every` steps (or when `force`d) write a metrics line."""
        if result.finite:
            self._count += 1
            self._host["loss"] += result.loss
            self._host["grad_norm"] += result.grad_norm
            for k, v in result.stats.items():
                self._sums[k] = self._sums[k] + v if k in self._sums else v
        self._progress(cur_nimg, lr, result)
        if step % self.cfg.log_every == 0 or force:
            self._write(step, cur_nimg, lr, bad_steps)

    def _progress(self, cur_nimg: int, lr: float, result) -> None:
        if self.bar is None:
            return
        elapsed = time.perf_counter() - self._t0
        post = {"img/s": f"{(cur_nimg - self._n0) / max(elapsed, 1e-9):.0f}"}
        if self.cfg.max_minutes:
            self.bar.update(min(elapsed, self.bar.total) - self.bar.n)
            post = {"kimg": f"{cur_nimg / 1000:.1f}", **post}
        else:
            self.bar.update(cur_nimg - self.bar.n)
        if result.finite:  # host values the step has read already
            post["loss"] = f"{result.loss:.4g}"
            post["|∇|"] = f"{result.grad_norm:.3g}"
        if "g_norm" in self.last_metrics:
            post["|g|"] = f"{self.last_metrics['g_norm']:.3g}"
        post["lr"] = f"{lr:.2g}"
        self.bar.set_postfix(post, refresh=False)

    def _write(self, step: int, cur_nimg: int, lr: float, bad_steps: int) -> None:
        means = {}
        if self._count:
            keys = sorted(self._sums)
            if keys:  # one all-reduce and one device-to-host read for all statistics
                stacked = torch.stack([self._sums[k] for k in keys]) / self._count
                means = dict(zip(keys, all_reduce_mean(stacked, self.dist).tolist(), strict=True))
            means["loss"] = self._host["loss"] / self._count        # already averaged over processes
            means["grad_norm"] = self._host["grad_norm"] / self._count
        self._reset()
        now = time.perf_counter()
        rate = (cur_nimg - self._last_n) / max(now - self._last_t, 1e-9)
        self._last_t, self._last_n = now, cur_nimg
        row = {"step": step, "kimg": round(cur_nimg / 1000, 4), "lr": lr, "img_per_s": round(rate, 2),
               "bad_steps": bad_steps, "time": round(now - self._t0, 2), **{k: round(v, 6) for k, v in means.items()}}
        if torch.cuda.is_available():
            row["gpu_mem_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        self.last_metrics = row
        if not self.main:
            return
        with open(self.run.metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in row.items():
                if k not in ("step", "kimg") and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, global_step=int(cur_nimg))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.tb is not None:
            self.tb.close()
            self.tb = None
