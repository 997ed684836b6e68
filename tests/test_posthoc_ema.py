"""Post-hoc EMA (EDM2 §3.2, App. C.3): the maths against independent quadrature and the discrete PowerEMA, snapshots
written by training (layout, resume), reconstruction against directly tracked EMAs, and `scm ema`."""

import itertools
import json
import shutil

import numpy as np
import pytest
import torch
from torch import nn

from scm.config import make_config
from scm.ema_profile import exp_to_std, profile_dot, solve_coefficients, std_to_exp
from scm.posthoc import plan_reconstruction, reconstruct
from scm.runs import RunDir, ema_weights, load_run, load_tensors
from scm.train import train
from scm.train.ema import PowerEMA

from conftest import cli, make_shapes

# A U-Net of 44k parameters on 8×8 images: 80 steps in ~3 s. Batch 8 and snapshots every 32 images (4 steps).
TINY = ["progress=false", "tensorboard=false", "sample_every_kimg=None", "sample_count=4", "sample_ode_steps=1",
        "log_every=1000", "resolution=8", "net.model_channels=8", "net.channel_mult=1,2", "net.num_blocks=1",
        "net.attn_resolutions=0", "net.channel_mult_emb=2", "net.weight_channels=16", "optim.lr_rampup_kimg=0",
        "ema.snapshot_kimg=0.032"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These networks are too small to gain from a second thread, and on a shared 2-core machine two threads
    spin against other processes (measured: 20× slower under load)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def shapes8(tmp_path_factory):
    images, labels = make_shapes(64, res=8)
    path = tmp_path_factory.mktemp("posthoc") / "shapes8.npz"
    np.savez(path, x=images[..., 0], y=labels)
    return path


def _train(data, out, kimg, *extra, resume=False):
    cfg = make_config("tiny-28-diffusion", None, [*TINY, *extra], data=str(data), out=str(out), kimg=kimg, batch=8)
    return train(cfg, resume=resume)


@pytest.fixture(scope="module")
def tracked(shapes8):
    """80 steps tracking σ_rel 0.05, 0.07 and 0.1 directly, with 20 snapshots of all three."""
    out = shapes8.parent / "tracked"
    _train(shapes8, out, 0.64, "ema.stds=0.05,0.07,0.1", "ckpt_every_kimg=0.16", "keep_ckpts=1")
    return out


# -- the maths -------------------------------------------------------------------------------------------------------
def _quad(f, breaks, order=80):
    """∫ f over [0, max(breaks)] by Gauss–Legendre on each piece between breakpoints, independent of the closed
    forms under test. f is smooth on each piece except at τ = 0 (τ^γ, γ ≥ 0.3): the first piece is graded,
    τ = b·u^10, which makes it smooth in u."""
    x, w = np.polynomial.legendre.leggauss(order)
    u, wu = (x + 1) / 2, w / 2  # on [0, 1]
    edges = np.unique(np.concatenate([[0.0], np.asarray(breaks, float)]))
    b = edges[1]
    total = np.tensordot(wu * 10 * b * u ** 9, f(b * u ** 10), axes=(0, 0))
    for a, b in itertools.pairwise(edges[1:]):
        total = total + (b - a) * np.tensordot(wu, f(a + (b - a) * u), axes=(0, 0))
    return total


def _profile(t, g):
    return lambda tau: np.where(tau <= t, (g + 1) * tau ** g / t ** (g + 1), 0.0)


def test_profiles_and_their_inner_products():
    for s in (0.01, 0.05, 0.1, 0.2, 0.27):
        assert abs(exp_to_std(std_to_exp(s)) - s) < 1e-12
    for t_a, g_a, t_b, g_b in ((1.0, 6.94, 1.0, 16.97), (0.3, 0.72, 1.0, 6.94), (2.5, 40.0, 0.7, 3.0)):
        assert abs(_quad(_profile(t_a, g_a), [t_a]) - 1) < 1e-12  # a profile integrates to 1
        p_a, p_b = _profile(t_a, g_a), _profile(t_b, g_b)
        exact = _quad(lambda tau, p_a=p_a, p_b=p_b: p_a(tau) * p_b(tau), [t_a, t_b])
        assert abs(profile_dot(t_a, g_a, t_b, g_b) - exact) < 1e-10 * exact
    # no overflow at millions of images and γ ≈ 100 (σ_rel 0.01): the ratio form
    assert np.isfinite(profile_dot(2e9, std_to_exp(0.01), 1.9e9, std_to_exp(0.01)))


def test_discrete_power_ema_is_the_profile_on_a_step_trajectory():
    """PowerEMA's updates (β_k = (1 − 1/k)^(γ+1), first update a copy) give θ_j the weight
    (j^(γ+1) − (j−1)^(γ+1))/K^(γ+1): the profile's integral over step j's interval. This is what makes the
    continuous maths exact for snapshots (float32 EMA vs float64 sum: 1e-5 relative)."""
    K, batch, gen = 60, 8, torch.Generator().manual_seed(0)
    thetas = torch.randn(K, 5, generator=gen, dtype=torch.float64)
    net = nn.Linear(5, 1, bias=False)
    ema = PowerEMA(net, (0.05, 0.2))
    for k in range(K):
        with torch.no_grad():
            net.weight.copy_(thetas[k][None])
        ema.update(net, (k + 1) * batch, batch)
    j = np.arange(1, K + 1, dtype=np.float64)
    for s in ema.stds:
        g = ema.exps[s]
        w = (j ** (g + 1) - (j - 1) ** (g + 1)) / K ** (g + 1)
        upto = [_quad(_profile(K * batch, g), [k * batch]) for k in j]  # ∫ p over [0, kΔ]
        assert np.allclose(np.diff([0.0, *upto]), w, rtol=1e-10, atol=1e-14)  # the profile's integral per step
        expected = torch.from_numpy(w) @ thetas
        torch.testing.assert_close(ema.weights(s)["weight"][0].double(), expected, rtol=1e-5, atol=1e-6)


def _snapshot_set(n=12, profiles=(0.05, 0.1)):
    t = np.repeat(np.arange(1, n + 1, dtype=np.float64), len(profiles))
    return t, np.tile([std_to_exp(s) for s in profiles], n)


def test_solve_is_exact_for_trajectories_in_the_span_of_the_snapshot_profiles():
    """The normal equations leave a residual r orthogonal to every snapshot profile, so for a weight trajectory
    θ(τ) = Σ_j c_j p_j(τ) the combination reproduces the target EMA ⟨p_r, θ⟩ exactly, whatever its residual.
    Snapshot and target EMAs come from quadrature, not from the closed forms; tolerance 1e-8 relative: float64
    quadrature (~1e-13) amplified by the condition of A (~1e5 here)."""
    rng = np.random.default_rng(0)
    for s, n in ((0.07, 12), (0.15, 9), (0.25, 12), (0.02, 12)):
        t_i, g_i = _snapshot_set(n)
        c = rng.normal(size=(len(t_i), 3))  # a 3-parameter trajectory
        theta = lambda tau, t_i=t_i, g_i=g_i, c=c: sum(  # noqa: E731
            _profile(t, g)(tau)[..., None] * c[j] for j, (t, g) in enumerate(zip(t_i, g_i, strict=True)))
        ema_of = lambda t, g, t_i=t_i, theta=theta: _quad(lambda tau: _profile(t, g)(tau)[..., None] * theta(tau),  # noqa: E731
                                                          t_i)
        snaps = np.stack([ema_of(t, g) for t, g in zip(t_i, g_i, strict=True)])
        x, err = solve_coefficients(t_i, g_i, float(n), std_to_exp(s))
        target = ema_of(float(n), std_to_exp(s))
        assert np.allclose(x @ snaps, target, rtol=1e-8, atol=1e-8 * np.abs(target).max()), (s, n)
    assert err > 0.1  # σ_rel 0.02 is far from the span of 12 snapshots, and still exact on this trajectory
    # a target that is one of the snapshots: that snapshot alone, residual 0
    t_i, g_i = _snapshot_set(12)
    x, err = solve_coefficients(t_i, g_i, 12.0, std_to_exp(0.1))
    assert err < 1e-6 and np.allclose(x, np.eye(len(t_i))[-1], atol=1e-8)


def test_error_on_a_polynomial_trajectory_is_bounded_by_the_residual():
    """θ(τ) = 1 + τ − 2τ² + τ³ (in units of the run): every power EMA has the closed form
    Σ_n c_n (γ+1) t^n / (γ+n+1). By Cauchy–Schwarz |reconstruction − target| ≤ ‖r‖·‖θ‖ (L² on [0, t_r]). With
    40 snapshots of σ_rel 0.05 and 0.1, every σ_rel the default limit accepts (residual ≤ 0.05) comes closer to
    its target than the EMA of a σ_rel 10 % larger is (measured: 0.15 % to 53 % of that distance); σ_rel 0.27,
    rejected (residual 0.065), does not (250 %)."""
    coef = [1.0, 1.0, -2.0, 1.0]
    ema = lambda t, g: sum(c * (g + 1) * t ** n / (g + n + 1) for n, c in enumerate(coef))  # noqa: E731
    theta_norm = np.sqrt(_quad(lambda tau: np.polyval(coef[::-1], tau) ** 2, [1.0]))
    t_i, g_i = _snapshot_set(40)
    t_i = t_i / 40
    snaps = np.array([ema(t, g) for t, g in zip(t_i, g_i, strict=True)])
    for s in (0.02, 0.03, 0.07, 0.15, 0.2, 0.25, 0.27):
        g = std_to_exp(s)
        x, err = solve_coefficients(t_i, g_i, 1.0, g)
        error = abs(x @ snaps - ema(1.0, g))
        assert error <= err * np.sqrt(profile_dot(1.0, g, 1.0, g)) * theta_norm + 1e-12
        closer = error < abs(ema(1.0, g) - ema(1.0, std_to_exp(s * 1.1)))
        assert closer == (err <= 0.05), (s, err)


# -- snapshots written by training -----------------------------------------------------------------------------------
def test_training_writes_snapshots_that_survive_checkpoint_pruning(tracked):
    run = RunDir(tracked)
    snaps = run.ema_snapshots()
    assert [s.step for s in snaps] == list(range(4, 81, 4)) and not any(s.end for s in snaps)
    assert [p.name for p in run.checkpoints()] == ["000000080"]  # keep_ckpts=1 pruned four checkpoints
    last = snaps[-1]
    assert last.cur_nimg == 640 and last.batch == 8 and last.stds == (0.05, 0.07, 0.1)
    assert np.allclose(last.exps, [std_to_exp(s) for s in last.stds])
    ckpt = load_tensors(run.latest() / "ema.safetensors")
    snap = load_tensors(last.path)
    assert snap.keys() == ckpt.keys() and all(torch.equal(snap[k], ckpt[k]) for k in ckpt)


def test_reconstruction_matches_directly_tracked_emas(tracked):
    """σ_rel 0.07 from the snapshots of 0.05 and 0.1 only, against the EMA of 0.07 that training tracked. The L²
    error of the weights is measured against the distance to the neighbouring tracked profiles (0.05 and 0.1:
    0.8 and 1.3 here), i.e. as a fraction of a ~30 % change of σ_rel. With 20 snapshots it must be < 5 %
    (measured 1 %; profile residual 0.25 %). Halfway (--at-kimg, 10 snapshots, the first of which spans the
    first 4 steps from the random initialization, where the weights move most) < 25 % (measured 14 %; with a
    snapshot at every step it falls to 0.06 %: the error is the snapshots' spacing, not the maths). σ_rel 0.1
    from snapshots that hold it is that snapshot: float32 round-off."""
    direct = load_tensors(RunDir(tracked).latest() / "ema.safetensors")
    flat = lambda w: torch.cat([w[k].double().flatten() for k in sorted(w)])  # noqa: E731
    ref = {s: flat(ema_weights(direct, s)) for s in (0.05, 0.07, 0.1)}
    rec = plan_reconstruction(tracked, [0.07], profiles=(0.05, 0.1))
    assert rec.errors[0.07] < 0.01 and len(rec.snapshots) == 20
    error = (flat(reconstruct(rec, 0.07)) - ref[0.07]).norm()
    spacing = min((ref[0.05] - ref[0.07]).norm(), (ref[0.1] - ref[0.07]).norm())
    assert error < 0.05 * spacing, (float(error), float(spacing))
    exact = plan_reconstruction(tracked, [0.1])
    assert (flat(reconstruct(exact, 0.1)) - ref[0.1]).norm() < 1e-6 * ref[0.1].norm()
    # at an earlier time (--at-kimg): against the 0.07 average held by the snapshot of that step
    mid = plan_reconstruction(tracked, [0.07], profiles=(0.05, 0.1), at_kimg=0.32)
    assert mid.step == 40 and mid.snapshots[-1].step == 40 and len(mid.snapshots) == 10
    then = load_tensors(mid.snapshots[-1].path)
    ref_then = {s: flat(ema_weights(then, s)) for s in (0.05, 0.07, 0.1)}
    error = (flat(reconstruct(mid, 0.07)) - ref_then[0.07]).norm()
    assert error < 0.25 * min((ref_then[s] - ref_then[0.07]).norm() for s in (0.05, 0.1))


def test_resume_ends_with_the_snapshot_set_of_a_straight_run(shapes8, tmp_path):
    """Straight to 25 steps vs 13 steps (an end snapshot off the grid), then a resume whose newest checkpoint is
    older than the snapshots (a crash between them, simulated by removing it), then the rest: the same files,
    bit for bit. Through the command line."""
    args = ["--preset", "tiny-28-diffusion", "--data", shapes8, "--batch", 8, *TINY, "ckpt_every_kimg=0.064",
            "keep_ckpts=5"]
    code, text = cli("train", "--out", tmp_path / "straight", "--kimg", 0.2, *args)
    assert code == 0, text
    code, text = cli("train", "--out", tmp_path / "split", "--kimg", 0.1, *args)
    assert code == 0, text
    split = RunDir(tmp_path / "split")
    assert [s.path.name for s in split.ema_snapshots()][-2:] == ["000000012.safetensors", "000000013-end.safetensors"]
    shutil.rmtree(split.latest())  # the run "crashed" after the snapshots of steps 12 and 13, before checkpoint 13
    (split.ckpt_dir / "latest").unlink()
    assert split.latest().name == "000000008"
    code, text = cli("train", "--out", tmp_path / "split", "--kimg", 0.2, "--resume", *args)
    assert code == 0 and "step 8" in text, text
    names = [s.path.name for s in RunDir(tmp_path / "straight").ema_snapshots()]
    assert names == [s.path.name for s in split.ema_snapshots()]
    assert names[-1] == "000000025-end.safetensors" and len(names) == 7
    for name in names:
        a, b = load_tensors(tmp_path / "straight" / "ema-snapshots" / name), load_tensors(split.snapshots_dir / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


# -- the command line ------------------------------------------------------------------------------------------------
def _tree(path):
    return sorted((str(p.relative_to(path)), p.stat().st_mtime_ns, p.stat().st_size) for p in path.rglob("*"))


def test_reconstruct_writes_a_run_that_samples_and_initializes(tracked, shapes8, tmp_path):
    before = _tree(tracked)
    out = tmp_path / "posthoc"
    code, text = cli("ema", "reconstruct", tracked, "--sigma-rel", 0.08, "--sigma-rel", 0.06, "--out", out)
    assert code == 0, text
    assert "σ_rel 0.08: 20 snapshots × 3 profiles" in text and f"wrote {out}" in text
    assert _tree(tracked) == before  # the source run is only read
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["ema"]["stds"] == [0.08, 0.06] and (out / "README.md").is_file()
    record = json.loads((out / "posthoc-ema.json").read_text())
    assert record["kimg"] == 0.64 and len(record["snapshots"]) == 20 and record["targets"]["0.0800"]["error"] < 0.05
    loaded = load_run(out)  # the first σ_rel by default, at the source's last snapshot
    assert loaded.ema_std == 0.08 and loaded.step == 80
    code, text = cli("sample", "--ckpt", out, "--ema", 0.06, "--nfe", 1, "--n", 4, "--out", tmp_path / "s.png")
    assert code == 0 and (tmp_path / "s.png").is_file(), text
    code, text = cli("train", "--preset", "tiny-28-diffusion", "--data", shapes8, "--out", tmp_path / "init",
                     "--init", out, "--kimg", 0.016, "--batch", 8, *TINY)
    assert code == 0 and f"initialized from {out}" in text, text


def test_reconstruct_bad_inputs_exit_2_naming_the_fault(tracked, tmp_path):
    def expect(args, *patterns):
        code, text = cli("ema", "reconstruct", *args)
        assert code == 2 and all(p in text for p in patterns) and "Traceback" not in text, text

    out = ["--out", tmp_path / "o"]
    expect([tracked, "--sigma-rel", 0.3, *out], "--sigma-rel 0.3: must lie in (0, 0.28)")
    expect([tracked, "--sigma-rel", 0.001, *out], "--sigma-rel 0.001:", "relative L² error", "represent σ_rel in [")
    expect([tracked, "--sigma-rel", 0.07, "--at-kimg", 0.7, *out], "--at-kimg 0.7: beyond the last EMA snapshot",
           "000000080.safetensors")
    expect([tracked, "--sigma-rel", 0.07, "--out", tracked / "inside"], "--out", "inside the source run")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    expect([tracked, "--sigma-rel", 0.07, "--out", tmp_path / "full"], "--out", "not empty")
    expect([tmp_path / "nothing", "--sigma-rel", 0.07, *out], "no such run directory")
    bare = tmp_path / "bare"
    shutil.copytree(tracked, bare)
    shutil.rmtree(bare / "ema-snapshots")
    expect([bare, "--sigma-rel", 0.07, *out], "no EMA snapshots", "ema.snapshot_kimg")
    corrupt = tmp_path / "corrupt"
    shutil.copytree(tracked, corrupt)
    victim = corrupt / "ema-snapshots" / "000000040.safetensors"
    victim.write_bytes(victim.read_bytes()[:1000])
    expect([corrupt, "--sigma-rel", 0.07, *out], str(victim), "corrupt")
    assert not (tmp_path / "o").exists()


def test_sweep_writes_json_plot_and_the_best_sigma(tracked, tmp_path, monkeypatch):
    monkeypatch.setenv("SCM_DATA_DIR", str(tmp_path / "data"))
    out = tmp_path / "sweep"
    code, text = cli("ema", "sweep", tracked, "--ref", tracked.parent / "shapes8.npz", "--sigma-rels", "0.03,0.15",
                     "--nfe", 1, "--n", 8, "--seeds", "0,1", "--batch", 8, "--out", out)
    assert code == 0, text
    result = json.loads((out / "sweep.json").read_text())
    assert result["metric"] == "FD-SHAPES8" and [r["sigma_rel"] for r in result["rows"]] == [0.03, 0.15]
    for row in result["rows"]:
        lo, hi = row["interval"]
        assert len(row["values"]) == 2 and lo <= row["FD-SHAPES8"] <= hi
    assert result["best"]["sigma_rel"] in (0.03, 0.15) and "--sigma-rels 0.03,0.15" in result["command"]
    assert f"best σ_rel: {result['best']['sigma_rel']:g}" in text and "| 0.03 |" in text
    assert (out / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    code, text = cli("ema", "sweep", tracked, "--ref", tracked.parent / "shapes8.npz", "--sigma-rels", "0.0005",
                     "--out", out)
    assert code == 2 and "--sigma-rels 0.0005:" in text, text
    # arguments are checked before any work (no reference classifier is trained into a fresh SCM_DATA_DIR), and a
    # failed sweep leaves no --out folder behind
    monkeypatch.setenv("SCM_DATA_DIR", str(tmp_path / "fresh-data"))
    for args, message in ((["--n", 0], "--n 0: need at least 2"), (["--batch", 0], "--batch 0: must be a positive"),
                          (["--metric", "kid"], "--metric 'kid'"), (["--sigma-rels", "0.0005"], "--sigma-rels")):
        code, text = cli("ema", "sweep", tracked, "--ref", tracked.parent / "shapes8.npz", "--out",
                         tmp_path / "new" / "sweep", *args)
        assert code == 2 and message in text and "Traceback" not in text, text
        assert not (tmp_path / "new").exists() and not (tmp_path / "fresh-data").exists(), args
