"""precision.py, the one precision policy: names ↔ dtypes, what `auto` resolves to on each device, and the fp16 VAE
exception (the SD VAE decoder overflows in fp16, so diffusers' force_upcast keeps it in float32)."""
import pytest
import torch

from latentdiff import precision
from latentdiff.precision import ComponentDtypes, check_precision, component_dtypes, precision_name, resolve_dtype


@pytest.mark.parametrize("name, dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_precision_names_and_dtypes_round_trip(name, dtype):
    assert precision_name(dtype) == name
    assert resolve_dtype(name, torch.device("cpu")) == dtype
    assert resolve_dtype(name, torch.device("cuda")) == dtype  # an explicit name wins on every device


def test_unknown_precision_is_refused_with_the_choices():
    for ok in ("auto", "fp32", "bf16", "fp16"):
        check_precision(ok)
    with pytest.raises(ValueError, match=r"^unknown precision 'fp8'; expected one of: auto, fp32, bf16, fp16$"):
        check_precision("fp8")
    with pytest.raises(ValueError, match="unknown precision 'AUTO'"):
        resolve_dtype("AUTO", torch.device("cpu"))


@pytest.mark.parametrize("native_bf16", [True, False])
def test_auto_is_fp16_on_accelerators_and_bf16_only_on_cpus_with_native_bf16(monkeypatch, native_bf16):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: native_bf16)
    assert resolve_dtype("auto", torch.device("cuda")) == torch.float16
    assert resolve_dtype("auto", torch.device("mps")) == torch.float16
    assert resolve_dtype("auto", torch.device("cpu")) == (torch.bfloat16 if native_bf16 else torch.float32)
    assert resolve_dtype("auto", torch.device("meta")) == torch.float32  # neither an accelerator nor a CPU


@pytest.mark.parametrize("name, expected", [
    ("fp16", ComponentDtypes(torch.float16, torch.float16, torch.float32)),
    ("bf16", ComponentDtypes(torch.bfloat16, torch.bfloat16, torch.bfloat16)),
    ("fp32", ComponentDtypes(torch.float32, torch.float32, torch.float32)),
])
def test_component_dtypes_keep_the_vae_in_float32_only_for_fp16(name, expected):
    assert component_dtypes(name, "cpu") == expected  # a device name is accepted as well as a torch.device
    assert component_dtypes(name, torch.device("cpu")) == expected


def test_component_dtypes_resolve_auto_for_the_device(monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    assert component_dtypes("auto", "cuda") == ComponentDtypes(torch.float16, torch.float16, torch.float32)
    assert component_dtypes("auto", "cpu") == ComponentDtypes(torch.bfloat16, torch.bfloat16, torch.bfloat16)
