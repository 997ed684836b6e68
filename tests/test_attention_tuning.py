"""The attention kernels' launch configurations per card (scm.nets.attention_tuning): the table files are checked
where they are read, a card's entry is what the kernels launch with (and its outputs still equal the math path's),
a forced configuration never falls back, and the search times a space and keeps only configurations whose outputs
equal the default's. Without CUDA the kernels run in Triton's interpreter, whose card is "cpu (Triton
interpreter)"; the shapes are tiny because the interpreter is slow."""

import importlib.resources
import json
from pathlib import Path

import pytest
import torch

from scm.errors import ConfigError
from scm.nets import attention_tuning as tuning
from scm.nets.attention import attention_jvp

from conftest import cli, kernel_device


@pytest.fixture
def table_env(tmp_path, monkeypatch):
    """Point SCM_ATTENTION_TUNING at a table file written by the test; the tables are read again around it."""
    path = tmp_path / "tuning.json"

    def use(cards: dict):
        path.write_text(json.dumps({"format": 1, "cards": cards}))
        monkeypatch.setenv(tuning.ENV, str(path))
        tuning.reload()
        return path

    yield use
    monkeypatch.delenv(tuning.ENV, raising=False)
    tuning.reload()


def test_table_key_names_kernel_dtype_and_padded_dims():
    assert tuning.table_key("fwd_tangent", torch.bfloat16, 128, 128) == "fwd_tangent/bfloat16/d128x128"
    with pytest.raises(ValueError, match="kernel 'bwd'"):
        tuning.table_key("bwd", torch.float32, 64, 64)


@pytest.mark.parametrize("value", [[64, 48, 4, 2], [8, 16, 4, 1], [512, 16, 4, 1], [64, 64, 3, 2], [64, 64, 4, 0],
                                   [64, 64, 4], [64, 64, 4, True], "64,64,4,2", [64.0, 64, 4, 2]])
def test_a_bad_configuration_is_refused_naming_the_file_and_key(tmp_path, value):
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"format": 1, "cards": {"Card X": {"configs": {"fwd/bfloat16/d64x64": value}}}}))
    with pytest.raises(ConfigError, match=r"t\.json: card 'Card X', key 'fwd/bfloat16/d64x64'"):
        tuning.read_table(path)


@pytest.mark.parametrize("text, match", [
    (None, "no such attention tuning table"),
    ("{not json", "not a readable JSON"),
    (json.dumps({"format": 2, "cards": {}}), "not an attention tuning table"),
    (json.dumps({"format": 1, "cards": {"C": {"configs": []}}}), "card 'C' has no \"configs\""),
    (json.dumps({"format": 1, "cards": {"C": {"configs": {"bwd/bfloat16/d64x64": [64, 64, 4, 2]}}}}),
     "key 'bwd/bfloat16/d64x64'"),
])
def test_a_missing_or_malformed_table_is_refused_naming_the_file(tmp_path, text, match):
    path = tmp_path / "t.json"
    if text is not None:
        path.write_text(text)
    with pytest.raises(ConfigError, match=match) as err:
        tuning.read_table(path)
    assert str(path) in str(err.value)


def test_write_table_merges_into_a_cards_entry_and_refuses_a_malformed_file(tmp_path):
    path = tmp_path / "t.json"
    tuning.write_table(path, "Card X", {"fwd/bfloat16/d64x64": (64, 64, 4, 3)}, "first")
    tuning.write_table(path, "Card X", {"dq/bfloat16/d64x64": (32, 64, 4, 2)}, "second")
    tuning.write_table(path, "Card Y", {"fwd/bfloat16/d64x64": (128, 32, 8, 2)}, "other card")
    assert tuning.read_table(path) == {
        "Card X": {"fwd/bfloat16/d64x64": (64, 64, 4, 3), "dq/bfloat16/d64x64": (32, 64, 4, 2)},
        "Card Y": {"fwd/bfloat16/d64x64": (128, 32, 8, 2)}}
    assert json.loads(path.read_text())["cards"]["Card X"]["measured"] == "second"
    path.write_text("{broken")
    with pytest.raises(ConfigError, match="not a readable JSON"):
        tuning.write_table(path, "Card X", {}, "x")
    assert path.read_text() == "{broken"   # left as it was


def test_a_bad_table_in_the_environment_is_an_error_at_the_first_launch(kernels, table_env):
    table_env({tuning.INTERPRETER: {"configs": {"fwd/float32/d16x16": [16, 16, 4, 99]}}})
    q = torch.randn(1, 1, 8, 16, device=kernel_device())
    with pytest.raises(ConfigError, match=r"tuning\.json: card 'cpu \(Triton interpreter\)'"):
        kernels.attention_forward(q, q, q, scale=0.25)


def test_the_kernels_launch_with_the_cards_measured_configuration(kernels, table_env):
    if torch.cuda.is_available():
        pytest.skip("the interpreter's card is what the table names here")
    kernels._CHOSEN.clear()
    table_env({tuning.INTERPRETER: {"configs": {"fwd_tangent/float32/d16x16": [32, 16, 4, 1],
                                                "tangent/float32/d16x16": [16, 32, 4, 1]}}})
    g = torch.Generator().manual_seed(0)
    q, k, v, tq, tk, tv = (torch.randn(2, 2, 40, 12, generator=g) for _ in range(6))
    o, t_o, _ = kernels.attention_forward(q, k, v, tq, tk, tv, scale=12**-0.5)
    o_ref, t_ref = attention_jvp(q, k, v, tq, tk, tv, backend="math")
    # float32 kernel vs float32 math: a few ulp × √Nk (tests/test_attention_triton.py)
    torch.testing.assert_close(o, o_ref, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(t_o, t_ref, atol=2e-5, rtol=1e-5)
    chosen = {key[0]: config for key, config in kernels._CHOSEN.items()}
    assert chosen == {"fwd_tangent": (32, 16, 4, 1)}
    kernels.attention_forward(q, k, v, scale=12**-0.5)   # no entry for "fwd": the default list's first
    assert {key[0]: c for key, c in kernels._CHOSEN.items()}["fwd"] == kernels._CANDIDATES["small"][0]


def test_a_forced_configuration_never_falls_back(kernels):
    q = torch.randn(1, 1, 8, 16, device=kernel_device())
    calls = []
    kernel = kernels._fwd_kernel

    class Failing:   # the real kernel, failing its first launch as a card out of shared memory does
        def __getitem__(self, grid):
            def launch(*args, **kw):
                calls.append((kw["BLOCK_M"], kw["BLOCK_N"]))
                if len(calls) == 1:
                    raise RuntimeError("out of resource: shared memory")
                return kernel[grid](*args, **kw)
            return launch

    kernels._CHOSEN.clear()
    try:
        kernels._fwd_kernel = Failing()
        with tuning.forcing("fwd", (16, 16, 4, 1)), pytest.raises(RuntimeError, match="out of resource"):
            kernels.attention_forward(q, q, q, scale=0.25)
        assert calls == [(16, 16)] and not kernels._CHOSEN
        calls.clear()
        kernels.attention_forward(q, q, q, scale=0.25)   # not forced: the next candidate
        assert calls == [tuple(c[:2]) for c in kernels._CANDIDATES["small"][:2]]
    finally:
        kernels._fwd_kernel = kernel
        kernels._CHOSEN.clear()


def test_same_accepts_a_few_units_of_roundoff_and_refuses_more():
    ref = (torch.linspace(-1, 1, 100), torch.full((3,), float("-inf")))
    close = (ref[0] + 2 * 2.0**-8, ref[1])
    assert tuning._same(close, ref, torch.bfloat16) is None
    assert tuning._same((ref[0] + 0.1, ref[1]), ref, torch.bfloat16) == pytest.approx(0.1, rel=1e-3)
    assert tuning._same(close, ref, torch.float32) is not None
    assert tuning._same((ref[0], torch.zeros(3)), ref, torch.bfloat16) == float("inf")


def test_tune_searches_every_kernel_and_keeps_configurations_equal_to_the_default(kernels):
    space = ((16, 16, 4, 1), (32, 16, 4, 1), (16, 32, 4, 1), (16, 16, 2, 1))
    results = tuning.tune(dims=(12,), n=40, batch=1, heads=2, dtype=torch.float32, device=kernel_device(),
                          kernels=tuning.KERNELS, space=space, log=lambda _: None)
    assert list(results) == [tuning.table_key(k, torch.float32, 16, 16) for k in tuning.KERNELS]
    for r in results.values():
        tried = {tuple(c): ms for c, ms in r["tried"]}
        # the three block shapes at their first warps/stages, then the others of the fastest two shapes
        firsts = {c: tried[c] for c in space[:3]}
        assert set(tried) - set(firsts) == ({space[3]} if space[0] in sorted(firsts, key=firsts.get)[:2] else set())
        assert all(isinstance(ms, float) and ms > 0 for ms in tried.values()), r["tried"]
        assert tuple(r["best"]) in space and r["best_ms"] == min(tried.values()) and r["default_ms"] > 0
    # the table keeps a configuration only where it beats the default by more than timing noise
    assert tuning.best_configs(results) == {key: tuple(r["best"]) for key, r in results.items()
                                            if r["best_ms"] < 0.97 * r["default_ms"]}
    fake = {"k": {"best": [16, 16, 4, 1], "best_ms": 1.0, "default_ms": 2.0},
            "j": {"best": [16, 16, 4, 1], "best_ms": 1.99, "default_ms": 2.0}}
    assert tuning.best_configs(fake) == {"k": (16, 16, 4, 1)}


def test_tune_stops_at_its_budget(kernels):
    results = tuning.tune(dims=(12, 16), n=24, batch=1, heads=1, dtype=torch.float32, device=kernel_device(),
                          kernels=("fwd", "dq"), space=((16, 16, 4, 1),), budget_s=0.0, log=lambda _: None)
    assert results == {}


@pytest.mark.parametrize("args, message", [
    (["--dims", "200"], "--dims [200]: head dims lie in 1..128"),
    (["--dtype", "int8"], "--dtype int8: one of bfloat16"),
    (["--n", "0"], "must be > 0"),
    ([], "tuning needs a CUDA card"),
])
def test_the_tuning_command_refuses_bad_arguments_and_a_machine_without_a_card(tmp_path, args, message):
    if torch.cuda.is_available() and not args:
        pytest.skip("a card is here")
    code, output = cli("kernels", "tune", "--out", tmp_path / "t.json", *args)
    assert code == 2 and message in output, output
    assert not (tmp_path / "t.json").exists()


def test_the_packaged_table_is_package_data():
    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    assert '"scm.nets" = ["attention_tuning.json"]' in pyproject
    assert tuning.PACKAGED.name == "attention_tuning.json"


def test_the_packaged_table_once_committed_is_well_formed():
    if not tuning.PACKAGED.is_file():
        pytest.skip("no card's table is packaged yet (benchmarks/kernel_tune.py on a lent GPU writes one)")
    with importlib.resources.as_file(tuning.PACKAGED) as path:
        assert tuning.read_table(path)


def test_kernels_show_names_the_table_entry_or_the_default(kernels, table_env):
    if torch.cuda.is_available():
        pytest.skip("the interpreter's card is what the table names here")
    table = table_env({tuning.INTERPRETER: {"configs": {"dq/float32/d16x16": [32, 16, 4, 1]}}})
    code, output = cli("kernels", "show", "--dims", "12", "--dtype", "float32")
    assert code == 0, output
    assert f"{tuning.ENV} {table}" in output and "card: cpu (Triton interpreter)" in output
    assert "dq/float32/d16x16: BLOCK_M 32, BLOCK_N 16, 4 warps, 1 stages (table)" in output
    first = kernels._CANDIDATES["small"][0]
    assert f"fwd/float32/d16x16: BLOCK_M {first[0]}, BLOCK_N {first[1]}" in output and "(default)" in output
    table.write_text("{broken")
    tuning.reload()
    code, output = cli("kernels", "show")
    assert code == 2 and "not a readable JSON attention tuning table" in output
