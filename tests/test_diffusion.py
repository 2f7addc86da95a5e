"""EDM set diffusion: formulas, permutation equivariance, guidance, samplers, training and resume."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from r4t_pipeline.diffusion import (
    DenoiserConfig,
    DiffusionRetrieverModel,
    DiffusionTrainConfig,
    EDMPrecond,
    NoiseSchedule,
    OnnxPrecond,
    SetDenoiser,
    dpm2m_sample,
    edm_loss,
    guided_denoiser,
    heun_sample,
    loss_weight,
    parameter_count,
    train_diffusion,
)

DIM, ROWS, TARGETS, REPEATS = 8, 3, 4, 8


pytestmark = pytest.mark.usefixtures("single_thread")


def unit_vectors(*shape: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return nn.functional.normalize(torch.randn(*shape, generator=generator), dim=-1)


class RandomNet(nn.Module):
    """An arbitrary fixed F(x; c_noise, cond) with the SetDenoiser call signature."""

    def __init__(self, dim: int, scale: float = 3.0):
        super().__init__()
        self.mix = nn.Linear(dim, dim)
        self.scale = scale

    def forward(self, x, c_noise, cond, cond_mask=None, drop_cond=None):
        return self.scale * torch.tanh(self.mix(x) + cond[:, None] + c_noise[:, None, None])


def randomized_denoiser(cfg: DenoiserConfig) -> SetDenoiser:
    """A SetDenoiser with every weight random: adaLN-Zero's zero init would make equivariance trivial."""
    torch.manual_seed(0)
    net = SetDenoiser(cfg)
    for p in net.parameters():
        nn.init.normal_(p, std=0.3)
    return net.eval()


def set_distance(sample: np.ndarray, target: np.ndarray) -> float:
    """Largest row distance under the best row matching (rows carry no order)."""
    return min(
        float(np.linalg.norm(sample[list(perm)] - target, axis=1).max())
        for perm in itertools.permutations(range(len(target)))
    )


def test_preconditioning_returns_input_as_sigma_vanishes():
    precond = EDMPrecond(RandomNet(DIM), sigma_data=0.35)
    x, cond = 0.35 * torch.randn(5, ROWS, DIM), torch.randn(5, DIM)
    with torch.no_grad():
        assert torch.allclose(precond(x, 1e-6, cond), x, atol=1e-5)
        assert not torch.allclose(precond(x, 1.0, cond), x, atol=1e-2)  # F does matter away from sigma = 0


def test_preconditioning_coefficients_at_sigma_data():
    sd = 0.2
    zero_net = EDMPrecond(RandomNet(DIM, scale=0.0), sd)  # F = 0: D = c_skip x
    ones = torch.ones(2, ROWS, DIM)
    assert torch.allclose(zero_net(ones, sd, torch.zeros(2, DIM)), ones / 2)  # c_skip(sigma_d) = 1/2
    net = RandomNet(DIM)
    precond = EDMPrecond(net, sd)
    x, cond = torch.randn(2, ROWS, DIM), torch.randn(2, DIM)
    with torch.no_grad():
        expected = x / 2 + sd / math.sqrt(2) * net(x / (sd * math.sqrt(2)), torch.full((2,), math.log(sd) / 4), cond)
        assert torch.allclose(precond(x, sd, cond), expected, atol=1e-6)


def test_loss_weight_is_inverse_squared_c_out_and_loss_matches_formula():
    sd = 0.088
    sigma = torch.tensor([0.002, 0.088, 1.0, 10.0])
    c_out = sigma * sd / (sigma**2 + sd**2).sqrt()
    assert torch.allclose(loss_weight(sigma, sd) * c_out**2, torch.ones(4))
    assert loss_weight(torch.tensor(sd), sd).item() == pytest.approx(2 / sd**2)

    precond = EDMPrecond(RandomNet(DIM), sd)
    y, noise, cond = sd * torch.randn(4, ROWS, DIM), torch.randn(4, ROWS, DIM), torch.randn(4, DIM)
    with torch.no_grad():
        denoised = precond(y + sigma.view(-1, 1, 1) * noise, sigma, cond)
        manual = (sigma**2 + sd**2) / (sigma * sd) ** 2 * ((denoised - y) ** 2).mean(dim=(1, 2))
        assert torch.allclose(edm_loss(precond, y, sigma, noise, cond), manual)


def test_denoiser_is_permutation_equivariant_over_rows():
    cfg = DenoiserConfig.preset("smoke", dim=DIM, cond_dim=DIM)
    net = randomized_denoiser(cfg)
    x, c_noise = torch.randn(3, 6, DIM), torch.tensor([-1.0, 0.0, 0.5])
    seeds, mask = torch.randn(3, 4, DIM), torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]]).bool()
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    with torch.no_grad():
        out = net(x, c_noise, seeds, mask)
        assert torch.allclose(net(x[:, perm], c_noise, seeds, mask), out[:, perm], atol=1e-5)
        assert not torch.allclose(out[:, 0], out[:, 1], atol=1e-3)  # rows are not collapsed to one value


def test_padding_and_dropped_conditions_are_ignored():
    net = randomized_denoiser(DenoiserConfig.preset("smoke", dim=DIM, cond_dim=DIM))
    x, c_noise = torch.randn(2, ROWS, DIM), torch.zeros(2)
    seeds, mask = torch.randn(2, 3, DIM), torch.tensor([[1, 1, 0], [1, 0, 0]]).bool()
    other = seeds.clone()
    other[0, 2], other[1, 1:] = 5.0, -5.0  # change only padded tokens
    drop = torch.ones(2, dtype=torch.bool)
    with torch.no_grad():
        assert torch.allclose(net(x, c_noise, seeds, mask), net(x, c_noise, other, mask), atol=1e-6)
        dropped = net(x, c_noise, seeds, mask, drop)
        assert torch.allclose(dropped, net(x, c_noise, torch.randn(2, DIM), drop_cond=drop), atol=1e-6)
        assert not torch.allclose(dropped, net(x, c_noise, seeds, mask), atol=1e-3)


def test_guidance_zero_is_the_conditional_denoiser():
    precond = EDMPrecond(randomized_denoiser(DenoiserConfig.preset("smoke", dim=DIM, cond_dim=DIM)), 0.35)
    x, cond = torch.randn(4, ROWS, DIM), torch.randn(4, DIM)
    with torch.no_grad():
        d_cond = precond(x, 0.5, cond)
        d_uncond = precond(x, 0.5, cond, drop_cond=torch.ones(4, dtype=torch.bool))
        assert torch.equal(guided_denoiser(precond, cond, guidance=0.0)(x, 0.5), d_cond)
        guided = guided_denoiser(precond, cond, guidance=0.1)(x, 0.5)
        assert torch.allclose(guided, d_uncond + 1.1 * (d_cond - d_uncond), atol=1e-6)
        assert not torch.allclose(guided, d_cond, atol=1e-4)
    calls = []
    counted = lambda *args, **kwargs: calls.append(args[0].shape[0]) or precond(*args, **kwargs)  # noqa: E731
    guided_denoiser(counted, cond, guidance=0.1)(x, 0.5)
    assert calls == [8]  # conditional and unconditional estimates in one forward pass over the stacked batch


def test_parameter_count_matches_a_built_model():
    cfg = DenoiserConfig.preset("smoke", dim=DIM, cond_dim=DIM)
    assert parameter_count(cfg) == sum(p.numel() for p in SetDenoiser(cfg).parameters())


@pytest.fixture(scope="module")
def overfit(tmp_path_factory):
    """A tiny model trained on 4 sets of 3 unit rows, each with its own condition."""
    targets = unit_vectors(TARGETS, ROWS, DIM, seed=1).numpy()
    conditions = unit_vectors(TARGETS, DIM, seed=2).numpy()
    cfg = DenoiserConfig.preset("smoke", dim=DIM, cond_dim=DIM)
    train_cfg = DiffusionTrainConfig(steps=500, batch_size=64, lr=5e-3, warmup_steps=20, ema_decay=0.99)
    result = train_diffusion(targets, conditions, cfg, train_cfg, tmp_path_factory.mktemp("overfit") / "model")
    return DiffusionRetrieverModel.load(result.checkpoint_dir, "cpu"), targets, conditions, result


@pytest.mark.parametrize("solver", [heun_sample, dpm2m_sample])
def test_ode_solvers_converge_to_the_exact_flow_of_gaussian_data(solver):
    """For data N(0, s^2 I) the ideal denoiser is D(x; sigma) = x s^2 / (s^2 + sigma^2), and the probability-flow ODE
    carries x(sigma_max) to x(0) = x(sigma_max) s / sqrt(s^2 + sigma_max^2): both second-order solvers land there, and
    doubling the steps shrinks the error about fourfold (first-order solvers: twofold)."""
    s, sigma_min, sigma_max = 0.3, 0.002, 10.0

    def solve(steps: int) -> torch.Tensor:
        return solver(lambda x, sigma: x * s**2 / (s**2 + sigma**2), (4, 3, 5), steps=steps, sigma_min=sigma_min,
                      sigma_max=sigma_max, generator=torch.Generator().manual_seed(0), device="cpu").double()

    start = sigma_max * torch.randn((4, 3, 5), generator=torch.Generator().manual_seed(0)).double()
    exact = start * s / math.sqrt(s**2 + sigma_max**2)
    errors = [((solve(n) - exact).norm() / exact.norm()).item() for n in (16, 32, 64)]
    assert errors[0] < 0.05
    assert errors[1] < errors[0] / 3 and errors[2] < errors[1] / 3


@pytest.mark.parametrize(("sampler", "steps"), [("heun", 16), ("dpm2m", 16), ("sde", 64)])
def test_samples_land_on_their_own_targets(overfit, sampler, steps):
    model, targets, conditions, _ = overfit
    samples = model.sample(np.repeat(conditions, REPEATS, 0), sampler=sampler, steps=steps, guidance=0.0, seed=1)
    assert samples.shape == (TARGETS * REPEATS, ROWS, DIM)
    own = np.array([set_distance(s, targets[i // REPEATS]) for i, s in enumerate(samples)])
    # Random unit rows in 8-d are ~1.4 apart. A model this small still sends two rows to the same target row
    # in a few percent of Heun samples (for any step count; the SDE corrects most), hence the quantiles.
    assert np.median(own) < 0.15
    assert np.mean(own < 0.3) >= 0.85


def test_training_reduced_the_loss_and_wrote_the_checkpoint(overfit):
    _, targets, _, result = overfit
    assert np.mean(result.loss_history[-50:]) < 0.6 * np.mean(result.loss_history[:50])
    assert result.sigma_data == pytest.approx(float(targets.std()))
    assert sorted(p.name for p in result.checkpoint_dir.iterdir()) == [
        "config.json",
        "model.safetensors",
        "training_state.pt",
    ]
    assert json.loads((result.checkpoint_dir / "config.json").read_text())["sigma_data"] == result.sigma_data


def test_seeds_determine_samples_and_rows_are_normalised(overfit):
    model, _, conditions, _ = overfit
    same = [model.sample(conditions, steps=8, seed=7) for _ in range(2)]
    assert np.array_equal(*same)
    assert not np.allclose(same[0], model.sample(conditions, steps=8, seed=8))
    assert np.allclose(np.linalg.norm(same[0], axis=-1), 1.0, atol=1e-5)
    raw = model.sample(conditions, steps=8, seed=7, normalize=False)
    assert np.allclose(raw / np.linalg.norm(raw, axis=-1, keepdims=True), same[0], atol=1e-6)
    assert model.sample(conditions, steps=8, seed=7, num_rows=5).shape == (TARGETS, 5, DIM)


def test_the_denoiser_in_onnx_runtime_samples_what_pytorch_samples(tmp_path):
    cfg = DenoiserConfig(dim=DIM, cond_dim=DIM, hidden=32, mlp=64, heads=2, layers=2)
    model = DiffusionRetrieverModel(EDMPrecond(randomized_denoiser(cfg), 0.3), NoiseSchedule(), ROWS)
    eager = model.sample(unit_vectors(4, DIM, seed=1).numpy(), sampler="heun", steps=6, guidance=0.5, seed=2)
    model.network = OnnxPrecond(model.precond, tmp_path)
    conditions = unit_vectors(4, DIM, seed=1).numpy()
    np.testing.assert_allclose(model.sample(conditions, sampler="heun", steps=6, guidance=0.5, seed=2), eager,
                               atol=1e-5)  # guidance: the batch stacked with its dropped-condition copy
    for batch, rows in ((1, ROWS), (4, 5)):  # batch and set size other than the exported example's
        model.network = model.precond
        eager = model.sample(conditions[:batch], sampler="dpm2m", steps=8, guidance=0.0, seed=3, num_rows=rows)
        model.network = OnnxPrecond(model.precond, tmp_path)
        onnx = model.sample(conditions[:batch], sampler="dpm2m", steps=8, guidance=0.0, seed=3, num_rows=rows)
        np.testing.assert_allclose(onnx, eager, atol=1e-5)
    assert len(list(tmp_path.glob("*.onnx"))) == 1  # exported once for these weights
    with pytest.raises(ValueError, match="condition sequences run in PyTorch"):
        model.network(torch.zeros(2, ROWS, DIM), 1.0, torch.zeros(2, 3, DIM), torch.ones(2, 3, dtype=torch.bool))


def test_resume_continues_from_the_last_checkpoint(tmp_path):
    targets, conditions = unit_vectors(6, ROWS, DIM, seed=3).numpy(), unit_vectors(6, DIM, seed=4).numpy()
    cfg = DenoiserConfig(dim=DIM, cond_dim=DIM, hidden=32, mlp=32, heads=2, layers=1, dropout=0.1)
    train_cfg = DiffusionTrainConfig(steps=12, batch_size=8, warmup_steps=2, checkpoint_every=5, log_every=1)

    class Crash(Exception):
        pass

    def crash_at_step_8(step, metrics):
        if step == 8:
            raise Crash

    with pytest.raises(Crash):
        train_diffusion(targets, conditions, cfg, train_cfg, tmp_path / "resumed", log_fn=crash_at_step_8)
    assert not (tmp_path / "resumed").exists()
    partial = tmp_path / "resumed.partial" / "training_state.pt"
    assert torch.load(partial, weights_only=True)["step"] == 5

    logged = []
    resumed = train_diffusion(
        targets, conditions, cfg, train_cfg, tmp_path / "resumed", log_fn=lambda step, m: logged.append(step)
    )
    assert (resumed.steps, resumed.steps_run, logged[0]) == (12, 7, 6)
    assert not partial.parent.exists()
    straight = train_diffusion(targets, conditions, cfg, train_cfg, tmp_path / "straight")
    assert resumed.loss_history == pytest.approx(straight.loss_history)
    weights = [load_file(r.checkpoint_dir / "model.safetensors") for r in (resumed, straight)]
    assert all(torch.allclose(weights[0][k], weights[1][k], atol=1e-6) for k in weights[1])


def test_bad_inputs_raise_value_errors_naming_the_field(tmp_path):
    cfg = DenoiserConfig.preset("smoke", dim=DIM, cond_dim=DIM)
    targets, conditions = unit_vectors(4, ROWS, DIM, seed=5).numpy(), unit_vectors(4, DIM, seed=6).numpy()
    with pytest.raises(ValueError, match="targets"):
        train_diffusion(targets[..., :4], conditions, cfg, DiffusionTrainConfig(steps=1), tmp_path / "m")
    with pytest.raises(ValueError, match="conditions"):
        train_diffusion(targets, conditions[:3], cfg, DiffusionTrainConfig(steps=1), tmp_path / "m")
    with pytest.raises(ValueError, match="hidden"):
        DenoiserConfig(hidden=30, heads=4)


def test_new_targets_retrain_instead_of_returning_the_old_model(tmp_path):
    """A finished checkpoint is reused only for the very same targets and settings."""
    rng = np.random.default_rng(0)
    targets = rng.normal(size=(8, 3, 8)).astype(np.float32)
    conditions = rng.normal(size=(8, 8)).astype(np.float32)
    cfg = DenoiserConfig(dim=8, cond_dim=8, hidden=16, mlp=32, heads=2, layers=1)
    tc = DiffusionTrainConfig(steps=3, batch_size=4, warmup_steps=0, checkpoint_every=2, device="cpu")
    first = train_diffusion(targets, conditions, cfg, tc, tmp_path / "ckpt")
    same = train_diffusion(targets, conditions, cfg, tc, tmp_path / "ckpt")
    changed = train_diffusion(targets + 0.5, conditions, cfg, tc, tmp_path / "ckpt")
    assert (first.steps_run, same.steps_run, changed.steps_run) == (3, 0, 3)


def test_a_query_residual_model_follows_conditions_it_was_not_trained_on(tmp_path):
    """Each set is its condition moved by the same three offsets (as "<query> shoes", "<query> bag", ... move the
    query): generating the offsets, the model puts an unseen condition's set where it belongs; generating the rows
    themselves, it falls back on the sets it was trained on."""
    offsets = 0.5 * unit_vectors(ROWS, DIM, seed=3).numpy()
    seen, unseen = unit_vectors(32, DIM, seed=4).numpy(), unit_vectors(8, DIM, seed=5).numpy()
    cfg = DenoiserConfig.preset("smoke", dim=DIM, cond_dim=DIM)
    median = {}
    for residual in (True, False):
        tc = DiffusionTrainConfig(steps=300, batch_size=64, lr=5e-3, warmup_steps=20, ema_decay=0.99,
                                  query_residual=residual)
        path = train_diffusion(seen[:, None] + offsets, seen, cfg, tc, tmp_path / f"residual_{residual}").checkpoint_dir
        assert json.loads((path / "config.json").read_text())["train"]["query_residual"] is residual
        samples = DiffusionRetrieverModel.load(path, "cpu").sample(unseen, steps=16, guidance=0.0, normalize=False)
        median[residual] = np.median([set_distance(s, t) for s, t in zip(samples, unseen[:, None] + offsets)])
    assert median[True] < 0.25 and median[True] < median[False] / 2, median
    with pytest.raises(ValueError, match="query_residual: the conditions must be one vector per set"):
        train_diffusion(seen[:, None] + offsets, seen[:, None], cfg, tc.model_copy(update={"query_residual": True}),
                        tmp_path / "seeds")
