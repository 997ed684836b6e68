"""Training presets: the paper's settings by name, one literal line each (as EDM2's `train_edm2.py`).

A preset maps dotted keys of `scm.config.TrainConfig` to values; `scm train --preset NAME` starts from it, then
applies the command line's flags and `key=value` overrides. Names are `<family>-<method>`; a family (`tiny-28`)
with `--method` picks one. Each family shares its data shape and bookkeeping (the `_FAMILY` dict above its
lines); every setting that differs between presets is on the preset's own line.

Sources (Lu & Song, App. G; EDM2 config G for the teachers): kimg = iterations × batch / 1000; the consistency
models' learning rate is the teacher's × 0.01 (App. G.2); tangent warm-up H = 10k iterations (§4.2);
teacher EMA σ_rel per size (App. G.2, the EMA the student starts from and, for sCD, distils); sCT dropout
only at resolutions ≤ 16 on ImageNet; ImageNet 512×512 is 64×64×4 SD-VAE latents, and its sCD students take
the classifier-free-guidance scale s ~ U[1, 2] as an input (§5.2). The tiny presets are this project's, for
CPUs: minutes on a laptop; their tangent warm-up of 1 kimg is a few % of runs of 5–100 kimg, as the paper's
10k iterations are of its runs. Post-hoc EMA snapshots (`ema.snapshot_kimg`): the tiny presets keep the default
(2.5 kimg, `scm.config.EMAConfig`), the paper's presets take EDM2's interval of 8Mi images (256 over 2Gi images).
"""
# ruff: noqa: E501

from __future__ import annotations

__all__ = ["FAMILIES", "PRESETS"]

_EDM2_SNAPSHOT_KIMG = 8 * 2**20 / 1000  # post-hoc EMA snapshots every 8Mi images, as EDM2
_TINY = {"net_preset": "tiny", "batch": 64, "ema.stds": (0.05, 0.1), "ckpt_every_kimg": 20.0, "sample_every_kimg": 40.0}
_DIT_TINY = {"net_preset": "dit-tiny", "batch": 64, "ema.stds": (0.05, 0.1), "ckpt_every_kimg": 20.0, "sample_every_kimg": 40.0}
_VIDEO_TINY = {"net_preset": "video-tiny", "resolution": 32, "frames": 8, "channels": 1, "batch": 32, "ema.stds": (0.05, 0.1), "ckpt_every_kimg": 10.0, "sample_every_kimg": 20.0}
_AUDIO_TINY = {"net_preset": "audio-tiny", "length": 16000, "channels": 1, "batch": 32, "loss.sigma_d": 0.1, "ema.stds": (0.05, 0.1), "ckpt_every_kimg": 10.0, "sample_every_kimg": 20.0}
_C10 = {"net_preset": "cifar", "resolution": 32, "channels": 3, "batch": 512, "ema.stds": (0.05,), "ckpt_every_kimg": 5000.0, "sample_every_kimg": 5000.0, "ema.snapshot_kimg": _EDM2_SNAPSHOT_KIMG}
_IMG64 = {"resolution": 64, "channels": 3, "batch": 2048, "conditional": True, "precision": "fp16", "optim.betas": (0.9, 0.99), "optim.eps": 1e-11, "optim.lr_decay_kimg": 71680.0, "ckpt_every_kimg": 8192.0, "sample_every_kimg": 16384.0, "ema.snapshot_kimg": _EDM2_SNAPSHOT_KIMG}
_IMG512 = {"resolution": 64, "channels": 4, "batch": 2048, "conditional": True, "precision": "fp16", "optim.betas": (0.9, 0.99), "optim.eps": 1e-11, "optim.lr_decay_kimg": 143360.0, "ckpt_every_kimg": 8192.0, "sample_every_kimg": 16384.0, "ema.snapshot_kimg": _EDM2_SNAPSHOT_KIMG}

PRESETS: dict[str, dict] = {
    # CPU: the tiny U-Net on 28×28×1 (MNIST) and 32×32×3.
    "tiny-28-diffusion": {**_TINY, "resolution": 28, "channels": 1, "method": "diffusion", "kimg": 200.0, "optim.lr": 1e-2, "optim.lr_decay_kimg": 64.0, "optim.lr_rampup_kimg": 2.0, "loss.P_mean": -0.8, "loss.P_std": 1.6},
    # tiny-28-sct samples 2 steps at t_mid = 1.3, not the paper's 1.1: FD-MNIST 0.72×, 0.77× and 0.85× of 1.1's for two
    # training seeds and the demo's run (benchmarks/results/fidelity-cpu/, t_mid-demo/); tiny-28-scd keeps 1.1: 1.3
    # helps unguided students but made the demo's guided one worse (1.09×).
    "tiny-28-sct":       {**_TINY, "resolution": 28, "channels": 1, "method": "sct", "kimg": 100.0, "optim.lr": 1e-3, "optim.lr_decay_kimg": 64.0, "loss.P_mean": -1.0, "loss.P_std": 1.4, "loss.warmup_kimg": 1.0, "t_mid": 1.3},
    # tiny-28-scd samples t from its teacher's proposal P(−0.8, 1.6), not sCT's P(−1.0, 1.4): 2-step FD-MNIST 1.12× the
    # teacher vs 1.18× (paired over 3 sample seeds) in benchmarks/results/gpu/fidelity-sweep/; the same
    # change made sCT from the teacher's weights worse (1.02× vs 0.80×), so tiny-28-sct keeps P(−1.0, 1.4).
    "tiny-28-scd":       {**_TINY, "resolution": 28, "channels": 1, "method": "scd", "kimg": 100.0, "optim.lr": 1e-3, "optim.lr_decay_kimg": 64.0, "loss.P_mean": -0.8, "loss.P_std": 1.6, "loss.warmup_kimg": 1.0},
    "tiny-32-diffusion": {**_TINY, "resolution": 32, "channels": 3, "method": "diffusion", "kimg": 200.0, "optim.lr": 1e-2, "optim.lr_decay_kimg": 64.0, "optim.lr_rampup_kimg": 2.0, "loss.P_mean": -0.8, "loss.P_std": 1.6},
    "tiny-32-sct":       {**_TINY, "resolution": 32, "channels": 3, "method": "sct", "kimg": 100.0, "optim.lr": 1e-3, "optim.lr_decay_kimg": 64.0, "loss.P_mean": -1.0, "loss.P_std": 1.4, "loss.warmup_kimg": 1.0},
    "tiny-32-scd":       {**_TINY, "resolution": 32, "channels": 3, "method": "scd", "kimg": 100.0, "optim.lr": 1e-3, "optim.lr_decay_kimg": 64.0, "loss.P_mean": -1.0, "loss.P_std": 1.4, "loss.warmup_kimg": 1.0},

    # CPU: the tiny U-Net on 16×16×4 latents (`scm data encode` of 32×32×3 images with a small VAE of two down
    # blocks; normalised per channel to σ_d = 0.5 as in App. G.1); otherwise the tiny-32 settings.
    "tiny-latent-diffusion": {**_TINY, "resolution": 16, "channels": 4, "method": "diffusion", "kimg": 200.0, "optim.lr": 1e-2, "optim.lr_decay_kimg": 64.0, "optim.lr_rampup_kimg": 2.0, "loss.P_mean": -0.8, "loss.P_std": 1.6},
    "tiny-latent-sct":       {**_TINY, "resolution": 16, "channels": 4, "method": "sct", "kimg": 100.0, "optim.lr": 1e-3, "optim.lr_decay_kimg": 64.0, "loss.P_mean": -1.0, "loss.P_std": 1.4, "loss.warmup_kimg": 1.0},
    "tiny-latent-scd":       {**_TINY, "resolution": 16, "channels": 4, "method": "scd", "kimg": 100.0, "optim.lr": 1e-3, "optim.lr_decay_kimg": 64.0, "loss.P_mean": -1.0, "loss.P_std": 1.4, "loss.warmup_kimg": 1.0},

    # CPU: the tiny transformer (patch 4) on 28×28×1 and 32×32×3. Its weights are not magnitude-preserving, so Adam's
    # learning rates are a transformer's (DiT: 1e-4 at batch 256), not EDM2's; the CMs' is the teacher's × 0.1 as above.
    "dit-tiny-28-diffusion": {**_DIT_TINY, "resolution": 28, "channels": 1, "method": "diffusion", "kimg": 200.0, "optim.lr": 2e-3, "optim.lr_decay_kimg": 64.0, "optim.lr_rampup_kimg": 2.0, "loss.P_mean": -0.8, "loss.P_std": 1.6},
    "dit-tiny-28-sct":       {**_DIT_TINY, "resolution": 28, "channels": 1, "method": "sct", "kimg": 100.0, "optim.lr": 2e-4, "optim.lr_decay_kimg": 64.0, "loss.P_mean": -1.0, "loss.P_std": 1.4, "loss.warmup_kimg": 1.0},
    "dit-tiny-28-scd":       {**_DIT_TINY, "resolution": 28, "channels": 1, "method": "scd", "kimg": 100.0, "optim.lr": 2e-4, "optim.lr_decay_kimg": 64.0, "loss.P_mean": -1.0, "loss.P_std": 1.4, "loss.warmup_kimg": 1.0},
    "dit-tiny-32-diffusion": {**_DIT_TINY, "resolution": 32, "channels": 3, "method": "diffusion", "kimg": 200.0, "optim.lr": 2e-3, "optim.lr_decay_kimg": 64.0, "optim.lr_rampup_kimg": 2.0, "loss.P_mean": -0.8, "loss.P_std": 1.6},
    "dit-tiny-32-sct":       {**_DIT_TINY, "resolution": 32, "channels": 3, "method": "sct", "kimg": 100.0, "optim.lr": 2e-4, "optim.lr_decay_kimg": 64.0, "loss.P_mean": -1.0, "loss.P_std": 1.4, "loss.warmup_kimg": 1.0},
    "dit-tiny-32-scd":       {**_DIT_TINY, "resolution": 32, "channels": 3, "method": "scd", "kimg": 100.0, "optim.lr": 2e-4, "optim.lr_decay_kimg": 64.0, "loss.P_mean": -1.0, "loss.P_std": 1.4, "loss.warmup_kimg": 1.0},

    # CPU: the tiny transformer with cross-attention to prompts (dit-tiny-text) on captioned MNIST (`scm data encode
    # --text-encoder builtin --data mnist-captions`): the dit-tiny-28 settings, caption dropout 0.1 (CFG, as label
    # dropout); the sCD student takes the teacher's guidance scale s ~ U[1, 3] as an input (§5.2), as ImageNet's do,
    # and samples 2 steps at t_mid = 1.3: attribute agreement +0.7 points over 1.1 on fresh seeds, FD alike
    # (benchmarks/results/text-fidelity-t-mid.md).
    "dit-tiny-text-28-diffusion": {**_DIT_TINY, "net_preset": "dit-tiny-text", "resolution": 28, "channels": 1, "method": "diffusion", "kimg": 200.0, "optim.lr": 2e-3, "optim.lr_decay_kimg": 64.0, "optim.lr_rampup_kimg": 2.0, "loss.P_mean": -0.8, "loss.P_std": 1.6, "text.caption_dropout": 0.1},
    "dit-tiny-text-28-sct":       {**_DIT_TINY, "net_preset": "dit-tiny-text", "resolution": 28, "channels": 1, "method": "sct", "kimg": 100.0, "optim.lr": 2e-4, "optim.lr_decay_kimg": 64.0, "loss.P_mean": -1.0, "loss.P_std": 1.4, "loss.warmup_kimg": 1.0, "text.caption_dropout": 0.0},
    "dit-tiny-text-28-scd":       {**_DIT_TINY, "net_preset": "dit-tiny-text", "resolution": 28, "channels": 1, "method": "scd", "kimg": 100.0, "optim.lr": 2e-4, "optim.lr_decay_kimg": 64.0, "loss.P_mean": -0.8, "loss.P_std": 1.6, "loss.warmup_kimg": 1.0, "text.caption_dropout": 0.0, "net.guidance_embed": True, "loss.guidance": (1.0, 3.0), "t_mid": 1.3},

    # CPU: the tiny U-Net with cross-attention to prompts (tiny-text, Stable Diffusion's design in EDM2's form) on the
    # same captioned MNIST: the tiny-28 settings, with the text transformer's caption dropout and guidance range.
    "tiny-text-28-diffusion": {**_TINY, "net_preset": "tiny-text", "resolution": 28, "channels": 1, "method": "diffusion", "kimg": 200.0, "optim.lr": 1e-2, "optim.lr_decay_kimg": 64.0, "optim.lr_rampup_kimg": 2.0, "loss.P_mean": -0.8, "loss.P_std": 1.6, "text.caption_dropout": 0.1},
    "tiny-text-28-sct":       {**_TINY, "net_preset": "tiny-text", "resolution": 28, "channels": 1, "method": "sct", "kimg": 100.0, "optim.lr": 1e-3, "optim.lr_decay_kimg": 64.0, "loss.P_mean": -1.0, "loss.P_std": 1.4, "loss.warmup_kimg": 1.0, "text.caption_dropout": 0.0},
    "tiny-text-28-scd":       {**_TINY, "net_preset": "tiny-text", "resolution": 28, "channels": 1, "method": "scd", "kimg": 100.0, "optim.lr": 1e-3, "optim.lr_decay_kimg": 64.0, "loss.P_mean": -0.8, "loss.P_std": 1.6, "loss.warmup_kimg": 1.0, "text.caption_dropout": 0.0, "net.guidance_embed": True, "loss.guidance": (1.0, 3.0)},

    # CPU: the tiny video transformer (`video-tiny`, 1×4×4 patches, factorised attention) on 1-digit Moving MNIST clips
    # 1×8×32×32, and the tiny audio transformer (`audio-tiny`, 64-sample patches) on 1 s of 16 kHz audio; the
    # dit-tiny settings (a transformer's learning rates), batch 32. σ_d should be the data's std (§2): audio 0.1
    # (spoken-digits: 0.113, mostly silence; benchmarks/results/av-fidelity); video keeps 0.5 (moving-mnist-tiny's
    # std is 0.26; not yet measured at 0.25).
    "video-tiny-8x32-diffusion": {**_VIDEO_TINY, "method": "diffusion", "kimg": 100.0, "optim.lr": 2e-3, "optim.lr_decay_kimg": 32.0, "optim.lr_rampup_kimg": 1.0, "loss.P_mean": -0.8, "loss.P_std": 1.6},
    "video-tiny-8x32-sct":       {**_VIDEO_TINY, "method": "sct", "kimg": 50.0, "optim.lr": 2e-4, "optim.lr_decay_kimg": 32.0, "loss.P_mean": -1.0, "loss.P_std": 1.4, "loss.warmup_kimg": 1.0},
    "video-tiny-8x32-scd":       {**_VIDEO_TINY, "method": "scd", "kimg": 50.0, "optim.lr": 2e-4, "optim.lr_decay_kimg": 32.0, "loss.P_mean": -1.0, "loss.P_std": 1.4, "loss.warmup_kimg": 1.0},
    "audio-tiny-16k-diffusion":  {**_AUDIO_TINY, "method": "diffusion", "kimg": 100.0, "optim.lr": 2e-3, "optim.lr_decay_kimg": 32.0, "optim.lr_rampup_kimg": 1.0, "loss.P_mean": -0.8, "loss.P_std": 1.6},
    "audio-tiny-16k-sct":        {**_AUDIO_TINY, "method": "sct", "kimg": 50.0, "optim.lr": 2e-4, "optim.lr_decay_kimg": 32.0, "loss.P_mean": -1.0, "loss.P_std": 1.4, "loss.warmup_kimg": 1.0},
    "audio-tiny-16k-scd":        {**_AUDIO_TINY, "method": "scd", "kimg": 50.0, "optim.lr": 2e-4, "optim.lr_decay_kimg": 32.0, "loss.P_mean": -1.0, "loss.P_std": 1.4, "loss.warmup_kimg": 1.0},

    # CIFAR-10, unconditional 32×32, DDPM++-size U-Net, batch 512. Teacher: EDM's settings; CMs: RAdam 1e-4, constant.
    "cifar10-diffusion": {**_C10, "method": "diffusion", "kimg": 204800.0, "optim.lr": 1e-3, "optim.betas": (0.9, 0.999), "net.dropout": 0.13, "loss.P_mean": -1.2, "loss.P_std": 1.2},
    "cifar10-sct":       {**_C10, "method": "sct", "kimg": 102400.0, "optim.optimizer": "radam", "optim.lr": 1e-4, "net.dropout": 0.2, "loss.P_mean": -1.0, "loss.P_std": 1.4, "loss.warmup_kimg": 5120.0},
    "cifar10-scd":       {**_C10, "method": "scd", "kimg": 102400.0, "optim.optimizer": "radam", "optim.lr": 1e-4, "net.dropout": 0.0, "loss.P_mean": -1.0, "loss.P_std": 1.4, "loss.warmup_kimg": 5120.0},

    # ImageNet 64×64 pixels, class-conditional, EDM2 config G sizes, batch 2048.
    "img64-S-diffusion":  {**_IMG64, "method": "diffusion", "net_preset": "S", "kimg": 2146304.0, "optim.lr": 1e-2, "optim.lr_rampup_kimg": 10000.0, "net.dropout": 0.0, "net.label_dropout": 0.0, "loss.P_mean": -0.8, "loss.P_std": 1.6, "ema.stds": (0.075, 0.05)},
    "img64-S-sct":        {**_IMG64, "method": "sct", "net_preset": "S", "kimg": 819200.0, "optim.lr": 1e-4, "net.dropout": 0.45, "net.dropout_max_res": 16, "loss.P_mean": -1.0, "loss.P_std": 1.6, "loss.warmup_kimg": 20480.0, "ema.stds": (0.05,), "init_ema": 0.075},
    "img64-S-scd":        {**_IMG64, "method": "scd", "net_preset": "S", "kimg": 819200.0, "optim.lr": 1e-4, "net.dropout": 0.0, "loss.P_mean": -1.0, "loss.P_std": 1.6, "loss.warmup_kimg": 20480.0, "ema.stds": (0.05,), "init_ema": 0.075, "teacher_ema": 0.075},
    "img64-M-diffusion":  {**_IMG64, "method": "diffusion", "net_preset": "M", "kimg": 3043328.0, "optim.lr": 9e-3, "optim.lr_rampup_kimg": 10000.0, "net.dropout": 0.1, "net.label_dropout": 0.0, "loss.P_mean": -0.8, "loss.P_std": 1.6, "ema.stds": (0.06, 0.05)},
    "img64-M-sct":        {**_IMG64, "method": "sct", "net_preset": "M", "kimg": 819200.0, "optim.lr": 9e-5, "net.dropout": 0.45, "net.dropout_max_res": 16, "loss.P_mean": -1.0, "loss.P_std": 1.6, "loss.warmup_kimg": 20480.0, "ema.stds": (0.05,), "init_ema": 0.06},
    "img64-M-scd":        {**_IMG64, "method": "scd", "net_preset": "M", "kimg": 819200.0, "optim.lr": 9e-5, "net.dropout": 0.0, "loss.P_mean": -1.0, "loss.P_std": 1.6, "loss.warmup_kimg": 20480.0, "ema.stds": (0.05,), "init_ema": 0.06, "teacher_ema": 0.06},
    "img64-L-diffusion":  {**_IMG64, "method": "diffusion", "net_preset": "L", "kimg": 1558528.0, "optim.lr": 8e-3, "optim.lr_rampup_kimg": 10000.0, "net.dropout": 0.1, "net.label_dropout": 0.0, "loss.P_mean": -0.8, "loss.P_std": 1.6, "ema.stds": (0.04, 0.05)},
    "img64-L-sct":        {**_IMG64, "method": "sct", "net_preset": "L", "kimg": 819200.0, "optim.lr": 8e-5, "net.dropout": 0.45, "net.dropout_max_res": 16, "loss.P_mean": -1.0, "loss.P_std": 1.6, "loss.warmup_kimg": 20480.0, "ema.stds": (0.05,), "init_ema": 0.04},
    "img64-L-scd":        {**_IMG64, "method": "scd", "net_preset": "L", "kimg": 819200.0, "optim.lr": 8e-5, "net.dropout": 0.0, "loss.P_mean": -1.0, "loss.P_std": 1.6, "loss.warmup_kimg": 20480.0, "ema.stds": (0.05,), "init_ema": 0.04, "teacher_ema": 0.04},
    "img64-XL-diffusion": {**_IMG64, "method": "diffusion", "net_preset": "XL", "kimg": 1105920.0, "optim.lr": 7e-3, "optim.lr_rampup_kimg": 10000.0, "net.dropout": 0.1, "net.label_dropout": 0.0, "loss.P_mean": -0.8, "loss.P_std": 1.6, "ema.stds": (0.04, 0.05)},
    "img64-XL-sct":       {**_IMG64, "method": "sct", "net_preset": "XL", "kimg": 819200.0, "optim.lr": 7e-5, "net.dropout": 0.45, "net.dropout_max_res": 16, "loss.P_mean": -1.0, "loss.P_std": 1.6, "loss.warmup_kimg": 20480.0, "ema.stds": (0.05,), "init_ema": 0.04},
    "img64-XL-scd":       {**_IMG64, "method": "scd", "net_preset": "XL", "kimg": 819200.0, "optim.lr": 7e-5, "net.dropout": 0.0, "loss.P_mean": -1.0, "loss.P_std": 1.6, "loss.warmup_kimg": 20480.0, "ema.stds": (0.05,), "init_ema": 0.04, "teacher_ema": 0.04},

    # ImageNet 512×512 as 64×64×4 SD-VAE latents, class-conditional, label dropout 0.1 (CFG), batch 2048. The data:
    # `scm data encode --vae <sd-vae-ft-mse folder> --normalization sd-vae-ft-mse` of images prepared at 512×512.
    "img512-S-diffusion":   {**_IMG512, "method": "diffusion", "net_preset": "S", "kimg": 2146304.0, "optim.lr": 1e-2, "optim.lr_rampup_kimg": 10000.0, "net.dropout": 0.0, "net.label_dropout": 0.1, "loss.P_mean": -0.4, "loss.P_std": 1.0, "ema.stds": (0.025, 0.05)},
    "img512-S-sct":         {**_IMG512, "method": "sct", "net_preset": "S", "kimg": 204800.0, "optim.lr": 1e-4, "net.dropout": 0.25, "net.dropout_max_res": 16, "loss.P_mean": -0.8, "loss.P_std": 1.6, "loss.warmup_kimg": 20480.0, "ema.stds": (0.05,), "init_ema": 0.025},
    "img512-S-scd":         {**_IMG512, "method": "scd", "net_preset": "S", "kimg": 409600.0, "optim.lr": 1e-4, "net.dropout": 0.0, "net.guidance_embed": True, "loss.guidance": (1.0, 2.0), "loss.P_mean": -0.8, "loss.P_std": 1.6, "loss.warmup_kimg": 20480.0, "ema.stds": (0.05,), "init_ema": 0.025, "teacher_ema": 0.025},
    "img512-M-diffusion":   {**_IMG512, "method": "diffusion", "net_preset": "M", "kimg": 2146304.0, "optim.lr": 9e-3, "optim.lr_rampup_kimg": 10000.0, "net.dropout": 0.1, "net.label_dropout": 0.1, "loss.P_mean": -0.4, "loss.P_std": 1.0, "ema.stds": (0.03, 0.05)},
    "img512-M-sct":         {**_IMG512, "method": "sct", "net_preset": "M", "kimg": 204800.0, "optim.lr": 9e-5, "net.dropout": 0.35, "net.dropout_max_res": 16, "loss.P_mean": -0.8, "loss.P_std": 1.6, "loss.warmup_kimg": 20480.0, "ema.stds": (0.05,), "init_ema": 0.03},
    "img512-M-scd":         {**_IMG512, "method": "scd", "net_preset": "M", "kimg": 409600.0, "optim.lr": 9e-5, "net.dropout": 0.1, "net.guidance_embed": True, "loss.guidance": (1.0, 2.0), "loss.P_mean": -0.8, "loss.P_std": 1.6, "loss.warmup_kimg": 20480.0, "ema.stds": (0.05,), "init_ema": 0.03, "teacher_ema": 0.03},
    "img512-L-diffusion":   {**_IMG512, "method": "diffusion", "net_preset": "L", "kimg": 1425408.0, "optim.lr": 8e-3, "optim.lr_rampup_kimg": 10000.0, "net.dropout": 0.1, "net.label_dropout": 0.1, "loss.P_mean": -0.4, "loss.P_std": 1.0, "ema.stds": (0.015, 0.05)},
    "img512-L-sct":         {**_IMG512, "method": "sct", "net_preset": "L", "kimg": 204800.0, "optim.lr": 8e-5, "net.dropout": 0.35, "net.dropout_max_res": 16, "loss.P_mean": -0.8, "loss.P_std": 1.6, "loss.warmup_kimg": 20480.0, "ema.stds": (0.05,), "init_ema": 0.015},
    "img512-L-scd":         {**_IMG512, "method": "scd", "net_preset": "L", "kimg": 409600.0, "optim.lr": 8e-5, "net.dropout": 0.1, "net.guidance_embed": True, "loss.guidance": (1.0, 2.0), "loss.P_mean": -0.8, "loss.P_std": 1.6, "loss.warmup_kimg": 20480.0, "ema.stds": (0.05,), "init_ema": 0.015, "teacher_ema": 0.015},
    "img512-XL-diffusion":  {**_IMG512, "method": "diffusion", "net_preset": "XL", "kimg": 1224704.0, "optim.lr": 7e-3, "optim.lr_rampup_kimg": 10000.0, "net.dropout": 0.1, "net.label_dropout": 0.1, "loss.P_mean": -0.4, "loss.P_std": 1.0, "ema.stds": (0.02, 0.05)},
    "img512-XL-sct":        {**_IMG512, "method": "sct", "net_preset": "XL", "kimg": 204800.0, "optim.lr": 7e-5, "net.dropout": 0.35, "net.dropout_max_res": 16, "loss.P_mean": -0.8, "loss.P_std": 1.6, "loss.warmup_kimg": 20480.0, "ema.stds": (0.05,), "init_ema": 0.02},
    "img512-XL-scd":        {**_IMG512, "method": "scd", "net_preset": "XL", "kimg": 409600.0, "optim.lr": 7e-5, "net.dropout": 0.1, "net.guidance_embed": True, "loss.guidance": (1.0, 2.0), "loss.P_mean": -0.8, "loss.P_std": 1.6, "loss.warmup_kimg": 20480.0, "ema.stds": (0.05,), "init_ema": 0.02, "teacher_ema": 0.02},
    "img512-XXL-diffusion": {**_IMG512, "method": "diffusion", "net_preset": "XXL", "kimg": 770048.0, "optim.lr": 6.5e-3, "optim.lr_rampup_kimg": 10000.0, "net.dropout": 0.1, "net.label_dropout": 0.1, "loss.P_mean": -0.4, "loss.P_std": 1.0, "ema.stds": (0.015, 0.05)},
    "img512-XXL-sct":       {**_IMG512, "method": "sct", "net_preset": "XXL", "kimg": 204800.0, "optim.lr": 6.5e-5, "net.dropout": 0.35, "net.dropout_max_res": 16, "loss.P_mean": -0.8, "loss.P_std": 1.6, "loss.warmup_kimg": 20480.0, "ema.stds": (0.05,), "init_ema": 0.015},
    "img512-XXL-scd":       {**_IMG512, "method": "scd", "net_preset": "XXL", "kimg": 409600.0, "optim.lr": 6.5e-5, "net.dropout": 0.1, "net.guidance_embed": True, "loss.guidance": (1.0, 2.0), "loss.P_mean": -0.8, "loss.P_std": 1.6, "loss.warmup_kimg": 20480.0, "ema.stds": (0.05,), "init_ema": 0.015, "teacher_ema": 0.015},
}

# family → its methods, e.g. "tiny-28" → ("diffusion", "sct", "scd")
FAMILIES: dict[str, tuple[str, ...]] = {}
for _name, _preset in PRESETS.items():
    _family = _name.rsplit("-", 1)[0]
    FAMILIES[_family] = (*FAMILIES.get(_family, ()), _preset["method"])
