"""Video and audio outputs: tiny runs trained for two steps on clips in memory (a video sCD student of a video
teacher at 8 fps, an audio sCT run at 16 kHz) record their data's rate (RUN/media.json) and write their training
samples (a GIF grid; spectrograms and WAVs); `scm sample` writes every output kind of each modality, read back here
(GIF frames, MP4 decoded with PyAV, WAV headers, arrays) and equal to `generate`; outputs of another modality are
refused before anything is sampled; `scm export` round-trips to `generate`; `scm serve` answers GIF and audio
JSON."""

import io
import json
import subprocess
import sys
import wave

import numpy as np
import pytest
import torch
from PIL import Image

from scm.config import make_config
from scm.data import ImageData
from scm.generate import Sampler, generate
from scm.media import spectrogram_grid, to_frames, video_grid
from scm.runs import load_run
from scm.train import train

from conftest import cli

FPS, RATE, CLASSES = 5.0, 16000, 3
RUN = ["progress=false", "tensorboard=false", "sample_count=2", "sample_ode_steps=2", "log_every=1", "net.depth=1"]


def _clips() -> ImageData:
    """8 clips of a bright square moving right, 8 frames of 32×32, at FPS (not the default rate: recorded)."""
    x = torch.full((8, 1, 8, 32, 32), -1.0)
    for i in range(8):
        for t in range(8):
            x[i, 0, t, 8 + i % 4: 16 + i % 4, 2 * t: 2 * t + 8] = 1.0
    return ImageData(x, torch.arange(8) % CLASSES, "moving squares", value_range="raw", media={"fps": FPS})


def _waves() -> ImageData:
    """8 one-second sines of different pitches at RATE."""
    t = torch.arange(16000) / RATE
    x = torch.stack([0.5 * torch.sin(2 * torch.pi * (220 * (1 + i)) * t) for i in range(8)])[:, None]
    return ImageData(x, None, "sines", value_range="raw", media={"sample_rate": RATE})


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: these networks are small, and two threads on a shared two-core machine wait for each
    other (measured 40× slower when another process holds a core)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, one_thread):
    """A video teacher and its sCD student, an audio sCT run: two training steps each, samples at the end."""
    root = tmp_path_factory.mktemp("av")
    clips = _clips()
    teacher = root / "video-teacher"
    train(make_config("video-tiny-8x32-diffusion", None, RUN, out=str(teacher), kimg=0.008, batch=4,
                      conditional=True), data=clips)
    student = root / "video-scd"
    train(make_config("video-tiny-8x32-scd", None, [*RUN, "loss.warmup_kimg=0.004"], out=str(student), kimg=0.008,
                      batch=4, conditional=True, teacher=str(teacher)), data=clips)
    audio = root / "audio-sct"
    train(make_config("audio-tiny-16k-sct", None, RUN, out=str(audio), kimg=0.008, batch=4), data=_waves())
    return {"teacher": teacher, "video": student, "audio": audio}


def _reference(run_dir, n: int, steps: int = 1, seed: int = 0) -> torch.Tensor:
    x, _ = generate(load_run(run_dir), n, Sampler(steps=steps), batch=n, seed=seed, progress=False)
    return x


def _gif_frames(source) -> list[np.ndarray]:
    img = Image.open(source)
    frames = []
    for i in range(img.n_frames):
        img.seek(i)
        frames.append(np.asarray(img.convert("L")))
    return frames


def _wav(source) -> tuple[int, int, int, np.ndarray]:
    with wave.open(str(source) if not isinstance(source, io.BytesIO) else source, "rb") as w:
        data = np.frombuffer(w.readframes(w.getnframes()), "<i2")
        return w.getframerate(), w.getnframes(), w.getnchannels(), data


# -- the run directory ---------------------------------------------------------------------------------------------
def test_runs_record_their_media_and_write_training_samples(runs):
    assert json.loads((runs["video"] / "media.json").read_text()) == {"modality": "video", "fps": FPS, "frames": 8,
                                                                       "stride": 8}
    assert json.loads((runs["audio"] / "media.json").read_text()) == {"modality": "audio", "sample_rate": RATE}
    assert load_run(runs["video"]).media["fps"] == FPS and load_run(runs["audio"]).modality == "audio"
    teacher_grid = sorted((runs["teacher"] / "samples").glob("*heun-nfe3.gif"))
    assert len(teacher_grid) == 1 and len(_gif_frames(teacher_grid[0])) == 8
    for name in ("1step", "2step"):
        (gif,) = (runs["video"] / "samples").glob(f"*-{name}.gif")
        assert Image.open(gif).info["duration"] == 1000 / FPS
        (png,) = (runs["audio"] / "samples").glob(f"*-{name}.png")
        assert Image.open(png).size[::-1] == spectrogram_grid(torch.zeros(2, 1, 16000)).shape[:2]
        wavs = sorted((runs["audio"] / "samples").glob(f"*-{name}-*.wav"))
        assert len(wavs) == 2 and all(_wav(w)[:3] == (RATE, 16000, 1) for w in wavs)


# -- scm sample ----------------------------------------------------------------------------------------------------
def test_sample_writes_video_as_gif_mp4_folder_and_arrays(runs, tmp_path):
    av = pytest.importorskip("av", reason="MP4 needs PyAV: pip install scm[video]")
    ref = _reference(runs["video"], 2)
    grid_frames = video_grid(ref)
    for out in ("clips.gif", "clips.mp4", "folder", "clips.npz"):
        code, text = cli("sample", "--ckpt", runs["video"], "--n", 2, "--steps", 1, "--out", tmp_path / out)
        assert code == 0 and "2 clips" in text, text
    gif = _gif_frames(tmp_path / "clips.gif")
    assert len(gif) == 8 and all(np.array_equal(g, f[..., 0]) for g, f in zip(gif, grid_frames, strict=True))
    with av.open(str(tmp_path / "clips.mp4")) as container:
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        assert float(container.streams.video[0].average_rate) == FPS
    height, width = grid_frames.shape[1:3]
    assert len(decoded) == 8 and decoded[0].shape == (height + height % 2, width + width % 2, 3)
    folder = tmp_path / "folder"
    assert sorted(p.name for p in folder.iterdir()) == ["000000.gif", "000000.mp4", "000001.gif", "000001.mp4",
                                                        "grid.gif"]
    assert np.array_equal(_gif_frames(folder / "000001.gif")[3], to_frames(ref[1])[3, :, :, 0])
    arrays = np.load(tmp_path / "clips.npz")
    assert arrays["x"].shape == (2, 1, 8, 32, 32) and float(arrays["fps"]) == FPS
    np.testing.assert_allclose(arrays["x"], ref.clamp(-1, 1).numpy(), atol=1e-6)


def test_sample_writes_audio_as_wav_spectrograms_folder_and_arrays(runs, tmp_path):
    ref = _reference(runs["audio"], 2)
    code, text = cli("sample", "--ckpt", runs["audio"], "--n", 1, "--steps", 1, "--out", tmp_path / "one.wav")
    assert code == 0, text
    rate, length, channels, data = _wav(tmp_path / "one.wav")
    assert (rate, length, channels) == (RATE, 16000, 1)
    assert np.abs(data / 32767 - ref[0, 0].clamp(-1, 1).numpy()).max() <= 0.5 / 32767 + 1e-6
    for out in ("spectrograms.png", "folder", "clips.npz"):
        code, text = cli("sample", "--ckpt", runs["audio"], "--n", 2, "--steps", 1, "--out", tmp_path / out)
        assert code == 0, text
    assert np.array_equal(np.asarray(Image.open(tmp_path / "spectrograms.png")), spectrogram_grid(ref)[..., 0])
    folder = tmp_path / "folder"
    assert sorted(p.name for p in folder.iterdir()) == ["000000.wav", "000001.wav", "spectrograms.png"]
    assert all(_wav(folder / f"00000{i}.wav")[:3] == (RATE, 16000, 1) for i in range(2))
    arrays = np.load(tmp_path / "clips.npz")
    assert arrays["x"].shape == (2, 1, 16000) and int(arrays["sample_rate"]) == RATE
    np.testing.assert_allclose(arrays["x"], ref.clamp(-1, 1).numpy(), atol=1e-6)


@pytest.mark.parametrize(("run", "out", "needle"), [
    ("video", "x.png", "video run"), ("video", "x.wav", "video run"), ("audio", "x.mp4", "audio run"),
    ("audio", "x.gif", "audio run"), ("audio", "two.wav", "one clip")])
def test_outputs_that_do_not_fit_the_run_are_refused_before_sampling(runs, tmp_path, run, out, needle):
    code, text = cli("sample", "--ckpt", runs[run], "--n", 2, "--out", tmp_path / out)
    assert code == 2 and f"--out {tmp_path / out}" in text and needle in text and "Traceback" not in text, text
    assert not (tmp_path / out).exists()


def test_the_refusal_comes_before_torch_is_imported(runs, tmp_path):
    code = ("import sys\nfrom scm.app.cli import app\ntry:\n    app(sys.argv[1:])\nexcept SystemExit as e:\n"
            "    print('exit', e.code, 'torch' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", code, "sample", "--ckpt", str(runs["audio"]), "--out",
                           str(tmp_path / "x.mp4")], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "exit 2 False" and "audio run" in done.stderr, (done.stdout, done.stderr)


# -- scm export -----------------------------------------------------------------------------------------------------
def test_export_round_trips_to_generate(runs, tmp_path):
    pytest.importorskip("diffusers", reason="the export needs diffusers: pip install scm[diffusers]")
    from scm.diffusers import SCMPipeline
    from scm.errors import SamplerError

    for name in ("video", "audio"):
        code, text = cli("export", runs[name], tmp_path / name)
        assert code == 0, text
    video = SCMPipeline.from_pretrained(tmp_path / "video")
    ref = _reference(runs["video"], 2, steps=2, seed=5)
    out = video(batch_size=2, num_inference_steps=2, seed=5, output_type="np")
    assert out.fps == FPS and video.config.media["fps"] == FPS and out.frames.shape == (2, 8, 32, 32, 1)
    expected = (ref * 0.5 + 0.5).clamp(0, 1).permute(0, 2, 3, 4, 1).numpy()
    assert np.abs(out.frames - expected).max() <= 1e-5
    pt = video(batch_size=2, num_inference_steps=2, seed=5, output_type="pt").frames
    assert pt.shape == (2, 8, 1, 32, 32) and torch.equal(pt.permute(0, 1, 3, 4, 2), torch.from_numpy(out.frames))
    pil = video(batch_size=2, num_inference_steps=2, seed=5, output_type="pil").frames
    assert len(pil) == 2 and len(pil[0]) == 8 and np.array_equal(np.asarray(pil[1][4]), to_frames(ref[1])[4, :, :, 0])

    audio = SCMPipeline.from_pretrained(tmp_path / "audio")
    ref = _reference(runs["audio"], 2, steps=1, seed=5)
    out = audio(batch_size=2, num_inference_steps=1, seed=5, output_type="np")
    assert out.sample_rate == RATE and out.audios.shape == (2, 1, 16000)
    assert np.abs(out.audios - ref.clamp(-1, 1).numpy()).max() <= 1e-5
    with pytest.raises(SamplerError, match="output_type"):
        audio(batch_size=1, output_type="pil")


# -- scm serve ------------------------------------------------------------------------------------------------------
def test_serve_answers_a_gif_for_video_and_wavs_for_audio(runs):
    pytest.importorskip("starlette", reason="scm serve needs starlette and uvicorn: pip install scm[serve]")
    pytest.importorskip("uvicorn", reason="scm serve needs starlette and uvicorn: pip install scm[serve]")
    from test_serve import get, running

    from scm.serve import ServedModel, create_app

    video = create_app(ServedModel(load_run(runs["video"]), "student"), warm_up=False, threads=1)
    with running(video) as url:
        status, _, body = get(url, "/api/info")
        info = json.loads(body)["student"]
        assert status == 200 and (info["modality"], info["fps"], info["frames"]) == ("video", FPS, 8)
        status, headers, body = get(url, "/api/generate?seed=3&steps=1&batch=1")
        assert status == 200 and headers["content-type"] == "image/gif" and headers["x-images"] == "1"
        frames = _gif_frames(io.BytesIO(body))
        ref = to_frames(_reference(runs["video"], 1, seed=3)[0])
        assert len(frames) == 8 and all(np.array_equal(g, f[..., 0]) for g, f in zip(frames, ref, strict=True))
        _, headers, _ = get(url, "/")
        assert "media-src blob:" in headers["content-security-policy"]
    audio = create_app(ServedModel(load_run(runs["audio"]), "student"), warm_up=False, threads=1)
    with running(audio) as url:
        info = json.loads(get(url, "/api/info")[2])["student"]
        assert (info["modality"], info["sample_rate"], info["length"]) == ("audio", RATE, 16000)
        status, headers, body = get(url, "/api/generate?seed=1&steps=1&batch=4")
        assert status == 200 and headers["content-type"] == "application/json" and headers["x-images"] == "4"
        answer = json.loads(body)
        assert answer["sample_rate"] == RATE and len(answer["clips"]) == 4
        import base64

        for clip in answer["clips"]:
            assert _wav(io.BytesIO(base64.b64decode(clip)))[:3] == (RATE, 16000, 1)
        spectrogram = Image.open(io.BytesIO(base64.b64decode(answer["spectrogram"])))
        assert spectrogram.size[::-1] == spectrogram_grid(torch.zeros(4, 1, 16000)).shape[:2]
