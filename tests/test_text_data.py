"""Prompts as data: captioned image folders (sidecar .txt files, metadata.jsonl) and their errors, prompt embeddings
in prepared sets (`scm data encode --text-encoder`: layout, exact read-back, caption choice, the empty prompt,
resuming, atomicity, with a VAE), training batches with captions, and the command line."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from scm.data import ImageData, load_dataset
from scm.data.images import load_folder
from scm.data.prepare import prepare
from scm.data.prepared import load_prepared
from scm.data.prompts import encode_captions
from scm.errors import CheckpointError, DataError
from scm.text import BuiltinEncoder, TextConfig, load_text_encoder

from conftest import cli, make_shapes

WORDS = ["a red disc", "a blue square", "two things", "nothing at all", "a small grey square", "one more"]


def _png(path, seed=0, size=8):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8)).save(path)


def _folder(root, names=("a/x.png", "a/y.png", "b/z.png")):
    for i, n in enumerate(names):
        _png(root / n, i)
    return root


def _captioned(n=12, size=8, channels=1, per=(1, 2, 3)) -> ImageData:
    """n labelled images with 1 to 3 captions each (item i: WORDS[i % 6], WORDS[(i + 1) % 6], …)."""
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.integers(0, 256, (n, channels, size, size), dtype=np.uint8))
    caps = [[f"{WORDS[(i + k) % 6]} {i}" for k in range(per[i % len(per)])] for i in range(n)]
    return ImageData(x, torch.arange(n) % 3, "captioned test images", None, "uint8", caps)


# -- captioned folders ------------------------------------------------------------------------------------------
def test_sidecar_captions_one_per_line(tmp_path):
    root = _folder(tmp_path / "f")
    (root / "a/x.txt").write_text("a cat\n\n  a small cat  \n")
    (root / "a/y.txt").write_bytes("\ufeffa dog".encode())
    (root / "b/z.txt").write_text("a bird\n")
    data = load_folder(root)
    assert data.captions == [["a cat", "a small cat"], ["a dog"], ["a bird"]]
    assert data.labels.tolist() == [0, 0, 1] and data.text is None and data.conditions == ("labels",)
    assert data.subset(1).captions == [["a dog"], ["a bird"]] and "4 captions" in data.describe()
    assert data.caption_of([0, 2]) == ["a cat", "a bird"]
    with pytest.raises(DataError, match="no prompt embeddings"):
        data.null_text()


def test_metadata_jsonl_captions(tmp_path):
    root = _folder(tmp_path / "f")
    lines = [{"file_name": "b/z.png", "text": "a bird", "other": 1}, {"file_name": "a/x.png", "text": ["a", "b"]},
             {"file_name": "./a/y.png", "text": "a dog"}]
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    assert load_folder(root).captions == [["a", "b"], ["a dog"], ["a bird"]]


def test_folders_without_caption_files_load_as_before(tmp_path):
    root = _folder(tmp_path / "f")
    (root / "README.txt").write_text("not a caption")
    data = load_dataset(root)
    assert data.captions is None and data.labels is not None and " captions" not in data.describe()


SIDECAR_ERRORS = [
    ({"a/x.txt": b"cat", "a/y.txt": b"dog"}, r"b/z\.png: no caption file \(z\.txt\); 1 of the 3 images"),
    ({"a/x.txt": b"cat", "a/y.txt": b"dog", "b/z.txt": b"bird", "b/w.txt": b"none"}, r"b/w\.txt: a caption file "
     r"without an image"),
    ({"a/x.txt": b"cat", "a/y.txt": b"dog", "b/z.txt": b"bird\n\xff\xfe"}, r"b/z\.txt, line 2: not UTF-8"),
    ({"a/x.txt": b"cat", "a/y.txt": b"  \n", "b/z.txt": b"bird"}, r"a/y\.txt: no caption"),
    ({"a/x.txt": b"cat", "a/y.txt": b"dog", "b/z.txt": b"bi\x00rd"}, r"b/z\.txt, line 1: a caption holds a NUL"),
]
META_ERRORS = [
    ('{"file_name": "a/x.png", "text": "cat"}\n{"file_name": "a/y.png", "text": "dog"', r"line 2: not JSON"),
    ('{"text": "cat"}', r"line 1: no file_name"),
    ('{"file_name": "a/x.png"}', r"line 1: text must be a caption or a non-empty list"),
    ('{"file_name": "a/x.png", "text": []}', r"line 1: text must be"),
    ('[1, 2]', r"line 1: a JSON object with file_name and text is expected"),
    ('{"file_name": "a/q.png", "text": "cat"}', r"line 1: file_name 'a/q.png': no such image"),
    ('{"file_name": "a/x.png", "text": "cat"}\n{"file_name": "a/x.png", "text": "dog"}',
     r"line 2: file_name 'a/x.png' again \(first on line 1\)"),
    ('{"file_name": "a/x.png", "text": "cat"}', r"a/y\.png: no caption in .*metadata\.jsonl \(2 of the 3 images"),
]


@pytest.mark.parametrize("files, match", SIDECAR_ERRORS)
def test_sidecar_errors_name_the_file(tmp_path, files, match):
    root = _folder(tmp_path / "f")
    for name, raw in files.items():
        (root / name).write_bytes(raw)
    with pytest.raises(DataError, match=match):
        load_folder(root)
    with pytest.raises(DataError, match=match):  # prepare reads the same captions, before any image
        prepare(root, tmp_path / "p", resolution=8, progress=False)
    assert not (tmp_path / "p.partial").exists()


@pytest.mark.parametrize("text, match", META_ERRORS)
def test_metadata_errors_name_the_file_and_line(tmp_path, text, match):
    root = _folder(tmp_path / "f")
    (root / "metadata.jsonl").write_text(text)
    with pytest.raises(DataError, match=match) as e:
        load_folder(root)
    assert "metadata.jsonl" in str(e.value)


def test_metadata_non_utf8_and_both_conventions(tmp_path):
    root = _folder(tmp_path / "f")
    (root / "metadata.jsonl").write_bytes(b'{"file_name": "a/x.png", "text": "cat"}\n{"file_name": "\xff"}\n')
    with pytest.raises(DataError, match=r"metadata\.jsonl, line 2: not UTF-8"):
        load_folder(root)
    (root / "metadata.jsonl").write_text("")
    (root / "a/x.txt").write_text("cat")
    with pytest.raises(DataError, match=r"both in metadata\.jsonl and in caption files"):
        load_folder(root)


def test_prepare_keeps_a_folders_captions_and_drops_those_of_skipped_files(tmp_path):
    root = _folder(tmp_path / "f", ("a/x.png", "a/y.png", "b/z.png"))
    (root / "a/w.png").write_bytes(b"not a png")
    for name, text in (("a/w", "bad"), ("a/x", "cat\nkitten"), ("a/y", "dog"), ("b/z", "bird")):
        (root / f"{name}.txt").write_text(text)
    data = load_dataset(prepare(root, tmp_path / "p", resolution=8, skip_bad=True, progress=False, log=lambda m: 0))
    assert list(data.captions) == [["cat", "kitten"], ["dog"], ["bird"]] and data.text is None
    assert data.meta["captions"] == 4 and data.subset(1, 3).captions[1] == ["bird"]
    assert data.caption_of([0], torch.Generator().manual_seed(0))[0] in ("cat", "kitten")
    code, out = cli("data", "info", tmp_path / "p")
    assert code == 0 and "captions: 4 (no prompt embeddings" in out
    encoded = load_dataset(encode_captions(tmp_path / "p", "builtin", tmp_path / "e", progress=False))
    assert list(encoded.captions) == list(data.captions) and encoded.text["captions"] == 4
    direct = load_dataset(prepare(root, tmp_path / "d", resolution=8, skip_bad=True, chunk=1, progress=False,
                                  log=lambda m: 0, text_encoder=BuiltinEncoder()))  # its first chunk: all skipped
    assert direct.caption_of([0, 1, 2]) == ["cat", "dog", "bird"] and direct._text.offsets.tolist() == [0, 2, 3, 4]
    assert torch.equal(encoded.batch(torch.arange(3))[0], data.batch(torch.arange(3))[0])


def test_the_disk_check_counts_the_embeddings(tmp_path, monkeypatch):
    import scm.data.prepared as prepared

    real = shutil.disk_usage
    monkeypatch.setattr(prepared.shutil, "disk_usage", lambda p: real(p)._replace(free=40_000))
    src = _captioned()  # 12 images of 64 bytes: fit; 24 captions of 16×64 float16 tokens (2 kB each): do not
    with pytest.raises(DataError, match=r"24 caption\(s\) embedded as 16×64 \+ 64 float16 need 5\d\.\d kB"):
        encode_captions(src, "builtin", tmp_path / "e", progress=False)
    assert not (tmp_path / "e.partial").exists()
    prepare(src, tmp_path / "p", resolution=8, progress=False)  # without the embeddings, they fit


# -- prompt embeddings in a prepared set ------------------------------------------------------------------------------
def _rows(path):
    meta = json.loads((path / "meta.json").read_text())["text"]
    t, d, p, m = meta["max_tokens"], meta["width"], meta["pooled_width"], meta["captions"]
    return (np.fromfile(path / "text_offsets.bin", "<i8"),
            np.fromfile(path / "text_tokens.bin", np.float16).reshape(m, t, d),
            np.fromfile(path / "text_mask.bin", np.uint8).reshape(m, t),
            np.fromfile(path / "text_pooled.bin", np.float16).reshape(m, p))


def test_encoded_set_holds_exactly_the_encoders_embeddings(tmp_path):
    src = _captioned()
    data = load_dataset(encode_captions(src, "builtin", tmp_path / "e", progress=False))
    enc = load_text_encoder("builtin")
    flat = [c for caps in src.captions for c in caps]
    ref = enc.encode(flat)
    offsets, tokens, mask, pooled = _rows(tmp_path / "e")
    assert offsets.tolist() == [0, *np.cumsum([len(c) for c in src.captions]).tolist()]
    assert np.allclose(tokens, ref.tokens.numpy(), atol=2e-3) and (mask == ref.mask.numpy()).all()
    assert np.allclose(pooled, ref.pooled.numpy(), atol=2e-3)
    assert data.text == {"encoder": enc.spec, "max_tokens": 16, "width": 64, "pooled_width": 64, "captions": len(flat),
                         "dtype": "float16"}
    assert data.conditions == ("labels", "text", "text_mask", "text_pooled") and data.shape == (1, 8, 8)
    assert torch.equal(data.batch(torch.arange(12))[0], src.batch(torch.arange(12))[0])
    _, cond = data.batch(torch.tensor([5, 0, 7]))  # no generator: each item's first caption
    first = enc.encode([src.captions[i][0] for i in (5, 0, 7)])
    assert torch.allclose(cond["text"], first.tokens, atol=2e-3) and torch.equal(cond["text_mask"], first.mask)
    assert cond["text"].dtype == torch.float32 and cond["labels"].tolist() == [2, 0, 1]
    assert data.caption_of([5, 0, 7]) == [src.captions[i][0] for i in (5, 0, 7)]
    assert list(data.captions) == src.captions and data.subset(4, 6).captions[1] == src.captions[5]
    _, sub_cond = data.subset(4).batch(torch.tensor([1]))
    assert torch.equal(sub_cond["text"], cond["text"][:1])
    on_disk = load_prepared(tmp_path / "e", in_memory=False)  # rows read by positioned reads
    assert on_disk._text.tokens.array is None and data._text.tokens.array is not None
    assert torch.equal(on_disk.batch(torch.tensor([5, 0, 7]))[1]["text"], cond["text"])


def test_caption_choice_is_seeded_uniform_and_matches_caption_of(tmp_path):
    data = load_dataset(encode_captions(_captioned(), "builtin", tmp_path / "e", progress=False))
    enc = BuiltinEncoder()
    index = torch.tensor([2, 2, 5, 8, 11])
    a = data.batch(index, choice=torch.Generator().manual_seed(1))[1]["text"]
    b = data.batch(index, choice=torch.Generator().manual_seed(1))[1]["text"]
    assert torch.equal(a, b)
    names = data.caption_of(index, torch.Generator().manual_seed(1))
    assert torch.allclose(a, enc.encode(names).tokens, atol=2e-3)
    g, seen = torch.Generator().manual_seed(0), set()
    for _ in range(40):
        seen.update(data.caption_of(torch.arange(12), g))
    assert seen == {c for caps in data.captions for c in caps}


def test_the_empty_prompt_is_stored_with_its_digest(tmp_path):
    path = encode_captions(_captioned(), "builtin", tmp_path / "e", progress=False)
    null = load_dataset(path).null_text()
    ref = BuiltinEncoder().encode([""])
    assert set(null) == {"text", "text_mask", "text_pooled"} and null["text"].shape == (1, 16, 64)
    assert not null["text_mask"].any() and torch.equal(null["text"], ref.tokens)
    raw = bytearray((path / "text_null.safetensors").read_bytes())
    raw[-1] ^= 1
    (path / "text_null.safetensors").write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="text_null"):
        load_dataset(path).null_text()


class _Failing:
    """The builtin encoder, failing on its `fail_at`-th call (an interruption in the middle of an encoding)."""

    def __init__(self, fail_at: int):
        self.inner, self.calls, self.fail_at = BuiltinEncoder(), 0, fail_at
        self.spec, self.max_tokens, self.width, self.pooled_width = (self.inner.spec, 16, 64, 64)

    def encode(self, prompts):
        self.calls += 1
        if self.calls == self.fail_at:
            raise KeyboardInterrupt
        return self.inner.encode(prompts)


def test_an_interrupted_encoding_resumes_to_the_same_files_and_appears_only_when_done(tmp_path):
    src = _captioned(n=40)
    whole = prepare(src, tmp_path / "whole", resolution=8, chunk=8, progress=False, text_encoder=BuiltinEncoder())
    failing = _Failing(fail_at=3)
    with pytest.raises(KeyboardInterrupt):
        prepare(src, tmp_path / "cut", resolution=8, chunk=8, progress=False, text_encoder=failing)
    assert not (tmp_path / "cut").exists() and (tmp_path / "cut.partial").is_dir()
    progress = json.loads((tmp_path / "cut.partial/progress.json").read_text())
    assert progress["written"] == 16 and progress["caption_rows"] > 0
    again = prepare(src, tmp_path / "cut", resolution=8, chunk=8, progress=False, text_encoder=BuiltinEncoder())
    assert not (tmp_path / "cut.partial").exists()
    names = sorted(p.name for p in whole.iterdir())
    assert names == sorted(p.name for p in again.iterdir()) and "captions.jsonl" in names
    for name in names:
        if name != "meta.json":
            assert (whole / name).read_bytes() == (again / name).read_bytes(), name
    with pytest.raises(DataError, match="no captions to encode"):
        encode_captions(ImageData(src.images, None, "plain"), "builtin", tmp_path / "none", progress=False)
    assert not (tmp_path / "none").exists() and not (tmp_path / "none.partial").exists()


def test_a_bad_prepared_text_file_is_named(tmp_path):
    path = encode_captions(_captioned(), "builtin", tmp_path / "e", progress=False)
    with open(path / "text_tokens.bin", "r+b") as f:
        f.truncate(100)
    with pytest.raises(DataError, match=r"text_tokens\.bin: 100 bytes, but meta\.json describes"):
        load_dataset(path)
    path = encode_captions(_captioned(), "builtin", tmp_path / "f", progress=False)
    np.array([0, 2, 1] + [3] * 10, "<i8").tofile(path / "text_offsets.bin")
    with pytest.raises(DataError, match=r"text_offsets\.bin: not the offsets"):
        load_dataset(path)
    (path / "captions.jsonl").write_text("")
    with pytest.raises(DataError, match=r"captions\.jsonl: 0 lines, but meta\.json describes 12"):
        load_dataset(path)


def test_text_and_latents_with_a_vae(tmp_path):
    pytest.importorskip("diffusers")
    from conftest import save_tiny_vae

    save_tiny_vae(tmp_path / "vae")
    images, labels = make_shapes(6, res=32, channels=3)
    caps = [[f"shape {i}", f"item {i}"] for i in range(6)]
    src = ImageData(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(labels), "shapes",
                    None, "uint8", caps)
    path = encode_captions(src, "builtin", tmp_path / "lat", vae=tmp_path / "vae", flip=True, batch=4,
                           progress=False, log=lambda m: 0)
    data = load_dataset(path)
    assert data.shape == (4, 16, 16) and len(data) == 12 and data.latent["flip"]
    assert list(data.captions) == [c for c in caps for _ in range(2)]  # a mirror keeps its image's captions
    _, cond = data.batch(torch.tensor([3]), choice=torch.Generator().manual_seed(0))
    said = data.caption_of(torch.tensor([3]), torch.Generator().manual_seed(0))
    assert said[0] in caps[1] and torch.allclose(cond["text"], BuiltinEncoder().encode(said).tokens, atol=2e-3)
    assert data.text["captions"] == 24


def test_micro_batches_draw_a_caption_per_slot_only_for_text_sets(tmp_path):
    from scm.conditioning import Conditioning
    from scm.train.batches import BatchPlan, micro_batches

    data = load_dataset(encode_captions(_captioned(n=16), "builtin", tmp_path / "e", progress=False))
    plan = BatchPlan(len(data), 8, seed=3)
    first = micro_batches(data, plan, 0, 0, 2, 1, Conditioning(3), "cpu")
    again = micro_batches(data, plan, 0, 0, 2, 1, Conditioning(3), "cpu")
    assert all(a.cond.keys() == {"labels"} for a in first)  # the run takes what its network takes
    draws = data.caption_of(plan.slot(0, 1, 2), plan.caption_generator(0, 1))
    assert draws == data.caption_of(plan.slot(0, 1, 2), plan.caption_generator(0, 1))
    assert torch.equal(first[1].x0, again[1].x0)
    text = Conditioning(0, "cfg", 1.0, TextConfig.of_data(data.text, caption_dropout=0.5))
    prompts = micro_batches(data, plan, 0, 0, 2, 1, text, "cpu")
    assert prompts[0].cond.keys() == {"text", "text_mask", "text_pooled"}
    assert all(torch.equal(a.cond["text"], b.cond["text"]) for a, b in
               zip(prompts, micro_batches(data, plan, 0, 0, 2, 1, text, "cpu"), strict=True))
    dropped = torch.cat([~m.cond["text_mask"].any(1) for m in prompts])  # the empty prompt has no token
    assert 0 < int(dropped.sum()) < 16
    chosen = data.batch(plan.slot(0, 1, 2), choice=plan.caption_generator(0, 1))[1]["text"]
    kept = prompts[1].cond["text_mask"].any(1)
    assert torch.equal(prompts[1].cond["text"][kept], chosen[kept])

    calls = []

    class Labelled:
        text = None

        def __len__(self):
            return 16

        def batch(self, index, device=None):  # no `choice`: a label-only set is called as before
            calls.append(len(index))
            return torch.zeros(len(index), 1), {"labels": torch.zeros(len(index), dtype=torch.long)}

    micro_batches(Labelled(), plan, 0, 0, 1, 1, Conditioning(3), "cpu")
    assert calls == [8]


# -- the command line ------------------------------------------------------------------------------------------------
def test_cli_encode_with_the_builtin_encoder(tmp_path):
    root = _folder(tmp_path / "f")
    for name, text in (("a/x", "a cat"), ("a/y", "a dog\nthe dog"), ("b/z", "a bird")):
        (root / f"{name}.txt").write_text(text)
    code, out = cli("data", "encode", "--text-encoder", "builtin", "--data", root, "--out", tmp_path / "e",
                    "--no-progress")
    assert code == 0, out
    assert "4 captions with builtin prompt embeddings" in out and "16 tokens × 64" in out
    data = load_dataset(tmp_path / "e")
    assert data.shape == (1, 8, 8) and data.text["captions"] == 4
    code, out = cli("data", "info", tmp_path / "e")
    assert code == 0 and "text: encoder builtin, 4 captions of 3 items" in out
    code, out = cli("data", "encode", "--text-encoder", tmp_path / "nothing", "--data", root, "--out", tmp_path / "x")
    assert code == 2 and "--text-encoder" in out and not (tmp_path / "x").exists()
    code, out = cli("data", "encode", "--text-encoder", "builtin", "--data", root, "--out", tmp_path / "x", "--flip")
    assert code == 2 and "--flip needs --vae" in out
    code, out = cli("data", "encode", "--data", root, "--out", tmp_path / "x")
    assert code == 2 and "--text-encoder" in out and "--vae" in out
    shutil.rmtree(root / "b")
    _png(root / "b/z.png", 0, size=10)
    (root / "b/z.txt").write_text("wide")
    code, out = cli("data", "encode", "--text-encoder", "builtin", "--data", root, "--out", tmp_path / "r",
                    "--resolution", "6", "--no-progress")
    assert code == 0 and load_dataset(tmp_path / "r").shape == (1, 6, 6)
