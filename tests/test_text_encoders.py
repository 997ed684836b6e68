"""Text encoders: the builtin toy (scm.text) and transformers folders (scm.text_transformers), with tiny random
models and a word-level tokenizer built offline (nothing is downloaded)."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import sys

import pytest
import torch

from scm.errors import ConfigError, MissingDependency
from scm.text import BuiltinEncoder, TextConfig, check_prompts, encode_prompts, load_text_encoder

WORDS = ["a", "photo", "of", "cat", "dog", "red", "blue", "big", "small", "on", "the", "mat", "painting", "sky", "over",
         "sea"]
SPECIALS = ["<pad>", "<s>", "<unk>", "</s>"]  # eos id 3: CLIP pools at the first EOS (id 2 means "argmax")
PROMPTS = ["a photo of a cat", "red dog on the mat", "", "big blue sky over the sea painting of a small cat"]


# -- the builtin encoder ---------------------------------------------------------------------------------------------
def test_builtin_is_deterministic_across_calls_and_instances():
    a, b = BuiltinEncoder(width=16, max_tokens=8), BuiltinEncoder(width=16, max_tokens=8)
    x, y = a.encode(PROMPTS), b.encode(list(reversed(PROMPTS)))
    assert x.tokens.shape == (4, 8, 16) and x.mask.dtype == torch.bool and x.pooled.shape == (4, 16)
    assert torch.equal(x.tokens, y.tokens.flip(0)) and torch.equal(x.pooled, y.pooled.flip(0))
    assert torch.equal(x.tokens, a.encode(PROMPTS).tokens)


def test_builtin_word_order_changes_tokens_but_not_pooled():
    e = BuiltinEncoder(width=16, max_tokens=8).encode(["red cat", "cat red", "Cat, red!"])
    assert not torch.allclose(e.tokens[0], e.tokens[1])
    assert torch.allclose(e.pooled[0], e.pooled[1])
    assert e.mask[2].sum() == 4  # "cat" "," "red" "!"


def test_builtin_empty_prompt_has_no_tokens_and_zero_pooled():
    e = BuiltinEncoder(width=16, max_tokens=8).encode(["", "  "])
    assert not e.mask.any() and not e.pooled.any() and not e.tokens.any()


def test_builtin_truncates_at_max_tokens():
    e = BuiltinEncoder(width=16, max_tokens=3).encode(["a b c d e", "a b c"])
    assert e.mask.all() and torch.equal(e.tokens[0], e.tokens[1]) and torch.equal(e.pooled[0], e.pooled[1])
    assert len(e) == 2 and set(e.cond()) == {"text", "text_mask", "text_pooled"}


def test_check_prompts_refuses_what_is_not_a_prompt():
    assert check_prompts("one") == ["one"]
    assert check_prompts(("a", "b")) == ["a", "b"]
    for bad, words in [([3], "must be text"), (["x" * 2001], "characters"), (["a\x00b"], "NUL")]:
        with pytest.raises(ConfigError, match=words) as e:
            check_prompts(bad, what="caption")
        assert e.value.key == "caption"
    with pytest.raises(ConfigError, match="even"):
        BuiltinEncoder(width=15)
    with pytest.raises(ConfigError):
        BuiltinEncoder(max_tokens=0)


def test_load_text_encoder_builtin_and_its_record():
    enc = load_text_encoder("builtin", max_tokens=5)
    assert enc.max_tokens == 5
    again = load_text_encoder(json.loads(json.dumps(enc.spec)))
    assert again.spec == enc.spec and torch.equal(again.encode(["a cat"]).tokens, enc.encode(["a cat"]).tokens)
    with pytest.raises(ConfigError, match="unknown kind") as e:
        load_text_encoder({"kind": "telepathy"})
    assert e.value.key == "text_encoder"


# -- transformers folders -------------------------------------------------------------------------------------------
def _save_tokenizer(folder, model_max_length=None, pad=True):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate([*SPECIALS, *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 1), ("</s>", 3)])
    kw = {"model_max_length": model_max_length} if model_max_length else {}
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                            **({"pad_token": "<pad>"} if pad else {}), **kw).save_pretrained(folder)


def _tiny_models(seed: int = 0) -> dict:
    import transformers as tf

    ids = {"vocab_size": len(SPECIALS) + len(WORDS), "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 3}
    clip = {**ids, "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 37,
            "max_position_embeddings": 16}
    decoder = {**ids, "hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 1, "num_attention_heads": 2,
               "num_key_value_heads": 1, "head_dim": 16, "max_position_embeddings": 64}
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return {
            "clip": tf.CLIPTextModelWithProjection(tf.CLIPTextConfig(**clip, projection_dim=16)),
            "clip_plain": tf.CLIPTextModel(tf.CLIPTextConfig(**clip)),
            "t5": tf.T5EncoderModel(tf.T5Config(**ids, d_model=24, d_kv=8, d_ff=37, num_layers=1, num_heads=2,
                                                decoder_start_token_id=0)),
            "gemma2": tf.Gemma2ForCausalLM(tf.Gemma2Config(**decoder)),
            "llama": tf.LlamaModel(tf.LlamaConfig(**decoder)),
        }


TOKENIZERS = {"clip": {"model_max_length": 16}, "clip_plain": {"model_max_length": 16}, "t5": {}, "gemma2": {},
              "llama": {"pad": False}}  # llama's tokenizer has no padding token: it pads with EOS


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("text_encoders")
    out = {}
    for name, model in _tiny_models().items():
        model.eval().save_pretrained(root / name)
        _save_tokenizer(root / name, **TOKENIZERS[name])
        out[name] = root / name
    pipe = root / "pipeline"  # a diffusers pipeline: text_encoder/ + tokenizer/, text_encoder_2/ + tokenizer_2/
    for model, sub in [("t5", ""), ("clip", "_2")]:
        shutil.copytree(out[model], pipe / f"text_encoder{sub}", ignore=shutil.ignore_patterns("tokenizer*"))
        _save_tokenizer(pipe / f"tokenizer{sub}", **TOKENIZERS[model])
    out["pipeline"] = pipe
    return out


def _direct(folder, prompts, max_tokens):
    """What the model in `folder` gives when called by hand: (hidden states, attention mask, model output)."""
    import transformers as tf

    cls = {"CLIPTextModelWithProjection": tf.CLIPTextModelWithProjection, "CLIPTextModel": tf.CLIPTextModel,
           "T5EncoderModel": tf.T5EncoderModel}.get(json.loads((folder / "config.json").read_text())
                                                     ["architectures"][0], tf.AutoModel)
    model = cls.from_pretrained(folder).eval()
    tok = tf.AutoTokenizer.from_pretrained(folder)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    batch = tok(prompts, padding="max_length", truncation=True, max_length=max_tokens, return_tensors="pt")
    with torch.no_grad():
        out = model(**batch)
    return out.last_hidden_state, batch["attention_mask"].bool(), out


# name: (width, pooled width, class, default max_tokens: the tokenizer's 16, T5's 120, or 300 capped at 64 positions)
FAMILY = {"clip": (32, 16, "CLIPTextModelWithProjection", 16), "clip_plain": (32, 32, "CLIPTextModel", 16),
          "t5": (24, 0, "T5EncoderModel", 120), "gemma2": (32, 0, "Gemma2Model", 64),
          "llama": (32, 0, "LlamaModel", 64)}


@pytest.mark.parametrize("name", list(FAMILY))
def test_each_family_gives_the_models_states_and_the_tokenizers_mask(folders, name):
    from scm.text_transformers import load_transformers_encoder

    width, pooled_width, cls, default_tokens = FAMILY[name]
    enc = load_transformers_encoder(folders[name])
    assert (enc.width, enc.pooled_width, enc.max_tokens) == (width, pooled_width, default_tokens)
    assert enc.spec["class"] == cls and enc.spec["path"] == str(folders[name].resolve())
    got = enc.encode(PROMPTS)
    assert got.tokens.shape == (4, default_tokens, width) and got.tokens.dtype == torch.float32
    assert got.mask.dtype == torch.bool and (got.pooled is None) == (pooled_width == 0)
    tokens, mask, out = _direct(folders[name], PROMPTS, default_tokens)
    assert torch.equal(got.mask, mask) and got.mask[2].sum() >= 1  # the empty prompt still has its special tokens
    assert torch.allclose(got.tokens, tokens, atol=1e-5)
    if name == "clip":
        assert got.pooled.shape == (4, 16) and torch.allclose(got.pooled, out.text_embeds, atol=1e-5)
    if name == "clip_plain":  # pooler_output: the state at the EOS, the last real token
        last = mask.sum(1) - 1
        assert torch.allclose(got.pooled, tokens[torch.arange(4), last], atol=1e-5)
    again = enc.encode(PROMPTS)
    assert torch.equal(again.tokens, got.tokens) and torch.equal(again.mask, got.mask)
    alone = enc.encode(PROMPTS[:1])  # a prompt's encoding does not depend on the others of its batch
    assert torch.allclose(alone.tokens[0], got.tokens[0], atol=1e-5)


def test_truncation_at_max_tokens_and_the_position_limit(folders):
    from scm.text_transformers import load_transformers_encoder

    long = " ".join(WORDS * 3)
    for name in ("clip", "t5"):
        enc = load_transformers_encoder(folders[name], max_tokens=5)
        got = enc.encode([long, "cat"])
        assert got.tokens.shape[1] == 5 and got.mask[0].all() and got.mask[1].tolist() == [True] * 3 + [False] * 2
        tokens, mask, _ = _direct(folders[name], [long, "cat"], 5)
        assert torch.allclose(got.tokens, tokens, atol=1e-5) and torch.equal(got.mask, mask)
    with pytest.raises(ConfigError, match="17 exceeds its 16 positions") as e:
        load_transformers_encoder(folders["clip"], max_tokens=17)
    assert e.value.key == "max_tokens"
    with pytest.raises(ConfigError, match="int >= 1"):
        load_transformers_encoder(folders["clip"], max_tokens=0)


def test_many_prompts_empty_lists_and_the_cache(folders):
    from scm.text_transformers import load_transformers_encoder

    enc = load_transformers_encoder(folders["t5"], max_tokens=6)
    assert load_transformers_encoder(str(folders["t5"]), max_tokens=6) is enc
    prompts = [f"{WORDS[i % 16]} {WORDS[(3 * i) % 16]}" for i in range(70)]  # more than one batch of 64
    got = enc.encode(prompts)
    assert got.tokens.shape == (70, 6, 24)
    assert torch.allclose(got.tokens[64:], enc.encode(prompts[64:]).tokens, atol=1e-5)
    empty = enc.encode([])
    assert empty.tokens.shape == (0, 6, 24) and empty.mask.shape == (0, 6) and empty.pooled is None
    clip = load_transformers_encoder(folders["clip"]).encode([])
    assert clip.pooled.shape == (0, 16)
    with pytest.raises(ConfigError, match="must be text"):
        enc.encode([None])


def test_a_diffusers_pipeline_folder(folders):
    from scm.text_transformers import load_transformers_encoder

    pipe = load_transformers_encoder(folders["pipeline"])
    alone = load_transformers_encoder(folders["t5"])
    assert pipe.spec["class"] == "T5EncoderModel" and pipe.spec["weights_sha256"] == alone.spec["weights_sha256"]
    assert torch.equal(pipe.encode(PROMPTS).tokens, alone.encode(PROMPTS).tokens)
    second = load_transformers_encoder(folders["pipeline"] / "text_encoder_2")  # its tokenizer is tokenizer_2/
    assert second.spec["class"] == "CLIPTextModelWithProjection" and second.pooled_width == 16
    assert torch.equal(second.encode(PROMPTS).pooled, load_transformers_encoder(folders["clip"]).encode(PROMPTS).pooled)


def test_sharded_and_variant_weights_and_their_digest(folders, tmp_path):
    import transformers as tf

    from scm.text_transformers import load_transformers_encoder

    single = load_transformers_encoder(folders["t5"])
    file = folders["t5"] / "model.safetensors"
    assert single.spec["weights_sha256"] == hashlib.sha256(file.read_bytes()).hexdigest()
    model = tf.T5EncoderModel.from_pretrained(folders["t5"])
    for name, kw in [("sharded", {"max_shard_size": "4KB"}), ("variant", {"variant": "fp16"})]:
        model.save_pretrained(tmp_path / name, **kw)
        _save_tokenizer(tmp_path / name)
        enc = load_transformers_encoder(tmp_path / name)
        assert torch.allclose(enc.encode(PROMPTS).tokens, single.encode(PROMPTS).tokens, atol=1e-6)
    shards = sorted((tmp_path / "sharded").glob("*.safetensors"))
    assert len(shards) > 1
    listing = "".join(f"{hashlib.sha256(s.read_bytes()).hexdigest()}  {s.name}\n" for s in shards)
    assert load_transformers_encoder(tmp_path / "sharded").spec["weights_sha256"] == hashlib.sha256(
        listing.encode()).hexdigest()


class _Trap:
    """Unpickling this makes a folder: the proof that a pickle was loaded."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def test_a_pickle_only_folder_is_refused_without_loading_it(folders, tmp_path, monkeypatch):
    from scm.text_transformers import load_transformers_encoder

    folder = tmp_path / "pickled"
    shutil.copytree(folders["clip"], folder, ignore=shutil.ignore_patterns("*.safetensors"))
    sentinel = tmp_path / "unpickled"
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(_Trap(str(sentinel))))
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load called"))
    with pytest.raises(ConfigError, match=r"pytorch_model\.bin, a pickle") as e:
        load_transformers_encoder(folder)
    assert e.value.key == "text_encoder" and str(folder) in str(e.value) and not sentinel.exists()
    (folder / "pytorch_model.bin").unlink()
    with pytest.raises(ConfigError, match="no safetensors weights"):
        load_transformers_encoder(folder)


def test_folders_that_hold_no_usable_encoder(folders, tmp_path):
    from scm.text_transformers import load_transformers_encoder

    with pytest.raises(ConfigError, match="no such folder"):
        load_transformers_encoder(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"no config\.json"):
        load_transformers_encoder(tmp_path / "empty")
    untokenized = tmp_path / "untokenized"
    shutil.copytree(folders["clip"], untokenized, ignore=shutil.ignore_patterns("tokenizer*", "special*"))
    with pytest.raises(ConfigError, match="no tokenizer") as e:
        load_transformers_encoder(untokenized)
    assert str(untokenized) in str(e.value)
    bert = tmp_path / "bert"
    shutil.copytree(folders["clip"], bert)
    (bert / "config.json").write_text(json.dumps({**json.loads((bert / "config.json").read_text()),
                                                  "model_type": "bert"}))
    with pytest.raises(ConfigError, match=r"model_type 'bert'.*clip_text_model, t5.*gemma2") as e:
        load_transformers_encoder(bert)
    assert e.value.key == "text_encoder" and str(bert) in str(e.value)
    wrong = tmp_path / "wrong"  # a CLIPTextModel's weights under a config that names the projection class
    shutil.copytree(folders["clip_plain"], wrong)
    config = json.loads((wrong / "config.json").read_text())
    (wrong / "config.json").write_text(json.dumps({**config, "architectures": ["CLIPTextModelWithProjection"]}))
    # transformers 5.25 finds only text_projection missing, 5.17 (the GPU machine's) every key: both are named errors
    with pytest.raises(ConfigError, match="not those of its CLIPTextModelWithProjection config") as e:
        load_transformers_encoder(wrong)
    assert str(wrong) in str(e.value)


def test_without_transformers_the_text_extra_is_named(folders, tmp_path, monkeypatch):
    from scm.text_transformers import load_transformers_encoder

    shutil.copytree(folders["t5"], tmp_path / "t5")
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(MissingDependency, match=r"scm\[text\]") as e:
        load_transformers_encoder(tmp_path / "t5")
    assert e.value.extra == "text"


def test_a_recorded_spec_is_checked_and_loads_again(folders, tmp_path):
    from scm.text_transformers import load_transformers_encoder

    folder = tmp_path / "clip"
    shutil.copytree(folders["clip"], folder)
    enc = load_transformers_encoder(folder, max_tokens=8)
    spec = json.loads(json.dumps(enc.spec))
    assert spec["kind"] == "transformers" and spec["max_tokens"] == 8 and spec["model_type"] == "clip_text_model"
    again = load_text_encoder(spec)  # scm.text's entry point, as a run's record is loaded
    assert again.spec == enc.spec and torch.equal(again.encode(PROMPTS).tokens, enc.encode(PROMPTS).tokens)
    assert load_text_encoder(str(folder), max_tokens=8).spec == spec
    text = TextConfig(spec, 8, 32, 16)
    cond = encode_prompts(text, ["a cat"])
    assert set(cond) == {"text", "text_mask", "text_pooled"} and cond["text"].shape == (1, 8, 32)
    with pytest.raises(ConfigError, match="its token width is 32, the run recorded 64"):
        load_transformers_encoder(folder, max_tokens=8, expect={**spec, "width": 64})
    with pytest.raises(ConfigError, match="its class is 'CLIPTextModelWithProjection'"):
        load_transformers_encoder(folder, max_tokens=8, expect={**spec, "class": "CLIPTextModel"})
    _tiny_models(seed=1)["clip"].save_pretrained(folder)  # other weights, same shapes
    stat = (folder / "model.safetensors").stat()
    os.utime(folder / "model.safetensors", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    with pytest.raises(ConfigError, match=r"its weights changed since the run recorded them \(sha256 ") as e:
        load_text_encoder(spec)
    assert str(folder.resolve()) in str(e.value) and e.value.key == "text_encoder"
