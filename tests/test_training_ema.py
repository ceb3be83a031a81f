"""training/ema.py: θ_ema ← d·θ_ema + (1 − d)·θ with d = min(decay, (1 + n)/(10 + n)) (the warm-up of diffusers'
EMAModel without power), float32 shadows, swapping for validation, and a state that resumes bit for bit."""
import pytest
import torch

from latentdiff.training.ema import EMA


def params(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(3, 2, generator=g).to(dtype)), torch.nn.Parameter(torch.randn(4, generator=g).to(dtype))]


def test_shadow_starts_as_a_float32_copy_of_the_weights():
    ps = params(torch.bfloat16)
    ema = EMA(iter(ps), decay=0.999)  # any iterable of parameters
    assert ema.parameters == ps and ema.decay == 0.999 and ema.num_updates == 0
    assert all(s.dtype == torch.float32 and torch.equal(s, p.float()) and not s.requires_grad for s, p in zip(ema.shadow, ps))
    first = ps[0].detach().float().clone()
    with torch.no_grad():
        ps[0].add_(1.0)
    assert torch.equal(ema.shadow[0], first)  # a copy, not a view


def test_updates_follow_the_warmup_decay():
    ps = params()
    ema = EMA(ps, decay=0.9)
    expected = [p.detach().clone() for p in ps]
    for n in range(1, 8):
        with torch.no_grad():
            for p in ps:
                p.add_(0.5)
        ema.update()
        d = min(0.9, (1 + n) / (10 + n))  # 2/11, 3/12, … until it reaches 0.9
        expected = [d * e + (1 - d) * p.detach() for e, p in zip(expected, ps)]
        for s, e in zip(ema.shadow, expected):
            torch.testing.assert_close(s, e, atol=1e-6, rtol=1e-6)
    assert ema.num_updates == 7


def test_swapped_puts_the_average_in_and_the_trained_weights_back():
    ps = params()
    ema = EMA(ps, decay=0.5)
    trained = [p.detach().clone() for p in ps]
    ema.shadow = [s + 10 for s in ema.shadow]
    with ema.swapped():
        assert all(torch.equal(p, s) for p, s in zip(ps, ema.shadow))
    assert all(torch.equal(p, t) for p, t in zip(ps, trained))
    ema.copy_to_model()
    assert all(torch.equal(p, s) for p, s in zip(ps, ema.shadow))


def test_state_dict_round_trip_resumes_identically():
    ps = params()
    ema = EMA(ps, decay=0.95)
    for _ in range(3):
        with torch.no_grad():
            ps[0].mul_(1.1)
        ema.update()
    state = ema.state_dict()
    assert set(state) == {"decay", "num_updates", "shadow"} and state["decay"] == 0.95 and state["num_updates"] == 3
    assert all(torch.equal(a, b) for a, b in zip(state["shadow"], ema.shadow))

    resumed = EMA(params(), decay=0.5)  # fresh object: decay, count and shadow all come from the state
    resumed.load_state_dict({**state, "shadow": [s.to(torch.bfloat16) for s in state["shadow"]]})
    assert resumed.decay == 0.95 and resumed.num_updates == 3
    assert all(s.dtype == torch.float32 and s.device == p.device for s, p in zip(resumed.shadow, resumed.parameters))
    resumed.load_state_dict(state)
    with torch.no_grad():
        for p, q in zip(resumed.parameters, ps):
            p.copy_(q)
    ema.update()
    resumed.update()
    assert all(torch.equal(a, b) for a, b in zip(ema.shadow, resumed.shadow))


def test_loaded_shadows_follow_the_parameters_device():
    state = EMA(params(), decay=0.9).state_dict()  # saved from CPU parameters
    on_meta = EMA([torch.nn.Parameter(torch.empty(3, 2, device="meta")), torch.nn.Parameter(torch.empty(4, device="meta"))], 0.9)
    on_meta.load_state_dict(state)
    assert [s.device.type for s in on_meta.shadow] == ["meta", "meta"]


def test_load_state_dict_accepts_the_whole_decay_range():
    """decay in [0, 1) as TrainConfig.ema_decay allows, and a count of 0 (saved before the first update)."""
    for decay in (0.0, 0.9999):
        resumed = EMA(params(), decay=0.5)
        resumed.load_state_dict(EMA(params(), decay=decay).state_dict())
        assert resumed.decay == decay and resumed.num_updates == 0


@pytest.mark.parametrize("decay, num_updates", [(1.0, 3), (1.5, 3), (-0.1, 3), (0.9, -1), (0.9, 2.0)])
def test_load_state_dict_refuses_an_out_of_range_decay_or_count(decay, num_updates):
    ema = EMA(params(), decay=0.9)
    with pytest.raises(ValueError, match=f"^EMA decay {decay!r} or update count {num_updates!r} is out of range$"):
        ema.load_state_dict({**ema.state_dict(), "decay": decay, "num_updates": num_updates})
    assert ema.decay == 0.9 and ema.num_updates == 0  # nothing half-loaded


@pytest.mark.parametrize("shadow", [
    lambda s: s[:1],  # fewer tensors than parameters (another LoRA rank or target set), the first one fitting
    lambda s: s + [torch.zeros(1)],  # more
    lambda s: [s[0], torch.zeros(5)],  # as many, one of another shape
    lambda s: [s[0], s[1].tolist()],  # as many, one not a tensor
], ids=["fewer", "more", "shape", "not-a-tensor"])
def test_load_state_dict_refuses_weights_of_other_parameters(shadow):
    ema = EMA(params(), decay=0.9)
    state = ema.state_dict()
    with pytest.raises(ValueError, match=r"^the EMA weights do not match the trained parameters \(another model, LoRA "
                                         r"rank or --train-text-encoder setting\?\)$"):
        ema.load_state_dict({**state, "shadow": shadow(list(state["shadow"]))})
