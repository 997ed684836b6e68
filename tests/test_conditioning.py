"""Conditioning as data: one `Conditioning` per run decides what the network takes from a batch, the unconditional
input of classifier-free guidance, image i's condition and the default guidance scale; both data-set kinds satisfy
the `Dataset` protocol and hand their conditioning over as a dict."""

import dataclasses
import inspect

import numpy as np
import pytest
import torch

from scm.conditioning import Conditioning, guided
from scm.config import make_config
from scm.data import ImageData, load_dataset
from scm.data.dataset import Dataset, fingerprint
from scm.data.prepared import PreparedData
from scm.errors import SamplerError


def test_guided_combines_conditional_and_unconditional():
    def fn(x, t, labels=None):
        return x * 0 + (0.0 if labels is None else labels[:, None].to(x.dtype))

    x = torch.zeros(3, 2, dtype=torch.float64)
    t = torch.full((3,), 0.5, dtype=torch.float64)
    labels = torch.tensor([1, 2, 3])
    g = guided(fn, {"labels": None})
    torch.testing.assert_close(g(x, t, guidance=1.0, labels=labels), fn(x, t, labels))
    # F_u + s(F_c − F_u) with F_u = 0: s·label, one scale per example
    s = torch.tensor([1.0, 1.5, 2.0], dtype=torch.float64)
    torch.testing.assert_close(g(x, t, guidance=s, labels=labels), (s * labels)[:, None].expand(3, 2))
    # another unconditional input: the one the conditioning names
    g2 = guided(fn, {"labels": torch.zeros(3, dtype=torch.long)})
    torch.testing.assert_close(g2(x, t, guidance=2.0, labels=labels), 2.0 * labels[:, None].double().expand(3, 2))


def test_guidance_takes_two_calls_where_the_inputs_do_not_stack():
    """Class labels' unconditional input is None (no row to stack) for a function that does not read NO_CLASS, a
    scalar t has no batch dimension, a batch past max_stacked is too large: two calls."""
    calls = []

    def fn(x, t, labels=None):
        calls.append(x.shape[0])
        return x + (0.0 if labels is None else labels[:, None].to(x.dtype))

    x, t = torch.zeros(3, 2, dtype=torch.float64), torch.full((3,), 0.5, dtype=torch.float64)
    labels = torch.tensor([1, 2, 3])
    expected = 2.0 * labels[:, None].double().expand(3, 2)
    torch.testing.assert_close(guided(fn, {"labels": None})(x, t, guidance=2.0, labels=labels), expected)
    guided(fn, {"labels": torch.zeros(1, dtype=torch.long)})(x, t, guidance=2.0, labels=labels)  # a null label stacks
    guided(fn, {"labels": torch.zeros(1, dtype=torch.long)})(x, t[0], guidance=2.0, labels=labels)
    for most in (5, 6):  # at most `max_stacked` rows in one call
        guided(fn, {"labels": torch.zeros(1, dtype=torch.long)}, max_stacked=most)(x, t, guidance=2.0, labels=labels)
    assert calls == [3, 3, 6, 3, 3, 3, 3, 6]


def test_class_labels_stack_as_no_class_rows_for_networks_that_read_them():
    """scm's U-Net and DiT read an index outside their classes as no class (`reads_no_class`): the guided evaluation
    of class labels is one call whose unconditional rows are NO_CLASS, and its F_s equals the two calls' (float64;
    1e-12 allows for the summation order of a batch of 6 instead of 3)."""
    from scm.conditioning import NO_CLASS
    from scm.nets import build_net, net_config

    x = torch.randn(3, 1, 16, 16, dtype=torch.float64)
    t = torch.tensor([0.3, 0.9, 1.4], dtype=torch.float64)
    labels, s = torch.tensor([1, 7, 3]), torch.tensor([1.5, 2.0, 4.0], dtype=torch.float64)
    for preset in ("tiny", "dit-tiny"):
        torch.manual_seed(0)
        net = build_net(net_config(preset, img_resolution=16, img_channels=1, label_dim=10), 0.5).double().eval()
        with torch.no_grad():
            for p in net.parameters():  # zero-initialised output and label layers would hide a wrong null row
                p.add_(0.05 * torch.randn_like(p))
        seen = []

        def counted(x, t, labels=None, net=net, seen=seen):
            seen.append(None if labels is None else labels.tolist())
            return net(x, t, labels)

        counted.reads_no_class = net.reads_no_class
        with torch.no_grad():
            one = guided(counted, {"labels": None})(x, t, guidance=s, labels=labels)
            two = guided(counted, {"labels": None}, one_call=False)(x, t, guidance=s, labels=labels)
            F_c, F_u = net(x, t, labels), net(x, t, None)
        assert seen == [[1, 7, 3] + [NO_CLASS] * 3, [1, 7, 3], None], preset
        torch.testing.assert_close(one, two, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(one, F_u + s[:, None, None, None] * (F_c - F_u), rtol=1e-12, atol=1e-12)
        assert (F_c - F_u).abs().max() > 1e-3, preset  # the labels matter, so the rows were told apart


def _run(preset, *overrides, **flags):
    cfg = make_config(preset, None, list(overrides), data="d", out="o", **flags)
    return dataclasses.replace(cfg, net=dataclasses.replace(cfg.net, label_dim=10 if cfg.conditional else 0))


def test_a_runs_conditioning_follows_its_configuration():
    assert Conditioning.of_run(_run("tiny-28-sct")) == Conditioning()
    assert Conditioning.of_run(_run("tiny-28-diffusion", "conditional=true")) == Conditioning(10, "cfg", 1.0)
    guided_student = _run("tiny-28-scd", "conditional=true", "net.guidance_embed=true", "loss.guidance=1.5,3",
                          teacher="t")
    assert Conditioning.of_run(guided_student) == Conditioning(10, "input", 1.5)  # the range's lower end
    embed_only = _run("tiny-28-sct", "conditional=true", "net.guidance_embed=true")
    assert Conditioning.of_run(embed_only) == Conditioning(10, "input", 1.0)  # the network's own default, s = 1
    with pytest.raises(ValueError, match="needs classes"):
        Conditioning(0, "cfg", 1.0)
    with pytest.raises(ValueError, match="default"):
        Conditioning(3, "input")


def test_batches_null_input_and_the_sampled_network():
    labels = torch.tensor([4, 5])
    cond = Conditioning(10, "cfg", 1.0)
    assert cond.from_batch({"labels": labels})["labels"] is labels and Conditioning().from_batch({"labels": 1}) == {}
    assert cond.null() == {"labels": None} and Conditioning().null() == {}
    assert cond.requires() == ("labels",) and Conditioning().requires() == () and cond.kind == "labels"
    net = lambda x, t, labels=None: x + (0 if labels is None else labels[:, None])  # noqa: E731
    x, t = torch.zeros(2, 1), torch.zeros(2)
    sampled = cond.network(net)  # CFG: s = 2 doubles the class offset
    torch.testing.assert_close(sampled(x, t, labels=labels, guidance=2.0), 2.0 * labels[:, None].float())
    assert Conditioning(10, "input", 1.0).network(net) is net


def test_image_i_gets_class_i_mod_classes_unless_asked():
    cond = Conditioning(3, "input", 1.25)
    index = torch.arange(5, 10)
    out = cond.sample_inputs(index)
    assert out["labels"].tolist() == [2, 0, 1, 2, 0] and out["guidance"] == 1.25
    assert cond.sample_inputs(index, 1, 2.0)["labels"].tolist() == [1] * 5
    assert cond.sample_inputs(index, [None, 0, None, 2, None])["labels"].tolist() == [2, 0, 1, 2, 0]
    assert "labels" not in Conditioning().sample_inputs(index) and Conditioning().sample_inputs(index) == {}


@pytest.mark.parametrize("cond,labels,guidance,key,words", [
    (Conditioning(), 1, None, "class_label", "this model is unconditional"),
    (Conditioning(3), 3, None, "class_label", "classes 0..2"),
    (Conditioning(3), [0, -1], None, "class_label", "classes 0..2"),
    (Conditioning(3), 1.0, None, "class_label", "classes 0..2"),
    (Conditioning(3, "cfg", 1.0), None, 0, "guidance", "must be a scale > 0"),
    (Conditioning(3, "cfg", 1.0), None, float("nan"), "guidance", "must be a scale > 0"),
    (Conditioning(3), None, 2.0, "guidance", "takes no guidance"),
])
def test_requests_that_do_not_fit_are_refused_by_name(cond, labels, guidance, key, words):
    assert cond.refusal(labels, guidance)[0] == key and words in cond.refusal(labels, guidance)[1]
    with pytest.raises(SamplerError, match=words) as e:
        cond.check(labels, guidance)
    assert e.value.key == key


def test_both_kinds_of_data_set_satisfy_the_protocol(tmp_path):
    """ImageData and PreparedData have every member of `Dataset`, with its signature, and return conditioning as a
    dict named by `conditions`; non-square images are kept as they are."""
    from scm.data.prepare import prepare

    x = np.random.default_rng(0).integers(0, 256, (6, 24, 32), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", x=x, y=np.arange(6) % 2)
    np.savez(tmp_path / "u.npz", x=x)
    memory, unlabelled = load_dataset(tmp_path / "d.npz"), load_dataset(tmp_path / "u.npz")
    prepared = load_dataset(prepare(tmp_path / "d.npz", tmp_path / "p", resolution=16, progress=False))
    members = [name for name in dir(Dataset) if not name.startswith("_") or name == "__len__"]
    for data, cls in ((memory, ImageData), (unlabelled, ImageData), (prepared, PreparedData)):
        assert isinstance(data, Dataset) and isinstance(data, cls)
        assert all(hasattr(data, name) for name in Dataset.__annotations__)
        for name in members:
            proto, impl = getattr(Dataset, name), getattr(cls, name, None)
            if callable(proto) and not isinstance(proto, property):
                assert list(inspect.signature(impl).parameters) == list(inspect.signature(proto).parameters), name
        items, cond = data.batch(torch.tensor([1, 0]))
        assert items.shape == (2, *data.shape) and tuple(cond) == data.conditions
    assert memory.shape == (1, 24, 32) and prepared.shape == (1, 16, 16) and unlabelled.conditions == ()
    assert memory.batch(torch.tensor([3]))[1]["labels"].tolist() == [1] and memory.latent is None


def test_a_data_sets_fingerprint_tells_copies_from_different_data(tmp_path):
    """Two copies of one set (and the same set in memory and prepared at its own resolution) agree; a changed item,
    label or size is told apart. Item 38 of 64 is among the 16 read (round(k·63/15) for k = 9), item 37 is not: the
    fingerprint is a sample, as its docstring says."""
    from scm.data.prepare import prepare

    x = np.random.default_rng(0).integers(0, 256, (64, 8, 8), dtype=np.uint8)
    y = np.arange(64) % 3
    np.savez(tmp_path / "a.npz", x=x, y=y)
    np.savez(tmp_path / "copy.npz", x=x.copy(), y=y.copy())
    base = fingerprint(load_dataset(tmp_path / "a.npz"))
    assert fingerprint(load_dataset(tmp_path / "copy.npz")) == base
    prepared = load_dataset(prepare(tmp_path / "a.npz", tmp_path / "p", resolution=8, progress=False))
    assert fingerprint(prepared) == base  # the same values in the model's space, read from disk
    def flipped(index: int) -> np.ndarray:
        out = x.copy()
        out[index, 0, 0] ^= 1
        return out

    relabelled = y.copy()
    relabelled[5] = (relabelled[5] + 1) % 3
    changed = {}
    for name, (xx, yy) in {"item": (flipped(38), y), "label": (x, relabelled), "size": (x[:63], y[:63]),
                           "unread item": (flipped(37), y)}.items():
        np.savez(tmp_path / "b.npz", x=xx, y=yy)
        changed[name] = fingerprint(load_dataset(tmp_path / "b.npz")) != base
    assert changed == {"item": True, "label": True, "size": True, "unread item": False}


def test_the_guided_class_teacher_of_scd_runs_once_per_step_on_no_class_rows(tmp_path, monkeypatch):
    """sCD of a class-conditional teacher with guidance (the image demo's setting): the teacher's conditional and
    unconditional evaluations are one call per step, its second half NO_CLASS (`loss.cfg_one_call`)."""
    import scm.conditioning as conditioning
    from scm.train import train

    from conftest import make_shapes

    images, labels = make_shapes(32)
    np.savez(tmp_path / "shapes.npz", x=images[..., 0], y=labels)
    small = ["progress=false", "tensorboard=false", "sample_every_kimg=None", "net.model_channels=16",
             "net.channel_mult=1,2", "net.num_blocks=1", "net.attn_resolutions=7", "conditional=true"]
    teacher = make_config("tiny-28", "diffusion", small, data=str(tmp_path / "shapes.npz"),
                          out=str(tmp_path / "teacher"), kimg=0.016, batch=16)
    train(teacher)
    stacked, stack = [], conditioning._stacked
    monkeypatch.setattr(conditioning, "_stacked", lambda c, u: stacked.append(stack(c, u)) or stacked[-1])
    student = make_config("tiny-28", "scd", [*small, "net.guidance_embed=true", "loss.guidance=1,3"],
                          data=str(tmp_path / "shapes.npz"), out=str(tmp_path / "scd"), kimg=0.032, batch=16,
                          teacher=str(tmp_path / "teacher"))
    train(student)
    assert len(stacked) == 2 and all(s is not None and s["labels"].shape == (32,) for s in stacked)
    assert all((s["labels"][16:] == conditioning.NO_CLASS).all() and (s["labels"][:16] >= 0).all() for s in stacked)
