"""What a server holds of a run: what it can be asked for, the validation of a request's parameters, and one
generation encoded as PNG (images), an animated GIF (video) or JSON with WAVs (audio). No web framework here
(`scm.serve.app` is the web side), so all of this works, and is checked, without one.

A request's parameters arrive as strings. Each is parsed strictly (an integer is digits only, no sign, spaces or
underscores) and checked against the model: a value that does not fit raises `InvalidSetting` with `key` = the
parameter's name, which the web side answers with HTTP 400. Parameters nobody asked for, or given twice, are
refused too, so no request can carry anything the server would silently ignore (file paths included: the runs
are loaded once, from the command line). An error repeats at most `ECHO_MAX` characters of a name or value it
refuses (`bounded_echo`): an answer never grows with what it was sent.

A text model (`Conditioning.kind` "text") takes a `prompt`: text of at most `scm.text.MAX_PROMPT_CHARS` characters
without NUL ("" for none), required as `scm sample` requires one; its /api/info gives a few example prompts
(`example_prompts`). Requests with different prompts are generated together (`generate_items`' items carry them).

Video and audio runs (their modality and rate: `LoadedRun.media`, RUN/media.json) are served in forms a browser
plays without plug-ins or codecs of its own:
- video: one animated GIF (the clip, or the clips side by side as `scm.media.video_grid` tiles them) that loops at
  the data's frame rate. GIF rather than MP4: an <img> plays it at once, without a <video> element's autoplay rules
  or an H.264 decoder (which some browser builds lack), the greyscale or few-colour frames of small clips are
  exact in it (MP4's yuv420p is lossy and needs even sizes), the page's image path stays as it is (one blob, one
  <img>), and the server needs no PyAV;
- audio: JSON {"sample_rate", "channels", "length", "clips": [one 16-bit PCM WAV per clip, base64], "spectrogram":
  a PNG of the clips' spectrograms, one row per clip, base64}: several clips in one answer, each for an <audio>
  element, with no file kept on the server (nothing a request says reaches a file) and the latest-wins queue
  unchanged.
"""

from __future__ import annotations

import base64
import io
import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

from scm.conditioning import Conditioning
from scm.errors import ConfigError, InvalidSetting, RunError
from scm.generate import Sampler, generate_items, sample_shape
from scm.images import encode_png, grid, to_pil, to_uint8
from scm.media import encode_wav, spectrogram_grid, to_frames, video_grid
from scm.runs import LoadedRun
from scm.sampling import TEACHER_NFE
from scm.text import MAX_PROMPT_CHARS, check_prompts

__all__ = ["BATCHES", "CONSISTENCY_STEPS", "DIFFUSION_NFES", "ECHO_MAX", "GUIDANCE_DECIMALS", "GUIDANCE_MAX",
           "MNIST_PROMPTS", "PARAMETERS", "SEED_MAX", "Query", "ServedModel", "bounded_echo", "captured_batch",
           "check_pair",
           "example_prompts", "parse_query"]

SEED_MAX = 2**31 - 1
BATCHES = (1, 4, 16)                 # images per request: one image, or a 2×2 / 4×4 grid
CONSISTENCY_STEPS = (1, 2, 4)        # consistency runs: sampling steps (= network evaluations)
DIFFUSION_NFES = (3, 5, 9, 17, TEACHER_NFE)  # diffusion runs served on their own: Heun NFEs (2N − 1 evaluations)
GUIDANCE_MAX = 10.0                  # guidance scales accepted: 0 < s <= GUIDANCE_MAX, …
GUIDANCE_DECIMALS = 6                # … written with at most this many decimals ("1.5", not "1e1")
ECHO_MAX = 64                        # characters of a request's own text that an error message repeats
# every parameter /api/generate accepts; `model` picks the student or the teacher, `client` names the page
# (a newer request with the same client id supersedes an older one that has not started: scm.serve.app)
PARAMETERS = ("model", "client", "seed", "steps", "class", "guidance", "batch", "prompt")
EXAMPLES = 8                         # example prompts /api/info gives a text model
# example prompts for a text run whose sample-grid prompts are not recorded: captions of captioned MNIST's grammar
# (`scm.data.captions`), one per phrasing and digit
MNIST_PROMPTS = ("a thick seven", "the number three", "two, thin and slanted right", "a small upright digit 4",
                 "an eight", "a large left-leaning zero", "nine, thick", "a thin right-leaning digit 1")
_DIGITS = re.compile(r"[0-9]{1,10}")
_DECIMAL = re.compile(rf"[0-9]{{1,3}}(\.[0-9]{{0,{GUIDANCE_DECIMALS}}})?|\.[0-9]{{1,{GUIDANCE_DECIMALS}}}")
_CLIENT = re.compile(r"[A-Za-z0-9_-]{1,64}")


@dataclass(frozen=True)
class Query:
    """One validated generation request."""

    model: str = "student"
    client: str | None = None
    seed: int = 0
    steps: int = 1
    class_label: int | None = None
    guidance: float | None = None
    batch: int = 1
    prompt: str | None = None  # a text model's (required there; None elsewhere)


@dataclass
class Generated:
    body: bytes        # PNG (images), GIF (video) or JSON (audio): `media_type`
    images: int        # images or clips
    seconds: float     # network and sampler only (`generate`'s time): no decoding, no PNG encoding
    nfe: int
    width: int
    height: int
    batched: int = 1   # requests generated together in the same network call
    media_type: str = "image/png"

    @property
    def png(self) -> bytes:
        """The PNG of an image model's answer (its `body`)."""
        return self.body


def encode_gif(frames, fps: float) -> bytes:
    """uint8 frames [T, H, W, C] as the bytes of an animated GIF that loops forever, in memory (as
    `scm.media.save_gif` writes one: a frame shows for fps rounded to GIF's hundredths of a second)."""
    images = [to_pil(f) for f in frames]
    buf = io.BytesIO()
    images[0].save(buf, format="GIF", save_all=True, append_images=images[1:], loop=0,
                   duration=max(10, 10 * round(100 / fps)))
    return buf.getvalue()


def encode_sample(samples, media: dict) -> tuple[bytes, str, int, int]:
    """(body, media type, width, height) of one answer's samples [B, C, …] in [-1, 1] (module docstring): a PNG
    image or grid, a GIF clip or grid of clips, or audio JSON (width and height: its spectrogram's)."""
    b64 = lambda data: base64.b64encode(data).decode("ascii")  # noqa: E731
    if media["modality"] == "video":
        frames = video_grid(samples) if len(samples) > 1 else to_frames(samples[0])
        return encode_gif(frames, media["fps"]), "image/gif", frames.shape[2], frames.shape[1]
    if media["modality"] == "audio":
        spectrogram = spectrogram_grid(samples)
        body = {"sample_rate": media["sample_rate"], "channels": samples.shape[1], "length": samples.shape[2],
                "clips": [b64(encode_wav(clip, media["sample_rate"])) for clip in samples],
                "spectrogram": b64(encode_png(spectrogram))}
        return json.dumps(body).encode(), "application/json", spectrogram.shape[1], spectrogram.shape[0]
    array = grid(samples) if len(samples) > 1 else to_uint8(samples)[0]
    return encode_png(array), "image/png", array.shape[1], array.shape[0]


def _class_names(run: LoadedRun, n: int) -> list[str]:
    """The names of a conditional run's n classes: those its prepared data directory records, else the ids."""
    names = [str(i) for i in range(n)]
    try:
        meta = json.loads((Path(str(run.cfg.data)) / "meta.json").read_text())
        given = meta.get("class_names") if isinstance(meta, dict) else None
    except (OSError, ValueError, TypeError):
        return names
    if isinstance(given, list) and len(given) == n and all(isinstance(s, str) for s in given):
        return given
    return names


def example_prompts(run: LoadedRun, n: int = EXAMPLES) -> list[str]:
    """A few prompts to offer for a text run: its sample-grid prompts where the run recorded them
    (RUN/samples/prompts.txt: one per line, or "NAME<TAB>prompt" lines as `scm sample` writes), distinct, in order;
    else `MNIST_PROMPTS`."""
    path = run.checkpoint.parent.parent / "samples" / "prompts.txt"
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        lines = []
    found = [line.split("\t", 1)[-1].strip() for line in lines]
    try:
        found = check_prompts([p for p in dict.fromkeys(found) if p])
    except ConfigError:  # a recorded prompt the server would refuse is no example
        found = []
    return found[:n] or list(MNIST_PROMPTS[:n])


class ServedModel:
    """A loaded run as the server offers it: the allowed steps (consistency) or NFEs (diffusion, Heun), whether
    it takes classes, prompts and a guidance scale, and `generate(query)` → PNG bytes and timings.

    `steps` overrides the allowed step counts / NFEs (a teacher beside a student is served at one NFE); `t_mid`
    the intermediate time of a consistency run's 2+ steps (default: the run's own). `captured`: a consistency run's
    sampler and network as one compiled graph per (batch, steps) (`generate`; CUDA graphs on a GPU), the joint
    batch padded to a power of two so that few shapes occur; `warm_up` captures the request sizes at the default
    steps before the first request (and every padded joint size up to the server's largest joint batch, when given),
    other sizes and steps on their first use."""

    def __init__(self, run: LoadedRun, name: str, *, steps: Iterable[int] | None = None,
                 default_steps: int | None = None, batches: Iterable[int] = BATCHES, t_mid: float | None = None,
                 captured: bool = False):
        self.run, self.name, self.t_mid = run, name, t_mid
        cfg = run.cfg
        self.diffusion = cfg.method == "diffusion"
        self.captured = captured and not self.diffusion  # a diffusion run's ODE is not captured (`generate`)
        self.steps = tuple(steps) if steps is not None else (DIFFUSION_NFES if self.diffusion else CONSISTENCY_STEPS)
        for k in self.steps:  # validated once, here: every allowed value is a valid sampler for this run
            self.sampler(k).times(run)
        if default_steps is None:
            default_steps = self._recommended_steps()
        if default_steps not in self.steps:
            raise InvalidSetting("steps", default_steps, f"not one of the allowed {list(self.steps)}")
        self.default_steps = default_steps
        self.batches = tuple(sorted(batches))
        self.media, shape = run.media, sample_shape(run)
        self.modality, self.channels = self.media["modality"], shape[0]
        self.height, self.width = (shape[-2], shape[-1]) if self.modality != "audio" else (None, None)
        if run.latent is not None:  # the VAE is loaded (and its absence reported) before the server starts
            from scm.data.latents import decoder

            decoder(run.latent)
        if self.channels not in (1, 3) and self.modality != "audio":
            raise RunError(f"{name}: its samples have {self.channels} channels; a page shows images of 1 or 3")
        # classes, and guidance (classifier-free for a conditional diffusion run, the input of an sCD student
        # distilled with it) with its default: the run's conditioning, as `generate` and `scm sample` take it
        self.conditioning = Conditioning.of_run(cfg)
        self.classes = self.conditioning.classes
        self.class_names = _class_names(run, self.classes) if self.classes else []
        self.takes_guidance = self.conditioning.guidance != "none"
        self.default_guidance = self.conditioning.default_guidance
        self.takes_prompt = self.conditioning.kind == "text"
        self.example_prompts = example_prompts(run) if self.takes_prompt else []
        self._any_prompt = "" if self.takes_prompt else None  # what checks of the other parameters assume
        self.device = next(run.net.parameters()).device

    # -- what it offers -------------------------------------------------------------------------------------------
    def _recommended_steps(self) -> int:
        """The allowed step count a request without one gets: 2 steps for a consistency run (the first allowed
        without 2); for a diffusion run the allowed NFE nearest TEACHER_NFE, the one it is normally sampled at
        (its smallest NFEs give noise)."""
        if not self.diffusion:
            return 2 if 2 in self.steps else self.steps[0]
        return min(self.steps, key=lambda nfe: (abs(nfe - TEACHER_NFE), -nfe))

    def guidance_range(self) -> dict | None:
        """The guidance scales a request may ask for (exactly what `check` accepts): min < s <= max, with at most
        `decimals` decimals, and the one used when none is asked; None for a model that takes none."""
        if not self.takes_guidance:
            return None
        return {"min": 0.0, "min_exclusive": True, "max": GUIDANCE_MAX, "default": self.default_guidance,
                "decimals": GUIDANCE_DECIMALS}

    def sampler(self, steps: int) -> Sampler:
        return Sampler(nfe=steps, solver="heun", t_mid=self.t_mid) if self.diffusion \
            else Sampler(steps=steps, t_mid=self.t_mid)  # a t_mid for a diffusion run is refused

    def describe(self) -> dict:
        cfg = self.run.cfg
        return {
            "name": self.name,
            "run": self.run.checkpoint.parent.parent.name,
            "method": cfg.method,
            "sampler": "Heun ODE" if self.diffusion else "consistency",
            "steps_kind": "nfe" if self.diffusion else "steps",
            "steps": list(self.steps),
            "default_steps": self.default_steps,
            "t_mid": None if self.diffusion else self.sampler(2).mid(self.run),
            "modality": self.modality,
            "height": self.height,
            "width": self.width,
            "channels": self.channels,
            "frames": self.media.get("frames"),
            "fps": self.media.get("fps"),
            "length": self.run.cfg.shape[-1] if self.modality == "audio" else None,
            "sample_rate": self.media.get("sample_rate"),
            "latent": self.run.latent is not None,
            "classes": self.classes,
            "class_names": self.class_names,
            "guidance": self.takes_guidance,
            "default_guidance": self.default_guidance,
            "guidance_range": self.guidance_range(),
            "batches": list(self.batches),
            "captured": self.captured,
            "conditioning": self.conditioning.kind,
            "prompt_max_chars": MAX_PROMPT_CHARS if self.takes_prompt else None,
            "example_prompts": self.example_prompts,
            "checkpoint_step": self.run.step,
            "parameters": sum(p.numel() for p in self.run.net.parameters()),
            "device": str(self.device),
        }

    # -- one request ----------------------------------------------------------------------------------------------
    def check(self, params: dict[str, str]) -> Query:
        """A Query from this model's parameters (strings; absent ones take their defaults); InvalidSetting
        (key = the parameter) for a value it cannot take."""
        seed = _integer(params, "seed", 0, 0, SEED_MAX)
        steps = self.default_steps
        if "steps" in params:
            steps = _integer(params, "steps", 0, 0, 10**9)
            if steps not in self.steps:
                what = "NFE" if self.diffusion else "step count"
                raise _refused("steps", params["steps"], f"this model's {what} is one of {list(self.steps)}")
        class_label = None
        if "class" in params:
            class_label = _integer(params, "class", 0, 0, 10**9)  # digits; the model's classes decide below
            _refuse_if("class", params["class"], self.conditioning.refusal(class_label, None, self._any_prompt))
        guidance = self.default_guidance
        if "guidance" in params:
            value = params["guidance"]
            _refuse_if("guidance", value, self.conditioning.refusal(None, 1.0, self._any_prompt))  # none at all
            guidance = float(value) if _DECIMAL.fullmatch(value) else math.nan
            if not 0 < guidance <= GUIDANCE_MAX:
                raise _refused("guidance", value, f"must be a number in (0, {GUIDANCE_MAX:g}] with at most "
                                                  f"{GUIDANCE_DECIMALS} decimals")
        batch = _integer(params, "batch", 1, 0, 10**9)
        if batch not in self.batches:
            raise _refused("batch", params["batch"], f"must be one of {list(self.batches)}")
        return Query(self.name, None, seed, steps, class_label, guidance, batch, self._prompt(params))

    def _prompt(self, params: dict[str, str]) -> str | None:
        """The request's prompt, checked as the library checks prompts (text, length, no NUL); refused for a model
        that takes none, required by one that does."""
        value = params.get("prompt")
        why = self.conditioning.refusal(None, None, value)
        if why is not None:
            raise InvalidSetting("prompt", None if value is None else bounded_echo(value), why[1])
        if value is not None:
            try:
                check_prompts([value])
            except ConfigError as e:
                raise _refused("prompt", value, str(e).removeprefix("prompt 0: ")) from None
        return value

    def generate(self, q: Query) -> Generated:
        """The images of `q` (image i from (seed, i), as `scm sample`) as one PNG: the image for batch 1, else a
        grid with 1-pixel white gaps; video as one GIF, audio as JSON (`encode_sample`). Blocks: the web side calls
        it in a worker thread."""
        return self.generate_many([q])[0]

    def generate_many(self, queries: list[Query]) -> list[Generated]:
        """`generate` of several queries with the same steps and guidance, in one network call (their seeds and
        classes may differ; each image is what it would be alone). Each result's `seconds` is its share (by
        images) of the joint call's time, and `batched` how many requests shared it."""
        steps, guidance = queries[0].steps, queries[0].guidance
        if any((q.steps, q.guidance) != (steps, guidance) for q in queries):
            raise ValueError("generate_many: the queries must share steps and guidance")
        sampler = self.sampler(steps)
        items = [(q.seed, i, q.class_label, *([q.prompt] if self.takes_prompt else [])) for q in queries
                 for i in range(q.batch)]
        total = len(items)
        if self.captured:  # padded with copies of the first image (each image is its own: the others are unchanged)
            items += [items[0]] * (captured_batch(total) - total)
        images, seconds = generate_items(self.run, sampler, items, guidance=guidance, device=self.device,
                                         captured=self.captured)
        out, start = [], 0
        for q in queries:
            part = images[start:start + q.batch]
            start += q.batch
            body, media_type, width, height = encode_sample(part, self.media)
            out.append(Generated(body, q.batch, seconds * q.batch / total, sampler.evaluations(self.run), width,
                                 height, len(queries), media_type))
        return out

    def warm_up(self, max_joint: int | None = None) -> None:
        """One generation per batch size, so the first requests are not slowed by one-time set-up (allocator,
        CUDA context, kernel selection). A captured model also generates every power of two up to
        captured_batch(max_joint) (the joint batches the server can form), as requests of one image: capturing one
        on first use would stall the requests that wait for it (seconds on a CPU)."""
        prompt = (self.example_prompts or [""])[0] if self.takes_prompt else None
        one = Query(self.name, None, 0, self.default_steps, None, self.default_guidance, 1, prompt)
        for b in self.batches:
            self.generate(replace(one, batch=b))
        if self.captured and max_joint:
            for n in (1 << k for k in range(captured_batch(max_joint).bit_length())):
                if n not in self.batches:
                    self.generate_many([replace(one, seed=i) for i in range(n)])


def captured_batch(n: int) -> int:
    """The batch a captured model generates n images in: the next power of two (at most 7 graphs up to 64 images
    per step count)."""
    return 1 << (n - 1).bit_length()


def bounded_echo(text: str, limit: int = ECHO_MAX) -> str:
    """A request's own text (a parameter's name or value, a header, a path) as an error message may repeat it:
    whole up to `limit` characters, else its first `limit`, "…" and its length."""
    text = str(text)
    return text if len(text) <= limit else f"{text[:limit]}…({len(text)} characters)"


def _refused(key: str, value: str, reason: str) -> InvalidSetting:
    """The InvalidSetting of a request's parameter (key = its name), which repeats its name and value bounded."""
    return InvalidSetting(bounded_echo(key), bounded_echo(value), reason)


def _refuse_if(key: str, value: str, why: tuple[str, str] | None) -> None:
    """InvalidSetting naming the request's parameter for what the model's conditioning refuses."""
    if why is not None:
        raise _refused(key, value, why[1])


def _integer(params: dict[str, str], key: str, default: int, lo: int, hi: int) -> int:
    if key not in params:
        return default
    text = params[key]
    if not _DIGITS.fullmatch(text) or not lo <= int(text) <= hi:
        raise _refused(key, text, f"must be an integer in {lo}..{hi}")
    return int(text)


def parse_query(items: Iterable[tuple[str, str]], models: dict[str, ServedModel]) -> tuple[ServedModel, Query]:
    """The model a request names (`model`, default "student") and its validated Query. `items` are the
    query string's (name, value) pairs in order; an unknown or repeated name is refused (InvalidSetting)."""
    params: dict[str, str] = {}
    for key, value in items:
        if key not in PARAMETERS:
            raise _refused(key, value, f"unknown parameter (accepted: {', '.join(PARAMETERS)})")
        if key in params:
            raise _refused(key, value, "given more than once")
        params[key] = value
    name = params.pop("model", "student")
    if name not in models:
        known = " or ".join(models)
        why = "no teacher run was given to this server" if name == "teacher" else f"must be {known}"
        raise _refused("model", name, why)
    client = params.pop("client", None)
    if client is not None and not _CLIENT.fullmatch(client):
        raise _refused("client", client, "must be 1 to 64 letters, digits, '-' or '_'")
    model = models[name]
    q = model.check(params)
    return model, Query(name, client, q.seed, q.steps, q.class_label, q.guidance, q.batch, q.prompt)


def check_pair(student: LoadedRun, teacher: LoadedRun) -> None:
    """A teacher shown beside a student must be a diffusion run that draws the same noise for the same seed and
    class (or prompt): the same sample shape, σ_d, classes and prompts (the same text encoder; RunError, key
    "teacher", otherwise)."""
    if teacher.cfg.method != "diffusion":
        raise RunError(f"the teacher is a {teacher.cfg.method} run; a teacher is a diffusion run (its Heun ODE is "
                       "shown beside the student)", key="teacher")
    s, t = student.cfg, teacher.cfg
    pairs = {"model-space shape": (s.shape, t.shape),
             "image shape": (sample_shape(student), sample_shape(teacher)),
             "sigma_d": (s.loss.sigma_d, t.loss.sigma_d),
             "classes": (Conditioning.of_run(s).classes, Conditioning.of_run(t).classes),
             "prompts": (_prompts_of(s), _prompts_of(t)),
             "latent space": (student.latent is not None, teacher.latent is not None)}
    for what, (a, b) in pairs.items():
        if a != b:
            raise RunError(f"the teacher does not draw the student's noise: {what} {b} vs the student's {a}",
                           key="teacher")


def _prompts_of(cfg) -> dict | None:
    """What a run's prompts are encoded with (None: it takes none): its encoder's record (where its folder lies
    aside: a transformers encoder is told by its digests), token count and width."""
    text = Conditioning.of_run(cfg).text
    if text is None:
        return None
    return {"encoder": {k: v for k, v in text.encoder.items() if k != "path"}, "max_tokens": text.max_tokens,
            "width": text.width}
