"""The training objective against independent oracles: the ε and v targets, Min-SNR-γ weights, one EMA step.

Oracles: diffusers' DDPMScheduler.get_velocity (v target), diffusers.training_utils.compute_snr (SNR), and the
Min-SNR weights of diffusers' train_text_to_image.py: min(SNR, γ)/SNR for epsilon, min(SNR, γ)/(SNR + 1) for v.
"""
import pytest
import torch
import torch.nn.functional as F

from latentdiff.schedulers import ScheduleConfig, schedules
from latentdiff.training.ema import EMA
from latentdiff.training.losses import diffusion_loss

# SNR at these timesteps spans both sides of γ = 5 (SD schedule: SNR(0) ≈ 1200, SNR(999) ≈ 0.005)
TIMESTEPS = torch.tensor([0, 40, 150, 300, 600, 999])
GAMMA = 5.0


@pytest.fixture(scope="module")
def reference_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(ScheduleConfig().to_diffusers())


@pytest.fixture(scope="module")
def batch():
    """A model output, clean latents and noise that differ per sample, so per-sample weights matter."""
    g = torch.Generator().manual_seed(0)
    shape = (len(TIMESTEPS), 4, 8, 8)
    x0 = torch.randn(shape, generator=g) * torch.linspace(0.5, 2.0, len(TIMESTEPS)).view(-1, 1, 1, 1)
    noise = torch.randn(shape, generator=g)
    pred = torch.randn(shape, generator=g)
    return pred, x0, noise


def alphas_cumprod():
    return schedules.alphas_cumprod(ScheduleConfig())


def test_snr_table_is_diffusers_compute_snr(reference_scheduler):
    from diffusers.training_utils import compute_snr

    t = torch.arange(0, 1000, 37)
    torch.testing.assert_close(schedules.snr(t, alphas_cumprod()), compute_snr(reference_scheduler, t), rtol=1e-5, atol=0)
    assert (compute_snr(reference_scheduler, TIMESTEPS) > GAMMA).any() and (compute_snr(reference_scheduler, TIMESTEPS) < GAMMA).any()


def test_epsilon_loss_is_mse_to_the_noise(batch):
    pred, x0, noise = batch
    loss = diffusion_loss(pred, x0, noise, TIMESTEPS, alphas_cumprod(), "epsilon")
    torch.testing.assert_close(loss, F.mse_loss(pred, noise), rtol=1e-6, atol=0)
    assert diffusion_loss(noise, x0, noise, TIMESTEPS, alphas_cumprod(), "epsilon").item() == 0.0


def test_v_prediction_loss_is_mse_to_diffusers_velocity(batch, reference_scheduler):
    pred, x0, noise = batch
    v = reference_scheduler.get_velocity(x0, noise, TIMESTEPS)  # √ᾱ_t ε − √(1 − ᾱ_t) x_0
    loss = diffusion_loss(pred, x0, noise, TIMESTEPS, alphas_cumprod(), "v_prediction")
    torch.testing.assert_close(loss, F.mse_loss(pred, v), rtol=1e-5, atol=0)
    assert diffusion_loss(v, x0, noise, TIMESTEPS, alphas_cumprod(), "v_prediction").item() < 1e-10
    # predicting ε is not enough for a v model: at high noise v ≈ −x_0, far from ε
    assert diffusion_loss(noise, x0, noise, TIMESTEPS, alphas_cumprod(), "v_prediction").item() > 0.5


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weights_match_diffusers_train_text_to_image(batch, reference_scheduler, prediction_type):
    from diffusers.training_utils import compute_snr

    pred, x0, noise = batch
    target = noise if prediction_type == "epsilon" else reference_scheduler.get_velocity(x0, noise, TIMESTEPS)
    snr = compute_snr(reference_scheduler, TIMESTEPS)
    clipped = torch.stack([snr, GAMMA * torch.ones_like(snr)], dim=1).min(dim=1)[0]
    weights = clipped / snr if prediction_type == "epsilon" else clipped / (snr + 1)
    expected = (F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3)) * weights).mean()
    loss = diffusion_loss(pred, x0, noise, TIMESTEPS, alphas_cumprod(), prediction_type, snr_gamma=GAMMA)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=0)
    unweighted = diffusion_loss(pred, x0, noise, TIMESTEPS, alphas_cumprod(), prediction_type, snr_gamma=0.0)
    assert abs(loss.item() - unweighted.item()) > 0.01 * unweighted.item()  # the weights really are applied


def test_one_ema_step_follows_its_formula():
    """θ_ema ← d·θ_ema + (1 − d)·θ with d = min(decay, (1 + n)/(10 + n)), n the update count after this update."""
    theta0 = torch.tensor([1.0, -2.0, 4.0])
    p = torch.nn.Parameter(theta0.clone())
    ema = EMA([p], decay=0.999)
    with torch.no_grad():
        p.copy_(torch.tensor([3.0, 0.0, -4.0]))
    ema.update()  # n = 1: d = min(0.999, 2/11) = 0.1818… (far from 1 − d)
    d = 2 / 11
    torch.testing.assert_close(ema.shadow[0], d * theta0 + (1 - d) * p.detach(), rtol=1e-6, atol=1e-6)
    assert ema.num_updates == 1

    before = ema.shadow[0].clone()
    ema.num_updates = 1000  # warm: the decay cap binds, d = 0.9
    ema.decay = 0.9
    with torch.no_grad():
        p.copy_(torch.tensor([10.0, 10.0, 10.0]))
    ema.update()
    torch.testing.assert_close(ema.shadow[0], 0.9 * before + 0.1 * p.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(p.detach(), torch.tensor([10.0, 10.0, 10.0]))  # the model's own weights are untouched

    with ema.swapped():
        torch.testing.assert_close(p.detach(), ema.shadow[0])
    torch.testing.assert_close(p.detach(), torch.tensor([10.0, 10.0, 10.0]))


def test_min_snr_weight_is_finite_at_zero_terminal_snr():
    """A zero-terminal-SNR schedule (Lin et al. 2023) has SNR = 0 at t = T−1: the ε weight min(SNR, γ)/SNR → 1 there."""
    from latentdiff.schedulers import ScheduleConfig, schedules
    from latentdiff.training.losses import diffusion_loss

    ac = schedules.alphas_cumprod(ScheduleConfig(rescale_betas_zero_snr=True, timestep_spacing="trailing"))
    t = torch.tensor([999, 10])
    assert schedules.snr(t, ac)[0] == 0
    x0, noise, pred = (torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(i)) for i in range(3))
    loss = diffusion_loss(pred, x0, noise, t, ac, "epsilon", snr_gamma=5.0)
    per_sample = (pred - noise).pow(2).mean(dim=(1, 2, 3))
    snr = schedules.snr(t, ac)
    torch.testing.assert_close(loss, (per_sample * torch.stack([torch.tensor(1.0), snr[1].clamp(max=5) / snr[1]])).mean())
