"""Writing video and audio: model-space tensors in [-1, 1] to GIF, MP4, WAV and spectrogram PNGs, atomically.

Video clips are [C, T, H, W] (C = 1 or 3), batches [N, C, T, H, W]; audio is [C, L] at a sample rate, batches
[N, C, L]. Like `scm.images`, tensors first become uint8 frames [T, H, W, C] (`to_frames`, `video_grid`), which
the writers take (they also take a tensor clip directly). Every file goes through `scm.files.atomic_write`.

- GIF (Pillow): exact for frames of at most 256 colours (greyscale always); Pillow stores a frame identical to
  the one before it as a longer display of that frame, so such a GIF holds fewer frames that show the same thing.
- MP4 (PyAV, the `video` extra): H.264 (libx264, CRF 17) when the wheel's FFmpeg has it, else MPEG-4 part 2
  (q 2); yuv420p needs even sizes, so an odd height or width is padded by repeating the last row or column
  (nothing is scaled or lost; the frame is one pixel larger).
- WAV (stdlib `wave`): 16-bit PCM, value round(32767·x) for x clipped to [-1, 1].
- Spectrogram grids (PNG): one row per clip, log-magnitude of a Hann-windowed STFT in dB of full scale.
"""

from __future__ import annotations

import io
import wave
from pathlib import Path

import numpy as np
import torch

from scm.errors import InvalidSetting, MissingDependency, require_modules
from scm.files import atomic_write
from scm.images import grid, save_png, to_pil

__all__ = ["encode_wav", "mp4_codec", "save_gif", "save_gif_grid", "save_mp4", "save_spectrogram_grid",
           "save_wav", "spectrogram_grid", "to_frames", "to_int16", "video_grid"]


def _check_scale(scale) -> None:
    if not (isinstance(scale, int) and scale >= 1):
        raise InvalidSetting("scale", scale, "must be an int >= 1")


def to_frames(clip: torch.Tensor, scale: int = 1) -> np.ndarray:
    """A clip [C, T, H, W] in [-1, 1] → uint8 frames [T, H·scale, W·scale, C] (values clipped; `scale` enlarges
    by nearest-neighbour pixel repetition, for small clips in reports)."""
    if clip.ndim != 4 or clip.shape[0] not in (1, 3):
        raise InvalidSetting("clip", tuple(clip.shape), "must be a video clip [C, T, H, W] with C = 1 or 3")
    return video_grid(clip[None], nrow=1, pad=0, scale=scale)


def video_grid(clips: torch.Tensor, nrow: int | None = None, pad: int = 1, scale: int = 1) -> np.ndarray:
    """Tile N clips [N, C, T, H, W] side by side into uint8 frames [T, H', W', C]: frame t is `scm.images.grid` of
    the N clips' frame t (same layout, `pad` white pixels between clips, `scale` as in `to_frames`)."""
    if clips.ndim != 5 or clips.shape[1] not in (1, 3):
        raise InvalidSetting("clips", tuple(clips.shape), "must be video clips [N, C, T, H, W] with C = 1 or 3")
    _check_scale(scale)
    frames = clips.transpose(1, 2)  # [N, T, C, H, W]
    return np.stack([grid(frames[:, t], nrow=nrow, pad=pad, scale=scale) for t in range(frames.shape[1])])


def _as_frames(video) -> np.ndarray:
    """uint8 frames [T, H, W, C] from frames (returned as they are) or a tensor clip [C, T, H, W]."""
    if isinstance(video, torch.Tensor):
        return to_frames(video)
    frames = np.asarray(video)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[3] not in (1, 3) or frames.shape[0] < 1:
        raise InvalidSetting("frames", f"{frames.dtype} {frames.shape}", "must be uint8 [T, H, W, C] with C = 1 or 3")
    return frames


def _frame_ms(fps: float) -> int:
    """A GIF frame's display time: GIF counts in hundredths of a second, so fps is rounded to what it can show."""
    if not fps > 0:
        raise InvalidSetting("fps", fps, "must be > 0")
    return max(10, 10 * round(100 / fps))


def save_gif(video, path: str | Path, fps: float = 8) -> Path:
    """An animated GIF that loops forever, from uint8 frames [T, H, W, C] or a tensor clip [C, T, H, W]; atomic."""
    frames = _as_frames(video)
    images = [to_pil(f) for f in frames]
    duration = _frame_ms(fps)

    def write(tmp: Path) -> None:
        images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:], duration=duration, loop=0)

    return atomic_write(path, write)


def save_gif_grid(clips: torch.Tensor, path: str | Path, fps: float = 8, nrow: int | None = None, pad: int = 1,
                  scale: int = 1) -> Path:
    """N clips [N, C, T, H, W] side by side as one animated GIF (`video_grid`); atomic."""
    return save_gif(video_grid(clips, nrow=nrow, pad=pad, scale=scale), path, fps=fps)


def mp4_codec() -> str:
    """The video encoder MP4s are written with: "libx264" (H.264) when PyAV's FFmpeg has it, else "mpeg4"."""
    (av,) = require_modules("writing MP4 video", "video", "av")
    for name in ("libx264", "mpeg4"):
        try:
            av.codec.Codec(name, "w")
            return name
        except ValueError:  # PyAV's UnknownCodecError: this FFmpeg lacks the encoder; try the next one
            continue
    raise MissingDependency("writing MP4 video needs an H.264 (libx264) or MPEG-4 encoder, and the installed PyAV's "
                            "FFmpeg has neither: install PyAV's own wheel (pip install 'scm[video]')", extra="video")


def _pad_even(frames: np.ndarray) -> np.ndarray:
    """Pad height and width to even numbers by repeating the last row / column (yuv420p halves both)."""
    h, w = frames.shape[1:3]
    return np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")


def save_mp4(video, path: str | Path, fps: int = 8, codec: str | None = None) -> Path:
    """An MP4 (yuv420p; see the module docstring) from uint8 frames [T, H, W, C] or a tensor clip [C, T, H, W];
    atomic. `codec` is "libx264" or "mpeg4" (default: `mp4_codec()`). Needs PyAV (`pip install 'scm[video]'`)."""
    (av,) = require_modules("writing MP4 video", "video", "av")
    codec = codec or mp4_codec()
    if codec not in ("libx264", "mpeg4"):
        raise InvalidSetting("codec", codec, 'must be "libx264" or "mpeg4"')
    frames = _pad_even(_as_frames(video))
    if frames.shape[3] == 1:
        frames = np.repeat(frames, 3, axis=3)
    if not (isinstance(fps, int) and fps >= 1):
        raise InvalidSetting("fps", fps, "must be an int >= 1 for MP4")

    def write(tmp: Path) -> None:
        with av.open(str(tmp), mode="w", format="mp4") as container:
            stream = container.add_stream(codec, rate=fps)
            stream.height, stream.width = frames.shape[1:3]
            stream.pix_fmt = "yuv420p"
            if codec == "libx264":
                stream.options = {"crf": "17"}  # near-transparent quality; tiny report clips stay small anyway
            elif hasattr(stream.codec_context, "qscale"):  # PyAV >= 14 or so
                stream.codec_context.qscale = 2  # MPEG-4 part 2 at a fixed, fine quantiser (1 best … 31 worst)
            else:
                stream.bit_rate = 8_000_000  # generous for the small clips of reports
            for array in frames:
                container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(array), format="rgb24")))
            container.mux(stream.encode())  # flush the encoder's delayed frames

    return atomic_write(path, write)


def to_int16(audio) -> np.ndarray:
    """Audio [C, L] (tensor or array) in [-1, 1] → int16 [C, L]: round(32767·x), x clipped to [-1, 1]."""
    x = audio.detach().cpu().double().numpy() if isinstance(audio, torch.Tensor) else np.asarray(audio, np.float64)
    if x.ndim != 2 or x.shape[1] < 1:
        raise InvalidSetting("audio", x.shape, "must be audio [C, L] with L >= 1")
    return np.round(np.clip(x, -1.0, 1.0) * 32767).astype(np.int16)


def encode_wav(audio, sample_rate: int) -> bytes:
    """Audio [C, L] in [-1, 1] as the bytes of a 16-bit PCM WAV file (channels interleaved), in memory."""
    if not (isinstance(sample_rate, int) and sample_rate >= 1):
        raise InvalidSetting("sample_rate", sample_rate, "must be an int >= 1 (Hz)")
    samples = to_int16(audio)
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(samples.shape[0])
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes(samples.T.astype("<i2").tobytes())
    return buf.getvalue()


def save_wav(audio, path: str | Path, sample_rate: int) -> Path:
    """Audio [C, L] in [-1, 1] as a 16-bit PCM WAV file, atomically."""
    return atomic_write(path, encode_wav(audio, sample_rate))


def spectrogram_grid(audios: torch.Tensor, n_fft: int = 256, hop: int = 64, floor_db: float = -100.0,
                     pad: int = 1) -> np.ndarray:
    """N clips [N, C, L] (channels averaged) as one uint8 greyscale image [H, W, 1], one spectrogram per row with
    `pad` white pixels between rows: time runs right, frequency up (0 Hz at the bottom), and brightness is the
    log-magnitude of a Hann-windowed STFT in dB of full scale (a full-scale sine is 0 dB, white), from `floor_db`
    (black) to 0. The fixed scale keeps grids of different runs or training steps comparable."""
    if audios.ndim != 3 or audios.shape[-1] < 1:
        raise InvalidSetting("audios", tuple(audios.shape), "must be audio clips [N, C, L]")
    mono = audios.detach().cpu().float().clamp(-1, 1).mean(dim=1)
    window = torch.hann_window(n_fft)
    spec = torch.stft(mono, n_fft, hop_length=hop, window=window, center=True, pad_mode="constant",
                      return_complex=True).abs()  # [N, n_fft/2 + 1, frames]
    db = 20 * torch.log10(spec / (window.sum() / 2) + 1e-12)
    levels = ((db.clamp(floor_db, 0) - floor_db) / -floor_db * 255).round().to(torch.uint8).flip(1)
    n, h, w = levels.shape
    out = np.full((n * (h + pad) + pad, w + 2 * pad, 1), 255, dtype=np.uint8)
    for i in range(n):
        out[pad + i * (h + pad): pad + i * (h + pad) + h, pad: pad + w, 0] = levels[i].numpy()
    return out


def save_spectrogram_grid(audios: torch.Tensor, path: str | Path, n_fft: int = 256, hop: int = 64,
                          scale: int = 1) -> Path:
    """`spectrogram_grid` of N clips [N, C, L] as a PNG (enlarged `scale` times, nearest neighbour); atomic."""
    _check_scale(scale)
    image = spectrogram_grid(audios, n_fft=n_fft, hop=hop)
    if scale > 1:
        image = image.repeat(scale, axis=0).repeat(scale, axis=1)
    return save_png(image, path)

