"""training/losses.py against the formulas (and diffusers' DDPMScheduler for the v target): ε/v MSE, Min-SNR-γ
weights as diffusers' train_text_to_image.py computes them, offset noise, and the VAE's reconstruction + KL loss."""
import pytest
import torch
from diffusers import DDPMScheduler
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

from latentdiff.schedulers import ScheduleConfig, schedules
from latentdiff.training.losses import diffusion_loss, offset_noise, vae_loss

CONFIG = ScheduleConfig()
AC = schedules.alphas_cumprod(CONFIG)
T = torch.tensor([0, 250, 999])  # SNR ≈ 1170, ≈ 2.3, ≈ 0.0047: above, around and below γ = 5


def tensors(seed=0, shape=(3, 4, 6, 5)):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) for _ in range(3))


def per_sample_mse(a, b):
    return ((a - b) ** 2).mean(dim=(1, 2, 3))


def test_epsilon_loss_is_the_mse_to_the_noise():
    pred, x0, noise = tensors()
    loss = diffusion_loss(pred, x0, noise, T, AC, "epsilon")
    torch.testing.assert_close(loss, ((pred - noise) ** 2).mean(), atol=1e-6, rtol=1e-6)
    assert loss.dtype == torch.float32 and loss.ndim == 0
    torch.testing.assert_close(diffusion_loss(pred.bfloat16(), x0, noise, T, AC, "epsilon"),
                               ((pred.bfloat16().float() - noise) ** 2).mean(), atol=1e-6, rtol=1e-6)


def test_v_loss_is_the_mse_to_diffusers_velocity():
    pred, x0, noise = tensors(1)
    v = DDPMScheduler.from_config(CONFIG.to_diffusers()).get_velocity(x0, noise, T)  # √ᾱ ε − √(1−ᾱ) x0
    torch.testing.assert_close(diffusion_loss(pred, x0, noise, T, AC, "v_prediction"), ((pred - v) ** 2).mean(), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_gamma_weights_each_sample(prediction_type):
    pred, x0, noise = tensors(2)
    gamma = 5.0
    target = noise if prediction_type == "epsilon" else schedules.get_velocity(x0, noise, T, AC)
    snr = AC[T] / (1 - AC[T])
    # diffusers train_text_to_image.py: min(SNR, γ) / SNR for ε, min(SNR, γ) / (SNR + 1) for v (Hang et al. 2023)
    weight = torch.stack([snr, gamma * torch.ones_like(snr)], dim=1).min(dim=1)[0]
    weight = weight / (snr if prediction_type == "epsilon" else snr + 1)
    expected = (per_sample_mse(pred, target) * weight).mean()
    torch.testing.assert_close(diffusion_loss(pred, x0, noise, T, AC, prediction_type, snr_gamma=gamma), expected, atol=1e-6, rtol=1e-5)
    plain = per_sample_mse(pred, target).mean()
    torch.testing.assert_close(diffusion_loss(pred, x0, noise, T, AC, prediction_type), plain, atol=1e-6, rtol=1e-6)  # γ = 0: unweighted
    torch.testing.assert_close(diffusion_loss(pred, x0, noise, T, AC, prediction_type, snr_gamma=0.0), plain, atol=1e-6, rtol=1e-6)


def test_unknown_prediction_type_is_refused():
    pred, x0, noise = tensors()
    with pytest.raises(ValueError, match=r"^prediction_type 'sample' is not supported; expected epsilon or v_prediction\.$"):
        diffusion_loss(pred, x0, noise, T, AC, "sample")


def test_offset_noise_adds_one_constant_per_sample_and_channel():
    shape = (2, 4, 3, 3)
    plain = offset_noise(shape, 0.0, torch.Generator().manual_seed(5))
    torch.testing.assert_close(plain, torch.randn(shape, generator=torch.Generator().manual_seed(5)), atol=0, rtol=0)
    g = torch.Generator().manual_seed(5)
    base, shift = torch.randn(shape, generator=g), torch.randn(2, 4, 1, 1, generator=g)  # Guttenberg 2023: ε + o·N(0, 1) per (b, c)
    out = offset_noise(shape, 0.1, torch.Generator().manual_seed(5))
    torch.testing.assert_close(out, base + 0.1 * shift, atol=1e-7, rtol=0)
    diff = out - plain
    assert torch.allclose(diff, diff[:, :, :1, :1].expand_as(diff), atol=1e-6) and diff.abs().max() > 0


def posterior(seed=3):
    g = torch.Generator().manual_seed(seed)
    return DiagonalGaussianDistribution(torch.randn(2, 8, 3, 3, generator=g))


def test_vae_loss_is_reconstruction_plus_weighted_kl():
    g = torch.Generator().manual_seed(4)
    recon, x = torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, 3, 8, 8, generator=g)
    post = posterior()
    kl_expected = post.kl().sum() / post.mean.numel()  # diffusers' KL(q ‖ N(0, I)) per sample, averaged per element
    total, rec, kl = vae_loss(recon, x, post, 1e-2)  # L1 by default
    torch.testing.assert_close(rec, (recon - x).abs().mean(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(kl, kl_expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(total, rec + 1e-2 * kl, atol=1e-6, rtol=1e-6)
    total2, rec2, kl2 = vae_loss(recon, x, post, 0.5, reconstruction="l2")
    torch.testing.assert_close(rec2, ((recon - x) ** 2).mean(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(total2, rec2 + 0.5 * kl_expected, atol=1e-6, rtol=1e-5)


def test_vae_worst_pixel_term_is_the_mean_of_each_images_worst_errors():
    recon, x = torch.zeros(2, 3, 20, 20), torch.zeros(2, 3, 20, 20)  # 400 pixels: the worst 1 % are 4
    recon[0, :, 0, :4] = 1.0  # image 0: four pixels wrong by 1 in every channel (a spot)
    recon[1, 0, 5, 5] = 3.0  # image 1: one pixel wrong by 3 in one channel → per-pixel error 1
    post = posterior()
    total, rec, kl = vae_loss(recon, x, post, 0.0, worst_weight=0.5)
    torch.testing.assert_close(rec, recon.abs().mean())
    worst = (1.0 + 0.25) / 2  # image 0: mean of four 1s; image 1: mean of (1, 0, 0, 0)
    torch.testing.assert_close(total, rec + 0.5 * torch.tensor(worst))


def test_min_snr_weights_follow_the_predictions_device():
    pred = torch.zeros(3, 4, 2, 2, device="meta")  # timesteps on the CPU, predictions elsewhere
    loss = diffusion_loss(pred, pred, pred, T, AC, "epsilon", snr_gamma=5.0)
    assert loss.device.type == "meta" and loss.shape == ()


def test_vae_worst_pixel_term_looks_at_one_pixel_at_least():
    """Under 150 pixels 1 % rounds to 1 or 0: the term is then each image's single worst pixel, not two or none."""
    recon, x = torch.zeros(1, 3, 7, 7), torch.zeros(1, 3, 7, 7)  # 49 pixels: 0.49 rounds to 0
    recon[0, :, 2, 3], recon[0, :, 6, 1] = 1.0, 0.5
    total, rec, _ = vae_loss(recon, x, posterior(), 0.0, worst_weight=2.0)
    torch.testing.assert_close(total, rec + 2.0 * torch.tensor(1.0))
