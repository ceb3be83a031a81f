"""vae.py, pixels ↔ latents: the scaling factor, posterior sampling (diffusers' DiagonalGaussianDistribution is the
oracle) and the decoder's output range and failure checks, on a stand-in VAE whose inputs are recorded."""
import logging
from types import SimpleNamespace

import pytest
import torch
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

from latentdiff import vae
from latentdiff.errors import ModelError

SCALE = 0.18215  # SD 1.x's scaling_factor


class FakeVAE:
    """Just the surface vae.py touches: device, dtype, config.scaling_factor, encode(...).latent_dist.parameters,
    decode(z, return_dict=False)[0], to(dtype). Records what it was given; decodes in its dtype, so an fp16 one
    overflows to inf on values past 65504."""

    def __init__(self, params=None, image=None, dtype=torch.float32):
        self.device, self.dtype = torch.device("cpu"), dtype
        self.config = SimpleNamespace(scaling_factor=SCALE)
        self.params, self.image, self.seen = params, image, []

    def encode(self, pixels):
        self.seen.append(pixels)
        return SimpleNamespace(latent_dist=SimpleNamespace(parameters=self.params.to(self.dtype)))

    def decode(self, z, return_dict=True):
        assert return_dict is False
        self.seen.append(z)
        return (self.image.to(self.dtype),)

    def to(self, dtype):
        if dtype is not None:  # as nn.Module.to(None): nothing changes
            self.dtype = dtype
        return self


def posterior_params(seed=0, shape=(2, 8, 4, 4)):
    g = torch.Generator().manual_seed(seed)
    params = torch.randn(shape, generator=g)
    params[:, 4:] = params[:, 4:] * 3 - 1  # log-variances around −1
    params[0, 4, 0, 0], params[0, 5, 0, 0] = 45.0, -60.0  # outside diffusers' clamp to [−30, 20]
    return params


def test_sample_posterior_matches_diffusers_diagonal_gaussian():
    params = posterior_params()
    ours = vae.sample_posterior(params, torch.Generator().manual_seed(7))
    theirs = DiagonalGaussianDistribution(params).sample(torch.Generator().manual_seed(7))
    torch.testing.assert_close(ours, theirs, atol=0, rtol=0)
    assert ours.shape == (2, 4, 4, 4)  # mean and log-variance are stacked on the channel axis (−3)


def test_sample_posterior_without_generator_is_mean_plus_std_noise():
    params = torch.zeros(1, 8, 2, 2)
    params[:, 4:] = -200.0  # σ = e^(−15) after the clamp: the sample is the mean to within 1e-6
    params[:, :4] = torch.arange(16.0).view(1, 4, 2, 2)
    z = vae.sample_posterior(params)
    torch.testing.assert_close(z, params[:, :4], atol=1e-5, rtol=0)
    assert z.dtype == torch.float32 and z.device == params.device


def test_to_latents_and_encode_scale_the_posterior_sample():
    params = posterior_params(1)
    fake = FakeVAE(params=params, dtype=torch.bfloat16)
    expected = DiagonalGaussianDistribution(params.bfloat16().float()).sample(torch.Generator().manual_seed(2)) * SCALE
    torch.testing.assert_close(vae.to_latents(fake, params.bfloat16().float(), torch.Generator().manual_seed(2)), expected, atol=0, rtol=0)

    pixels = torch.rand(2, 3, 16, 16) * 2 - 1
    z = vae.encode(fake, pixels, torch.Generator().manual_seed(2))
    torch.testing.assert_close(z, expected, atol=0, rtol=0)
    assert z.dtype == torch.float32
    assert fake.seen[0].dtype == torch.bfloat16 and torch.equal(fake.seen[0], pixels.bfloat16())  # pixels in the VAE's dtype


def test_posterior_returns_float32_parameters_from_a_low_precision_vae():
    params = posterior_params(2)
    fake = FakeVAE(params=params, dtype=torch.bfloat16)
    out = vae.posterior(fake, torch.zeros(2, 3, 16, 16))
    assert out.dtype == torch.float32 and out.device == fake.device
    torch.testing.assert_close(out, params.bfloat16().float(), atol=0, rtol=0)


def test_decode_unscales_latents_and_maps_minus_one_one_to_zero_one():
    image = torch.tensor([-3.0, -1.0, 0.0, 0.5, 1.0, 2.5]).view(1, 1, 2, 3).expand(1, 3, 2, 3)
    fake = FakeVAE(image=image)
    latents = torch.randn(1, 4, 2, 2, generator=torch.Generator().manual_seed(0))
    out = vae.decode(fake, latents)
    torch.testing.assert_close(fake.seen[0], latents / SCALE, atol=0, rtol=0)  # z = latents / scaling_factor
    # x ∈ [−1, 1] → (x + 1)/2, clamped to [0, 1]
    torch.testing.assert_close(out[0, 0], torch.tensor([[0.0, 0.0, 0.5], [0.75, 1.0, 1.0]]), atol=0, rtol=0)
    assert out.dtype == torch.float32


def test_decode_returns_float32_from_a_bf16_decoder_and_feeds_it_its_dtype():
    fake = FakeVAE(image=torch.full((1, 3, 2, 2), 0.25), dtype=torch.bfloat16)
    out = vae.decode(fake, torch.ones(1, 4, 1, 1))
    assert fake.seen[0].dtype == torch.bfloat16
    assert out.dtype == torch.float32 and torch.allclose(out, torch.full_like(out, 0.625))


def test_decode_accepts_an_all_white_image():
    out = vae.decode(FakeVAE(image=torch.ones(1, 3, 2, 2)), torch.zeros(1, 4, 1, 1))
    assert torch.equal(out, torch.ones(1, 3, 2, 2))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_decode_reports_non_finite_pixels(bad):
    image = torch.zeros(1, 3, 2, 2)
    image[0, 1, 1, 0] = bad
    with pytest.raises(ModelError, match=r"^the VAE decoder produced NaN/inf pixels; decode in float32 \(--precision fp32\)$"):
        vae.decode(FakeVAE(image=image), torch.zeros(1, 4, 1, 1))


def test_decode_reports_an_all_black_image():
    with pytest.raises(ModelError, match="^the VAE decoder produced an all-black image; the model weights are likely broken$"):
        vae.decode(FakeVAE(image=torch.full((1, 3, 2, 2), -1.5)), torch.zeros(1, 4, 1, 1))
    almost = torch.full((1, 3, 2, 2), -1.0)
    almost[0, 2, 1, 1] = -0.9  # one pixel above black is an image
    assert vae.decode(FakeVAE(image=almost), torch.zeros(1, 4, 1, 1)).max() > 0


def test_decode_retries_an_overflowing_fp16_decoder_once_in_float32(caplog):
    image = torch.zeros(1, 3, 2, 2)
    image[0, 0, 0, 0] = 7e4  # past float16's 65504: inf in fp16, a clipped white pixel in float32
    fake = FakeVAE(image=image, dtype=torch.float16)
    latents = torch.randn(1, 4, 1, 1, generator=torch.Generator().manual_seed(0))
    with caplog.at_level(logging.WARNING, logger="latentdiff.vae"):
        out = vae.decode(fake, latents)
    expected = torch.full((1, 3, 2, 2), 0.5)
    expected[0, 0, 0, 0] = 1.0
    torch.testing.assert_close(out, expected, atol=0, rtol=0)
    assert [z.dtype for z in fake.seen] == [torch.float16, torch.float32]  # the same latents, upcast the second time
    torch.testing.assert_close(fake.seen[1], latents / SCALE, atol=0, rtol=0)
    assert fake.dtype == torch.float16  # the VAE is left as it was found
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("WARNING", "the fp16 VAE decoder overflowed; decoding again in float32")]


def test_decode_runs_a_finite_fp16_decoder_once_and_quietly(caplog):
    fake = FakeVAE(image=torch.full((1, 3, 2, 2), 0.25), dtype=torch.float16)
    with caplog.at_level(logging.WARNING, logger="latentdiff.vae"):
        out = vae.decode(fake, torch.ones(1, 4, 1, 1))
    assert torch.equal(out, torch.full((1, 3, 2, 2), 0.625))
    assert len(fake.seen) == 1 and fake.dtype == torch.float16 and not caplog.records


def test_decode_reports_an_fp16_decoder_that_fails_in_float32_too_and_restores_it():
    image = torch.zeros(1, 3, 2, 2)
    image[0, 2, 1, 1] = float("nan")
    fake = FakeVAE(image=image, dtype=torch.float16)
    with pytest.raises(ModelError, match=r"^the VAE decoder produced NaN/inf pixels"):
        vae.decode(fake, torch.zeros(1, 4, 1, 1))
    assert [z.dtype for z in fake.seen] == [torch.float16, torch.float32] and fake.dtype == torch.float16


META = torch.device("meta")  # a device without data: checks where tensors are sent without a second real device


def test_pixels_and_latents_are_sent_to_the_vaes_device():
    fake = FakeVAE(params=posterior_params(), image=torch.zeros(1, 3, 2, 2) + 0.5)
    fake.device = META
    vae.posterior(fake, torch.zeros(2, 3, 16, 16))
    vae.decode(fake, torch.zeros(1, 4, 1, 1))
    assert [x.device for x in fake.seen] == [META, META]


def test_posterior_noise_is_drawn_on_the_generators_device_in_the_parameters_dtype(monkeypatch):
    params64 = posterior_params(4).double()  # float64 draws differ from float32 draws cast up
    torch.testing.assert_close(vae.sample_posterior(params64, torch.Generator().manual_seed(1)),
                               DiagonalGaussianDistribution(params64).sample(torch.Generator().manual_seed(1)), atol=0, rtol=0)
    devices, real = [], torch.randn

    def spy(*args, **kwargs):
        devices.append(kwargs.get("device"))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "randn", spy)
    z = vae.sample_posterior(torch.zeros(1, 8, 2, 2, device=META), torch.Generator().manual_seed(0))
    assert z.device == META and devices == [torch.device("cpu")]  # CPU generator: same latents on any device
    z = vae.sample_posterior(torch.zeros(1, 8, 2, 2, device=META))
    assert z.device == META and devices[1] == META
