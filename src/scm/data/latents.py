"""Latent space: images encoded by a VAE (a diffusers `AutoencoderKL`, or Sana's deterministic `AutoencoderDC`),
normalised per channel, stored as a prepared directory (`scm.data.prepared`), and decoded back to images after
sampling.

The paper trains its ImageNet 512×512 models on 64×64×4 latents of Stable Diffusion's VAE (sd-vae-ft-mse) and
normalises each latent channel c to the data's scale σ_d (App. G.1):

    latent ← (latent − µ_c) · σ_d / σ_c                    (`normalize`)
    latent = x · σ_c / σ_d + µ_c                           (`denormalize`, its exact inverse, before decoding)

with µ_c and σ_c the mean and standard deviation of channel c over the data set (all items and positions). They
are measured on the encoded data set (`normalization="measure"`), given explicitly (a pair of sequences), or the
paper's values for sd-vae-ft-mse (`normalization="sd-vae-ft-mse"`): µ_c = [1.56, −0.695, 0.483, 0.729],
σ_c = [5.27, 5.91, 4.21, 4.31]. Those were measured on raw latents — the encoder's output for images in [−1, 1],
*without* the VAE's `scaling_factor` (0.18215) — and so are ours: the per-channel normalisation replaces the
scaling factor, which is never applied (nor a `shift_factor`). The exception is `normalization="vae"`: the
VAE's own (z − shift_factor)·scaling_factor, the data a diffusers latent model was trained on, for distilling
such a teacher with its data as scm's (`scm.diffusers`); its std is then whatever it is, not σ_d (µ_c = shift,
σ_c = σ_d/scaling_factor are recorded, so that `denormalize` inverts it like any other).

Which latent is stored: the posterior mean (`latent_dist.mean`) by default, deterministic; or a sample
mean + std·ε of the posterior (`which="sample"`), ε from a generator per image seeded with (seed, image index),
so that a sample does not depend on the batch size. An AutoencoderDC has no posterior: its latent is its
encoder's output, and it has no sample to store. EDM2 stores the posterior's mean and std and draws a sample
each time an item is loaded; we store one tensor, so that a latent data set has one array like a pixel one.

Horizontal flips (`flip=True`) store each image's mirror right after it: item 2i is image i, item 2i + 1 its
mirror (encoded from the mirrored image: a VAE is not equivariant), both with image i's label. Interleaving keeps
the output one append-only stream, as the writer requires.

Measuring µ_c, σ_c needs every latent before the first normalised one is written. `encode` makes one pass
through the encoder: it writes the raw latents (float32) to a scratch writer next to the output while it
accumulates per-channel moments (float64, merged chunk by chunk with Chan et al.'s update), then streams the
scratch through `normalize` into the output and removes the scratch. Memory stays one chunk; the cost is a
temporary float32 copy on disk — cheaper than encoding twice (the encoder dominates the cost of a VAE pass), and
unlike normalising in place it rounds to a float16 output once, and an interruption anywhere resumes (both
writers record their progress with every chunk). Named or given statistics need no scratch: one pass.

Before any work, `encode` checks its settings, that the VAE folder holds an AutoencoderKL or AutoencoderDC
(config.json's `_class_name`, and every weight of one), and that the output (and the scratch) fit in the free
disk space. An error at any later point removes the partial directories the encoding wrote or continued (the
output's, the scratch, and OUT-images' when it prepares the images): nothing temporary is left behind. An
interruption (KeyboardInterrupt) keeps them, so that the same call continues where it stopped.

diffusers is an optional dependency (`pip install scm[latent]`), imported only when a VAE is needed.
"""

from __future__ import annotations

import functools
import json
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from scm._checks import describe_shape
from scm._stats import merge_moments
from scm.errors import DataError, require_modules

__all__ = ["NAMED_STATS", "ChannelMoments", "decode", "decoder", "denormalize", "encode", "image_shape", "load_vae",
           "normalize", "pixels_at", "vae_latent_shape"]

# The paper's per-channel statistics of sd-vae-ft-mse latents (App. G.1): raw latents of images in [−1, 1].
NAMED_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "sd-vae-ft-mse": ((1.56, -0.695, 0.483, 0.729), (5.27, 5.91, 4.21, 4.31)),
}
WHICH = ("mean", "sample")
DTYPES = ("float16", "float32")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
VAE_CLASSES = ("AutoencoderKL", "AutoencoderDC")  # config.json's _class_name (none: AutoencoderKL)
_VAES: dict[str, torch.nn.Module] = {}


# -- the VAE ------------------------------------------------------------------------------------------------------
def _autoencoders() -> dict:
    diffusers = require_modules("latent space", "latent", "diffusers")[0]
    return {name: getattr(diffusers, name) for name in VAE_CLASSES}


def load_vae(path: str | Path) -> torch.nn.Module:
    """A diffusers `AutoencoderKL` or `AutoencoderDC` in eval mode without gradients, from a local folder
    (config.json and safetensors weights) or a pipeline folder holding a `vae/` sub-folder. A hub id ("org/name")
    is tried only when no such path exists (it needs the network; AutoencoderKL only). Weights are read from
    safetensors only (never unpickled)."""
    classes = _autoencoders()
    spec = str(path)
    p = Path(spec).expanduser()
    if p.exists():
        folder, name = _vae_folder(p)
        try:
            vae, info = classes[name].from_pretrained(str(folder.resolve()), local_files_only=True,
                                                      use_safetensors=True, low_cpu_mem_usage=False,
                                                      output_loading_info=True)
        except (OSError, ValueError, TypeError, KeyError, RuntimeError) as e:
            raise DataError(f"VAE {folder}: cannot load it as an {name} with safetensors weights "
                            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})", key="vae") from None
        missing = [*info.get("missing_keys", []), *(k[0] for k in info.get("mismatched_keys", []))]
        if missing:
            raise DataError(f"VAE {folder}: its weights are not those of its {name} config ({len(missing)} "
                            f"missing or of another shape, e.g. {missing[0]})", key="vae")
    elif _HUB_ID.match(spec):
        AutoencoderKL = classes["AutoencoderKL"]
        try:
            vae = AutoencoderKL.from_pretrained(spec, use_safetensors=True, low_cpu_mem_usage=False)
        except Exception as e:  # any failure of the download (offline, unknown id, no safetensors …)
            raise DataError(f"VAE {spec!r}: no such folder, and loading it as a hub id failed ({type(e).__name__}); "
                            "offline, the VAE must be a local folder", key="vae") from None
    else:
        raise DataError(f"VAE {spec}: no such folder (a diffusers AutoencoderKL folder is needed)", key="vae")
    if not isinstance(vae, tuple(classes.values())):
        raise DataError(f"VAE {spec}: not an {' or '.join(VAE_CLASSES)} ({type(vae).__name__})", key="vae")
    return vae.eval().requires_grad_(False)


def _vae_folder(p: Path) -> tuple[Path, str]:
    """(the folder of the VAE at `p` — itself, or a pipeline folder's vae/ —, the class its config.json names: one
    of VAE_CLASSES, AutoencoderKL when it names none); DataError naming the folder and the class it holds
    otherwise."""
    if not p.is_dir():
        raise DataError(f"VAE {p}: not a folder (expected a diffusers AutoencoderKL folder)", key="vae")
    folder = p if (p / "config.json").is_file() or not (p / "vae" / "config.json").is_file() else p / "vae"
    if not (folder / "config.json").is_file():
        raise DataError(f"VAE {p}: no config.json (expected a diffusers AutoencoderKL folder, or a pipeline "
                        "folder with a vae/ sub-folder)", key="vae")
    try:
        config = json.loads((folder / "config.json").read_text())
        held = config.get("_class_name")
    except (OSError, ValueError, AttributeError) as e:
        raise DataError(f"VAE {folder / 'config.json'}: not a diffusers config ({type(e).__name__}: {e})",
                        key="vae") from None
    if held is not None and held not in VAE_CLASSES:
        raise DataError(f"VAE {folder}: holds a {held} (config.json's _class_name), not an "
                        f"{' or '.join(VAE_CLASSES)}; give a diffusers AutoencoderKL folder, or a pipeline folder "
                        "with a vae/ sub-folder", key="vae")
    return folder, held or "AutoencoderKL"


def _cached_vae(path: str) -> torch.nn.Module:
    """The VAE at `path`, loaded once per process."""
    if path not in _VAES:
        _VAES[path] = load_vae(path)
    return _VAES[path]


def _vae_path(path: str | Path) -> str:
    """What a latent data set records as its VAE: the absolute folder, or the hub id when there is no folder."""
    p = Path(path).expanduser()
    if not p.exists():
        return str(path)
    return str((p / "vae").resolve() if not (p / "config.json").is_file() and (p / "vae").is_dir() else p.resolve())


def vae_latent_shape(vae, sizes: tuple[int, ...]) -> tuple[int, ...]:
    """The latent shape (C, h, w) of H×W images (`sizes` = (H, W)): AutoencoderKL halves both in every down block
    but the last, h = H / 2^(len(block_out_channels) − 1); AutoencoderDC likewise (encoder_block_out_channels)."""
    blocks = vae.config.get("block_out_channels") or vae.config.get("encoder_block_out_channels")
    factor = 2 ** (len(blocks) - 1)
    if any(n % factor for n in sizes):
        raise DataError(f"image size {'×'.join(map(str, sizes))} is not divisible by the VAE's downsampling factor "
                        f"{factor}", key="resolution")
    return (int(vae.config.latent_channels), *(n // factor for n in sizes))


# -- normalisation (App. G.1) ---------------------------------------------------------------------------------------
def _per_channel(v, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(v, dtype=torch.float64, device=like.device).reshape(1, -1, 1, 1)


def normalize(z: torch.Tensor, mu: Sequence[float], sigma: Sequence[float], sigma_d: float = 0.5) -> torch.Tensor:
    """Raw latents → the model's space: (z − µ_c)·σ_d/σ_c per channel c (App. G.1), computed in float64."""
    return ((z.double() - _per_channel(mu, z)) * (sigma_d / _per_channel(sigma, z))).to(z.dtype)


def denormalize(x: torch.Tensor, mu: Sequence[float], sigma: Sequence[float], sigma_d: float = 0.5) -> torch.Tensor:
    """The inverse of `normalize`: x·σ_c/σ_d + µ_c, the VAE decoder's input."""
    return (x.double() * (_per_channel(sigma, x) / sigma_d) + _per_channel(mu, x)).to(x.dtype)


@dataclass
class ChannelMoments:
    """Per-channel count, mean and sum of squared deviations (M2), accumulated in float64 over chunks
    [B, C, H, W] with Chan et al.'s pairwise update (no cancellation when the mean is large)."""

    n: int = 0
    mean: list[float] = field(default_factory=list)
    m2: list[float] = field(default_factory=list)

    def add(self, z: np.ndarray) -> None:
        v = np.moveaxis(np.asarray(z, dtype=np.float64), 1, 0).reshape(z.shape[1], -1)
        mb = v.mean(axis=1)
        state = (self.n, np.array(self.mean), np.array(self.m2)) if self.n else None
        self.n, mean, m2 = merge_moments(state, (v.shape[1], mb, ((v - mb[:, None]) ** 2).sum(axis=1)))
        self.mean, self.m2 = mean.tolist(), m2.tolist()

    @property
    def std(self) -> list[float]:
        """The population standard deviation σ_c (over all items and positions)."""
        return np.sqrt(np.array(self.m2) / self.n).tolist()


def _stats(normalization, channels: int, vae=None, sigma_d: float = 0.5):
    """(how, (µ, σ) or None when they are to be measured) from `normalization`."""
    if normalization == "measure":
        return "measured", None
    if normalization == "vae":  # latent diffusion's own scale, (z − shift_factor)·scaling_factor, as µ_c and σ_c
        shift, scale = vae.config.get("shift_factor") or 0.0, vae.config.get("scaling_factor") or 1.0
        return "vae", ([float(shift)] * channels, [sigma_d / float(scale)] * channels)
    if isinstance(normalization, str):
        if normalization not in NAMED_STATS:
            raise DataError(f"normalization={normalization!r}: use 'measure', 'vae', one of {list(NAMED_STATS)}, or "
                            "(mean, std) per channel", key="normalization")
        how, (mu, sigma) = normalization, NAMED_STATS[normalization]
    else:
        try:
            mu, sigma = normalization
            mu, sigma = [float(v) for v in mu], [float(v) for v in sigma]
        except (TypeError, ValueError):
            raise DataError(f"normalization={normalization!r}: expected (mean, std), one value per channel each",
                            key="normalization") from None
        how = "given"
    if len(mu) != channels or len(sigma) != channels:
        raise DataError(f"normalization={normalization!r}: {len(mu)} means and {len(sigma)} stds, but the VAE's "
                        f"latents have {channels} channels", key="normalization")
    if not all(np.isfinite(mu)) or not all(np.isfinite(sigma) & (np.array(sigma) > 0)):
        raise DataError(f"normalization={normalization!r}: means must be finite and stds > 0", key="normalization")
    return how, (list(mu), list(sigma))


# -- encoding -------------------------------------------------------------------------------------------------------
def _noise(seed: int, index: int, copy: int, shape, device) -> torch.Tensor:
    """ε of image `index` (copy 1: its mirror), from its own generator: independent of the batch."""
    s = int(np.random.SeedSequence([seed & 0xFFFFFFFF, index, copy]).generate_state(1, np.uint64)[0] >> 1)
    return torch.randn(shape, generator=torch.Generator().manual_seed(s)).to(device)


@torch.no_grad()
def _encode_batch(vae, x: torch.Tensor, start: int, *, flip: bool, which: str, seed: int) -> torch.Tensor:
    """Raw float32 latents of the images x (items start …), each followed by its mirror's when `flip`."""
    m = x.shape[0]
    inputs = torch.cat([x, x.flip(-1)]) if flip else x
    encoded = vae.encode(inputs)
    dist = getattr(encoded, "latent_dist", None)
    z = encoded.latent if dist is None else dist.mean  # AutoencoderDC: deterministic, no posterior
    if which == "sample":
        eps = torch.stack([_noise(seed, start + i % m, i // m, z.shape[1:], z.device) for i in range(z.shape[0])])
        z = z + dist.std * eps
    if flip:  # [x₀ … x_m−1, x̄₀ … x̄_m−1] → x₀, x̄₀, x₁, x̄₁, …
        z = torch.stack([z[:m], z[m:]], dim=1).flatten(0, 1)
    return z.float()


def _check_images(data, vae, resolution: int | None) -> None:
    if getattr(data, "latent", None):
        raise DataError(f"{data.source}: already latents (encoded with {data.latent.get('vae')}); encode images",
                        key="data")
    if resolution is not None and data.shape[1:] != (resolution, resolution):
        raise DataError(f"{data.source}: the images are {describe_shape(data.shape)}, not {resolution}×{resolution}; "
                        f"prepare them at {resolution}×{resolution} first (scm.data.prepare), then encode the prepared "
                        "directory", key="resolution")
    if data.channels != vae.config.in_channels:
        raise DataError(f"{data.source}: {data.channels} channel(s), but the VAE encodes {vae.config.in_channels}",
                        key="data")


def _check_settings(which: str, batch: int, sigma_d: float, dtype: str) -> None:
    if dtype not in DTYPES:
        raise DataError(f"dtype={dtype!r}: latents are stored as {' or '.join(DTYPES)}", key="dtype")
    if which not in WHICH:
        raise DataError(f"which={which!r}: store the posterior 'mean' or a 'sample'", key="which")
    if not (isinstance(batch, int) and batch >= 1):
        raise DataError(f"batch={batch!r}: must be an integer >= 1", key="batch")
    if not (isinstance(sigma_d, (int, float)) and sigma_d > 0):
        raise DataError(f"sigma_d={sigma_d!r}: must be > 0", key="sigma_d")


def pixels_at(data, out: str | Path, resolution: int, *, progress: bool = True, log=print):
    """The images to encode at `resolution`: `data` itself when it is a prepared R×R directory, otherwise the
    images prepared once into OUT-images (ADM's centre crop and area resize, `scm.data.prepare`; reused when it is
    there): the pixel reference a run on these latents is evaluated against."""
    from scm.data import load_dataset
    from scm.data.prepare import prepare
    from scm.data.prepared import is_prepared

    def prepared_square(path):  # the prepared R×R set at `path`, or None
        found = load_dataset(path) if is_prepared(Path(path)) else None
        return found if found is not None and found.shape[1:] == (resolution, resolution) else None

    if isinstance(data, (str, Path)) and (given := prepared_square(data)) is not None:
        return given
    pixels = Path(f"{str(out).rstrip('/')}-images")
    images = prepared_square(pixels)
    if images is None:
        images = load_dataset(prepare(data, pixels, resolution=resolution, channels=3, progress=progress, log=log))
    log(f"images at {resolution}×{resolution}: {pixels} (the pixel reference for evaluating a run on these latents)")
    return images


def encode(data, vae: str | Path, out: str | Path, *, normalization="measure", which: str = "mean",
           flip: bool = False, dtype: str = "float16", batch: int = 64, sigma_d: float = 0.5,
           resolution: int | None = None, seed: int = 0, progress: bool = True, device="cpu",
           resume: bool = True, log=print, text_encoder=None, text_batch: int = 256) -> Path:
    """Encode a data set of images (a name or path, or what `scm.data.load_dataset` returns) with the VAE at
    `vae` into the prepared directory `out`: latents normalised per channel (App. G.1, see the module's
    docstring), `value_range="raw"`, and meta["latent"] recording the VAE, µ_c, σ_c, σ_d and how they were
    obtained, for decoding. `normalization`: "measure" | "sd-vae-ft-mse" | (means, stds) | "vae" (the VAE's own
    (z − shift_factor)·scaling_factor, the data of a diffusers latent model: its std is then not σ_d).
    `resolution` R: images not prepared at R×R are prepared first (`pixels_at`). An interrupted encoding with the
    same settings continues where it stopped (`resume`), and so does one that failed with an error (a partial
    directory is kept only when it holds finished items). The source's captions are kept (a mirror has its
    image's); with `text_encoder` (a `scm.text.TextEncoder`) their prompt embeddings are stored too, as `dtype`
    (`scm.data.prompts`)."""
    from scm.data import load_dataset
    from scm.data.prepared import PreparedWriter, removed_on_error

    _check_settings(which, batch, sigma_d, dtype)
    model = load_vae(vae).to(device)  # before any work: a folder that holds no VAE is an error
    if which == "sample" and type(model).__name__ == "AutoencoderDC":
        raise DataError(f"which='sample': the VAE {vae} ({type(model).__name__}) has no posterior to sample; store "
                        "its latents ('mean')", key="which")
    out, factor = Path(out), 2 if flip else 1
    with removed_on_error():
        if resolution is not None:
            data = pixels_at(data, out, resolution, progress=progress, log=log)
        data = load_dataset(data) if isinstance(data, (str, Path)) else data
        _check_images(data, model, resolution)
        shape = vae_latent_shape(model, data.shape[1:])
        how, stats = _stats(normalization, shape[0], model, sigma_d)
        _check_room(out, shape, len(data) * factor, dtype, stats is None, data.labels is not None)
        settings = {"vae": _vae_path(vae), "which": which, "flip": flip, "dtype": dtype, "normalization": how,
                    "stats": stats, "sigma_d": sigma_d, "seed": seed if which == "sample" else None}
        spec, digest = _caption_plan(data, factor, text_encoder, dtype, text_batch)
        key = json.dumps({"encode": settings, "source": data.source, "count": len(data),
                          **({"captions": digest} if digest else {})}, sort_keys=True)
        final = PreparedWriter(out, shape, dtype, len(data) * factor, labelled=data.labels is not None, key=key,
                               resume=resume, captions=spec)
        job = _Encoding(data, model, final, factor, batch, device, progress, flip, which, seed, sigma_d, dtype,
                        spec is not None)
        stats = job.measured(key, resume) if stats is None else job.normalized(stats)
        info = {"vae": settings["vae"], "mean": list(stats[0]), "std": list(stats[1]), "sigma_d": sigma_d,
                "which": which, "image_shape": list(data.shape), "scaling": "per-channel App. G.1",
                "normalization": how, "flip": flip, "seed": settings["seed"], "images": data.source}
        origin = getattr(data, "meta", {}).get("source", data.source)  # a prepared directory's own source
        path = final.finish({"source": f"latents of {origin}", "class_names": data.class_names,
                             "value_range": "raw", "latent": info})
        job.clean()
    return path


def _caption_plan(data, factor: int, encoder, dtype: str, batch: int):
    """(the output's `CaptionSpec` or None, the captions' digest or None): the source's captions, each kept for
    `factor` items (an image and its mirror), embedded by `encoder` when given."""
    from scm.data.prompts import CaptionSpec, caption_stats

    if getattr(data, "captions", None) is None:
        if encoder is not None:
            raise DataError(f"{data.source}: no captions to encode (a folder needs caption files or a "
                            "metadata.jsonl)", key="data")
        return None, None
    rows, nbytes, digest = caption_stats(data.captions)
    return CaptionSpec(rows * factor, nbytes * factor, encoder, dtype, batch), digest


def _check_room(out: Path, shape: tuple[int, ...], count: int, dtype: str, scratch: bool, labelled: bool) -> None:
    """DataError unless the output's arrays (and, for measured statistics, the float32 scratch) fit in the free
    disk space; what partial directories of an interrupted run hold already counts as theirs."""
    from scm.data.prepared import allocated, check_disk

    item = int(np.prod(shape))
    need = count * (item * np.dtype(dtype).itemsize + 8 * labelled) + scratch * count * item * 4
    need -= sum(allocated(out.with_name(out.name + end)) for end in (".partial", ".raw.partial"))
    what = f"{count} latent(s) of {'×'.join(map(str, shape))} {dtype}" + (" and their float32 scratch" * scratch)
    check_disk(out, need, what)


@dataclass
class _Encoding:
    """One encoding's passes: raw latents of the source images by batch, normalised into the output writer."""

    data: object
    vae: torch.nn.Module
    final: object               # the output's PreparedWriter
    factor: int                 # 2 with flips (each image, then its mirror), else 1
    batch: int
    device: object
    progress: bool
    flip: bool
    which: str
    seed: int
    sigma_d: float
    dtype: str
    captioned: bool = False     # the output keeps the source's captions
    scratch: object = None      # the raw float32 latents of a measured normalisation

    @functools.cached_property
    def item_labels(self):
        """The output's labels (each image's label, repeated for its mirror), or None."""
        labels = self.data.labels
        return None if labels is None else labels.repeat_interleave(self.factor).numpy()

    def labels(self, a: int, b: int):
        return None if self.item_labels is None else self.item_labels[a:b]

    def captions(self, a: int, b: int):
        """The captions of output items a … b − 1 (each image's, repeated for its mirror), or None."""
        if not self.captioned:
            return None
        f = self.factor
        source = self.data.captions[a // f: (b - 1) // f + 1]
        return [source[j // f - a // f] for j in range(a, b)]

    def batches(self, writer, name: str):
        """(start, raw latents) of the source images not yet in `writer`, `batch` images at a time."""
        n, f = len(self.data), self.factor
        bar = tqdm(total=n, initial=writer.written // f, unit="img", desc=name, disable=not self.progress, leave=False)
        for start in range(writer.written // f, n, self.batch):
            m = min(self.batch, n - start)
            x, _ = self.data.batch(torch.arange(start, start + m), self.device)
            if x.abs().max() > 1 + 1e-3:
                raise DataError(f"{self.data.source}: items {start}…{start + m - 1} have values outside [-1, 1]: not "
                                "images (latents are encoded from images)", key="data")
            yield start, _encode_batch(self.vae, x, start, flip=self.flip, which=self.which, seed=self.seed).cpu()
            bar.update(m)
        bar.close()

    def normalized(self, stats):
        """One pass: each batch normalised with the given statistics as it is encoded."""
        for start, z in self.batches(self.final, "encoding"):
            a = start * self.factor
            x = normalize(z, *stats, self.sigma_d)
            self.final.append(x.numpy().astype(self.dtype), self.labels(a, a + z.shape[0]),
                              captions=self.captions(a, a + z.shape[0]))
        return stats

    def measured(self, key: str, resume: bool):
        """Raw latents to a float32 scratch with their per-channel moments, then normalised into the output."""
        from scm.data.prepared import PreparedWriter

        out, count = self.final.out, self.final.capacity
        self.scratch = PreparedWriter(out.with_name(out.name + ".raw"), self.final.shape, "float32", count,
                                      labelled=False, key=key, resume=resume)
        moments = ChannelMoments(**self.scratch.progress.get("moments", {}))
        if self.final.written == 0:
            for _, z in self.batches(self.scratch, "encoding"):
                moments.add(z.numpy())
                self.scratch.append(z.numpy(), extra={"moments": vars(moments)})
        stats = (moments.mean, moments.std)
        if not all(v > 0 for v in stats[1]):
            raise DataError(f"{self.data.source}: a latent channel is constant over the data set (σ_c = {stats[1]}): "
                            "cannot normalise it; give the statistics instead", key="normalization")
        chunk = self.batch * self.factor
        for a in range(self.final.written, count, chunk):
            b = min(a + chunk, count)
            z = torch.from_numpy(np.asarray(self.scratch.images[a:b]))
            self.final.append(normalize(z, *stats, self.sigma_d).numpy().astype(self.dtype), self.labels(a, b),
                              captions=self.captions(a, b))
        return stats

    def clean(self) -> None:
        """Remove the scratch of a measured normalisation."""
        if self.scratch is not None:
            partial = self.scratch.partial
            self.scratch = None
            shutil.rmtree(partial, ignore_errors=True)


# -- decoding -------------------------------------------------------------------------------------------------------
def _info(info: dict) -> tuple[list[float], list[float], float, str]:
    try:
        mu, sigma = [float(v) for v in info["mean"]], [float(v) for v in info["std"]]
        return mu, sigma, float(info["sigma_d"]), str(info["vae"])
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(f"latent information {info!r} is incomplete or malformed ({e})", key="latent") from None


def image_shape(info: dict) -> tuple[int, ...]:
    """The shape (C, H, W) of the images a latent data set was encoded from (its meta["latent"])."""
    if "image_shape" in info:
        return tuple(int(v) for v in info["image_shape"])
    r = int(info["image_resolution"])  # written before shapes were tuples: square images
    return int(info["image_channels"]), r, r


def decoder(info: dict) -> torch.nn.Module:
    """The VAE recorded in `info` (a latent data set's meta["latent"]), loaded once per process."""
    return _cached_vae(_info(info)[3])


@torch.no_grad()
def decode(latents: torch.Tensor, info: dict, vae=None, *, batch: int = 16) -> torch.Tensor:
    """Latents in the model's space [N, C, r, r] → images [N, C', R, R] in [-1, 1] (clamped): the exact inverse
    of the normalisation recorded in `info` (a latent data set's meta["latent"]), then the decoder of `vae` or
    of the recorded VAE (`decoder`), on the latents' device, `batch` latents at a time."""
    mu, sigma, sigma_d, _ = _info(info)
    vae = (vae if vae is not None else decoder(info)).to(latents.device)
    z = denormalize(latents.float(), mu, sigma, sigma_d).to(next(vae.parameters()).dtype)
    out = [vae.decode(z[i:i + batch]).sample.float().clamp(-1, 1) for i in range(0, z.shape[0], batch)]
    return torch.cat(out)
