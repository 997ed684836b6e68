"""Per-frame figures of grey digit video (Moving MNIST), judged by the MNIST image classifier: the frames of a
clip seen as MNIST digits, and how steadily a clip shows one digit over time.

Frames → MNIST's 28×28 (`mnist_frames`): each frame is resized bilinearly to 64×64 (the standard Moving MNIST
frame, in which a digit is MNIST's own 28×28; moving-mnist-tiny's 32×32 frames and 14×14 digits are the same
scene at half scale, so ×2), then the 28×28 window centred on the frame's intensity centre of mass is cut
(MNIST's own centring rule), with the background value outside the frame. For one digit a frame this gives an
MNIST-like digit; for the two-digit set the window sits between the digits, so there only the distribution of
the windows is compared (FD-MNIST-frames), and no digit is read from them.

Temporal consistency (`temporal_consistency`) is a figure of ours, NOT FVD (which needs I3D weights that are
not available offline): the share of clips whose per-frame predicted digit is the same in every frame, and the
mean share of a clip's frames that agree with its majority digit. Real single-digit clips score near 1; clips
whose digit changes over time score low. It says nothing of whether the frames are digits at all (noise clips,
read as one class throughout, score high): read it beside FD-MNIST-frames.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from scm.errors import DataError

__all__ = ["MNIST_SIDE", "SCENE_SIDE", "mnist_frames", "temporal_consistency"]

MNIST_SIDE = 28  # the MNIST classifier's input
SCENE_SIDE = 64  # the standard Moving MNIST frame, in which a digit has MNIST's size


def _check_grey_clips(clips: torch.Tensor) -> None:
    if clips.ndim != 5 or clips.shape[1] != 1:
        raise DataError(f"clips: shape {list(clips.shape)}; per-frame MNIST figures take grey video "
                        "[N, 1, T, H, W]")


def mnist_frames(clips: torch.Tensor) -> torch.Tensor:
    """Grey clips [N, 1, T, H, W] in [-1, 1] → their frames as MNIST digits [N·T, 1, 28, 28] (module
    docstring), frame t of clip n at row n·T + t."""
    _check_grey_clips(clips)
    n, _, t, h, w = clips.shape
    frames = clips.float().transpose(1, 2).reshape(n * t, 1, h, w)
    if (h, w) != (SCENE_SIDE, SCENE_SIDE):
        frames = F.interpolate(frames, size=(SCENE_SIDE, SCENE_SIDE), mode="bilinear", align_corners=False)
    ink = (frames[:, 0] + 1).clamp(min=0)  # 0 on the background (-1)
    mass = ink.sum((1, 2)).clamp(min=1e-6)
    axis = torch.arange(SCENE_SIDE, dtype=ink.dtype)
    cy = (ink.sum(2) * axis).sum(1) / mass
    cx = (ink.sum(1) * axis).sum(1) / mass
    empty = ink.sum((1, 2)) < 1e-6  # a blank frame: the centre
    cy, cx = (torch.where(empty, torch.full_like(c, SCENE_SIDE / 2), c) for c in (cy, cx))
    half = MNIST_SIDE // 2
    top = (cy.round().long() - half).clamp(-half, SCENE_SIDE - half)
    left = (cx.round().long() - half).clamp(-half, SCENE_SIDE - half)
    padded = F.pad(frames, (half, half, half, half), value=-1.0)[:, 0]  # window corners now ≥ 0
    span = torch.arange(MNIST_SIDE)
    rows = (top + half)[:, None, None] + span[None, :, None]
    cols = (left + half)[:, None, None] + span[None, None, :]
    return padded[torch.arange(n * t)[:, None, None], rows, cols][:, None]


def temporal_consistency(frame_probs: torch.Tensor, frames: int) -> dict:
    """From per-frame class probabilities [N·T, K] (clip n's frames at rows n·T … n·T + T − 1):
    "temporal_consistency", the share of clips whose predicted class is the same in all T frames, and
    "frame_agreement", the mean over clips of the share of frames predicting the clip's most frequent class."""
    if frame_probs.ndim != 2 or frames < 1 or len(frame_probs) % frames:
        raise DataError(f"frame probabilities: shape {list(frame_probs.shape)} is not whole clips of {frames} "
                        "frames")
    pred = frame_probs.argmax(1).reshape(-1, frames)
    majority = pred.mode(dim=1).values
    agree = (pred == majority[:, None]).float().mean(1)
    return {"temporal_consistency": float((agree == 1).float().mean()), "frame_agreement": float(agree.mean())}
