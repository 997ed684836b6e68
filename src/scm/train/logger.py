"""What a run reports: messages, a progress bar (kimg, img/s, loss, gradient and tangent norms, ETA),
metrics as JSON lines and, when tensorboard is installed, TensorBoard events. Only the main process writes."""

from __future__ import annotations

import json
import sys
import time

import torch
from tqdm import tqdm

__all__ = ["Logger"]


class Logger:
    def __init__(self, run, cfg, info):
        self.run, self.cfg, self.main = run, cfg, info.is_main
        self.bar = None
        self.tb = None
        self.last_metrics: dict = {}
        self._t0 = self._n0 = None
        self._last_t, self._last_n = None, None
        if self.main and cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run.path / "tensorboard"))
            except (ImportError, ModuleNotFoundError):
                self.tb = None

    def info(self, msg: str) -> None:
        if self.main:
            (self.bar.write if self.bar is not None else lambda m: print(m, file=sys.stderr))(msg)

    def warn(self, msg: str) -> None:
        self.info(f"warning: {msg}")

    def start(self, cur_nimg: int, total_nimg: int) -> None:
        self._t0 = self._last_t = time.perf_counter()
        self._n0 = self._last_n = cur_nimg
        if self.main and self.cfg.progress and self.cfg.max_minutes:  # a time budget: the bar counts minutes
            self.bar = tqdm(total=60 * self.cfg.max_minutes, dynamic_ncols=True, file=sys.stderr, mininterval=0.5,
                            desc=f"{self.cfg.method} ({self.cfg.max_minutes:g}-min budget)",
                            bar_format="{desc} |{bar}| {elapsed}<{remaining} {postfix}")
        elif self.main and self.cfg.progress:
            self.bar = tqdm(total=total_nimg, initial=cur_nimg, unit_scale=1e-3, unit="kimg",
                            dynamic_ncols=True, file=sys.stderr, desc=self.cfg.method, mininterval=0.5,
                            bar_format="{desc} {n:.1f}/{total:.1f} kimg |{bar}| {elapsed}<{remaining} {postfix}")

    def progress(self, cur_nimg: int, lr: float, stats: dict, finite: bool) -> None:
        if self.bar is None:
            return
        elapsed = time.perf_counter() - self._t0
        post = {"img/s": f"{(cur_nimg - self._n0) / max(elapsed, 1e-9):.0f}"}
        if self.cfg.max_minutes:
            self.bar.update(min(elapsed, self.bar.total) - self.bar.n)
            post = {"kimg": f"{cur_nimg / 1000:.1f}", **post}
        else:
            self.bar.update(cur_nimg - self.bar.n)
        if finite:
            post["loss"] = f"{float(stats['loss']):.4g}"
            post["|∇|"] = f"{float(stats['grad_norm']):.3g}"
            if "g_norm" in stats:
                post["|g|"] = f"{float(stats['g_norm']):.3g}"
        post["lr"] = f"{lr:.2g}"
        self.bar.set_postfix(post, refresh=False)

    def metrics(self, step: int, cur_nimg: int, lr: float, means: dict, bad_steps: int) -> None:
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
