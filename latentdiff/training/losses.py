"""Training objectives: the diffusion denoising loss (ε or v, Min-SNR-γ weighted) and the VAE loss."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from latentdiff.schedulers import schedules


def offset_noise(shape, offset: float, generator: torch.Generator) -> torch.Tensor:
    """ε ~ N(0, I), plus a per-channel constant when offset > 0 (Guttenberg 2023: lets the model shift mean brightness)."""
    noise = torch.randn(shape, generator=generator)
    if offset:
        noise = noise + offset * torch.randn(shape[:2] + (1,) * (len(shape) - 2), generator=generator)
    return noise


def diffusion_loss(
    pred: torch.Tensor,  # (B, C, h, w) model output
    x0: torch.Tensor,  # (B, C, h, w) clean latents
    noise: torch.Tensor,  # (B, C, h, w) the ε used to make x_t
    t: torch.Tensor,  # (B,) timesteps
    alphas_cumprod: torch.Tensor,
    prediction_type: str,
    snr_gamma: float = 0.0,
) -> torch.Tensor:
    """Mean squared error to the ε or v target, each sample weighted by Min-SNR-γ when snr_gamma > 0.

    Min-SNR-γ (Hang et al. 2023, eq. 11): weight the ε loss by min(SNR_t, γ)/SNR_t, so the easy
    low-noise timesteps stop dominating; for v-prediction the v loss equals (SNR_t + 1)·ε-loss, hence
    min(SNR_t, γ)/(SNR_t + 1).
    """
    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "v_prediction":
        target = schedules.get_velocity(x0, noise, t, alphas_cumprod)
    else:
        raise ValueError(f"prediction_type {prediction_type!r} is not supported; expected epsilon or v_prediction.")
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))  # (B,)
    if not snr_gamma:
        return per_sample.mean()
    snr = schedules.snr(t, alphas_cumprod).float()
    weight = snr.clamp(max=snr_gamma) / (snr + 1 if prediction_type == "v_prediction" else snr)
    weight = torch.where(snr > 0, weight, 1.0)  # ε at zero terminal SNR: the limit of min(SNR, γ)/SNR as SNR → 0
    return (per_sample * weight.to(per_sample.device)).mean()


WORST_FRACTION = 0.01  # the pixels worst_weight looks at: 41 of a 64×64 image, a stray spot's size


def vae_loss(recon: torch.Tensor, x: torch.Tensor, posterior, kl_weight: float, reconstruction: str = "l1",
             worst_weight: float = 0.0):
    """(total, reconstruction, KL): per-pixel L1 or L2 plus β·KL(q(z|x) ‖ N(0, I)) per latent element, plus
    worst_weight × the mean of each image's worst WORST_FRACTION of pixel errors.

    Both means make β independent of resolution; LDM's KL-f8 uses β ≈ 1e-6 (a nearly deterministic autoencoder
    whose latents are only gently pulled toward N(0, I)). A spot of a few wrong pixels barely moves a mean over
    4096 pixels; the worst-pixel term (online hard-example mining, Shrivastava et al. 2016, per pixel) makes it
    the loss.
    """
    diff = recon.float() - x.float()
    per_pixel = (diff.abs() if reconstruction == "l1" else diff.pow(2)).mean(1).flatten(1)  # (B, H·W)
    rec = per_pixel.mean()
    # KL(N(μ, σ²) ‖ N(0, 1)) = ½ (μ² + σ² − 1 − log σ²), averaged over latent elements
    kl = 0.5 * (posterior.mean.pow(2) + posterior.var - 1.0 - posterior.logvar).mean()
    total = rec + kl_weight * kl
    if worst_weight:
        k = max(1, round(WORST_FRACTION * per_pixel.shape[1]))
        total = total + worst_weight * per_pixel.topk(k, dim=1).values.mean()
    return total, rec, kl
