"""Checkpoint I/O: original-layout export/load round trips, checked against diffusers' own converters."""
import os
import re

import pytest
import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders import single_file_utils as ref
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel

from latentdiff.checkpoints import (
    CheckpointError,
    clip_keymap,
    load_single_file,
    load_text_encoder_state,
    openclip_keymap,
    read_state_dict,
    save_single_file,
    unet_keymap,
    vae_keymap,
)
from latentdiff.checkpoints.single_file import SHIPPED_CONFIGS, _schedule
from latentdiff.schedulers.schedules import ScheduleConfig

ORIGINAL_KEY = re.compile(
    r"model\.diffusion_model\.(time_embed|input_blocks|middle_block|output_blocks|out)\.\d"
    r"|first_stage_model\.(encoder|decoder)\.(conv_in|conv_out|norm_out|down|mid|up)\."
    r"|first_stage_model\.(quant_conv|post_quant_conv)\.(weight|bias)$"
    r"|cond_stage_model\.transformer\.text_model\.(embeddings|encoder\.layers|final_layer_norm)\."
    r"|cond_stage_model\.model\.(token_embedding|positional_embedding|transformer\.resblocks|ln_final)"
)


def tiny_components(sd2: bool):
    """Random 2-block UNet/VAE and a 2-layer CLIP text encoder, like SD 1.x or SD 2.x in layout only."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32, sample_size=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=(2, 4) if sd2 else 4, use_linear_projection=sd2,
    )
    vae = AutoencoderKL(
        block_out_channels=(32, 64), norm_num_groups=32, layers_per_block=1, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        hidden_act="gelu" if sd2 else "quick_gelu",
    ))
    return unet.eval(), vae.eval(), text_encoder.eval()


@pytest.fixture(scope="module")
def sd1():
    return tiny_components(sd2=False)


@pytest.fixture(scope="module")
def sd2():
    return tiny_components(sd2=True)


@pytest.fixture(scope="module")
def sd1_file(sd1, tmp_path_factory):
    path = tmp_path_factory.mktemp("sd1") / "tiny.safetensors"
    save_single_file(path, *sd1, schedule=ScheduleConfig(prediction_type="v_prediction"))
    return path


def ids():
    return torch.tensor([[49406, 320, 2368, 49407] + [49407] * 73])  # "<start> a cat <end>" padded to 77


def assert_same_weights(expected: dict, actual: dict):
    assert expected.keys() == actual.keys()
    for key, tensor in expected.items():
        assert torch.equal(tensor, actual[key]), key


def assert_loaded(components: dict, originals):
    for name, model in zip(("unet", "vae", "text_encoder"), originals):
        assert_same_weights(model.state_dict(), components[name].state_dict())
        assert not any(t.is_meta for t in [*components[name].parameters(), *components[name].buffers()])
    with torch.no_grad():  # real (non-meta) position_ids buffers: the forward pass works and agrees
        torch.testing.assert_close(components["text_encoder"](ids())[0], originals[2](ids())[0], rtol=0, atol=0)


def test_export_uses_original_names_and_loads_back_identical(sd1, sd1_file):
    state = read_state_dict(sd1_file)
    assert [k for k in state if not ORIGINAL_KEY.match(k)] == []
    # block numbering derived from the config: 2 blocks, layers_per_block=1
    assert state["model.diffusion_model.input_blocks.1.1.proj_in.weight"].shape == (32, 32, 1, 1)
    assert "model.diffusion_model.input_blocks.2.0.op.weight" in state
    assert "model.diffusion_model.output_blocks.1.1.conv.weight" in state  # up block without attention
    assert "model.diffusion_model.output_blocks.3.1.proj_out.weight" in state
    assert "first_stage_model.decoder.up.1.upsample.conv.weight" in state  # ldm counts up blocks from the bottom
    assert state["first_stage_model.encoder.mid.attn_1.q.weight"].shape == (64, 64, 1, 1)

    loaded = load_single_file(sd1_file)
    assert_loaded(loaded, sd1)
    assert loaded["version"] == "custom"
    assert loaded["schedule"].prediction_type == "v_prediction"  # from our metadata
    assert loaded["vae"].config.scaling_factor == 0.18215
    assert loaded["tokenizer"].pad_token == "<|endoftext|>"


def test_key_maps_agree_with_diffusers_converters(sd1, sd1_file):
    """diffusers' own converters turn our export into exactly the models' state dicts."""
    unet, vae, text_encoder = sd1
    state = read_state_dict(sd1_file)
    assert_same_weights(unet.state_dict(), ref.convert_ldm_unet_checkpoint(state, unet.config))
    assert_same_weights(vae.state_dict(), ref.convert_ldm_vae_checkpoint(state, vae.config))
    clip = ref.convert_ldm_clip_checkpoint(state)
    assert_same_weights(text_encoder.state_dict(), {k.removeprefix("text_model."): v for k, v in clip.items()})


@pytest.mark.parametrize("version", ["sd1", "sd2"])
def test_shipped_configs_map_like_diffusers(version):
    """Full-size SD 1.5 / 2.1 layouts, on the meta device: the same keys and shapes as diffusers' converters."""
    folder = SHIPPED_CONFIGS / version
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))
        text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder"))
    text_map = clip_keymap() if version == "sd1" else openclip_keymap(text_encoder.config.num_hidden_layers)
    state = {
        **unet_keymap(unet.config).to_original(unet.state_dict()),
        **vae_keymap(vae.config).to_original(vae.state_dict()),
        **text_map.to_original(text_encoder.state_dict()),
    }
    if version == "sd1":
        text = ref.convert_ldm_clip_checkpoint(state)
    else:
        text = ref.convert_open_clip_checkpoint(text_encoder, state)
    for model, converted in (
        (unet, ref.convert_ldm_unet_checkpoint(state, unet.config)),
        (vae, ref.convert_ldm_vae_checkpoint(state, vae.config)),
        (text_encoder, {k.removeprefix("text_model."): v for k, v in text.items()}),
    ):
        assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in converted.items()}


def test_sd2_openclip_round_trip(sd2, tmp_path):
    unet, vae, text_encoder = sd2
    path = tmp_path / "sd2.safetensors"
    save_single_file(path, unet, vae, text_encoder)
    state = load_file(path)
    assert [k for k in state if not ORIGINAL_KEY.match(k)] == []
    assert state["cond_stage_model.model.transformer.resblocks.1.attn.in_proj_weight"].shape == (96, 32)
    assert state["model.diffusion_model.input_blocks.1.1.proj_in.weight"].shape == (32, 32)  # linear projection

    oracle = ref.convert_open_clip_checkpoint(text_encoder, state)
    assert_same_weights(text_encoder.state_dict(), {k.removeprefix("text_model."): v for k, v in oracle.items()})

    # a real SD 2.x file carries one more resblock (SD 2.x conditions on the penultimate layer),
    # the projection and the logit scale, and no latentdiff metadata
    extra = {k.replace("resblocks.1.", "resblocks.2."): v.clone() for k, v in state.items() if "resblocks.1." in k}
    prefix = "cond_stage_model.model."
    save_file(state | extra | {prefix + "text_projection": torch.zeros(32, 32), prefix + "logit_scale": torch.ones(())}, path)
    loaded = load_single_file(path, config_dir=_config_dir(tmp_path, sd2))
    assert_loaded(loaded, sd2)
    assert loaded["tokenizer"].pad_token == "!"
    assert loaded["schedule"].prediction_type == "v_prediction"  # no scheduler config given: the shipped SD 2.1 one
    assert load_single_file(path, config_dir=tmp_path / "configs", prediction_type="epsilon")["schedule"].prediction_type == "epsilon"


def test_sd2_prediction_type_defaults_from_sample_size():
    assert _schedule({}, {"sample_size": 96}, "sd2", None).prediction_type == "v_prediction"
    assert _schedule({}, {"sample_size": 64}, "sd2", None).prediction_type == "epsilon"
    assert _schedule({}, {"sample_size": 96}, "sd1", None).prediction_type == "epsilon"
    assert _schedule({"prediction_type": "epsilon"}, {"sample_size": 96}, "sd2", None).prediction_type == "epsilon"


def _config_dir(root, components):
    """A diffusers-format folder of configs only (no weights), as from_pretrained folders lay them out."""
    unet, vae, text_encoder = components
    folder = root / "configs"
    unet.save_config(folder / "unet")
    vae.save_config(folder / "vae")
    text_encoder.config.save_pretrained(folder / "text_encoder")
    return folder


def test_file_without_metadata_loads_with_config_dir(sd1, sd1_file, tmp_path):
    bare = tmp_path / "bare.safetensors"
    save_file(load_file(sd1_file), bare)
    with pytest.raises(CheckpointError, match="do not match the model config"):
        load_single_file(bare)  # falls back to the full-size SD 1.5 configs
    loaded = load_single_file(bare, config_dir=_config_dir(tmp_path, sd1))
    assert_loaded(loaded, sd1)
    assert loaded["schedule"].prediction_type == "epsilon"  # shipped SD 1.5 scheduler config


def test_text_encoder_accepts_both_key_spellings(sd1, tmp_path):
    text_encoder = sd1[2]
    plain = {k.removeprefix("text_model."): v for k, v in text_encoder.state_dict().items()}
    prefixed = {"text_model." + k: v for k, v in plain.items()}
    for state in (plain, prefixed | {"text_model.embeddings.position_ids": torch.arange(77)[None]}):
        fresh = CLIPTextModel(text_encoder.config)
        load_text_encoder_state(fresh, state)
        assert_same_weights(text_encoder.state_dict(), fresh.state_dict())
    with pytest.raises(CheckpointError, match="1 unexpected"):
        load_text_encoder_state(CLIPTextModel(text_encoder.config), plain | {"text_projection.weight": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="1 missing"):
        load_text_encoder_state(CLIPTextModel(text_encoder.config), {k: v for k, v in plain.items() if k != "final_layer_norm.bias"})

    # diffusers folders (read by transformers itself, as the folder loader does): written by transformers 5
    # (no prefix) or by older versions (prefixed)
    text_encoder.save_pretrained(tmp_path / "new" / "text_encoder")
    (tmp_path / "old").mkdir()
    text_encoder.config.save_pretrained(tmp_path / "old")
    save_file({k: v.contiguous() for k, v in prefixed.items()}, tmp_path / "old" / "model.safetensors")
    for folder in (tmp_path / "new" / "text_encoder", tmp_path / "old"):
        loaded = CLIPTextModel.from_pretrained(folder)
        assert_same_weights(text_encoder.state_dict(), loaded.state_dict())
        torch.testing.assert_close(loaded(ids())[0], text_encoder(ids())[0], rtol=0, atol=0)


def test_weights_only_ckpt_loads(sd1, sd1_file, tmp_path):
    state = load_file(sd1_file)
    plain, lightning = tmp_path / "plain.ckpt", tmp_path / "lightning.ckpt"
    torch.save(state, plain)
    torch.save({"state_dict": state, "global_step": 7}, lightning)
    assert_same_weights(state, read_state_dict(lightning))
    loaded = load_single_file(plain, config_dir=_config_dir(tmp_path, sd1), precision="fp16")
    assert loaded["unet"].dtype == loaded["text_encoder"].dtype == torch.float16
    # the precision policy keeps an fp16 model's VAE in float32, as the folder loader does (diffusers' force_upcast)
    assert loaded["vae"].dtype == torch.float32
    assert torch.equal(loaded["vae"].decoder.conv_out.weight, sd1[1].decoder.conv_out.weight)


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_ckpt_with_code_is_refused_without_running_it(tmp_path):
    path, marker = tmp_path / "evil.ckpt", tmp_path / "code-ran"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "payload": _RunsCode(str(marker))}, path)
    with pytest.raises(CheckpointError, match="contains code"):
        load_single_file(path)
    assert not marker.exists()


def test_bad_files_get_one_clear_error(sd1_file, tmp_path):
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(sd1_file.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match=re.escape(str(truncated))):
        load_single_file(truncated)
    with pytest.raises(CheckpointError, match="is not a file"):
        read_state_dict(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        read_state_dict(junk)
    other = tmp_path / "other.safetensors"
    save_file({"encoder.weight": torch.zeros(2)}, other)
    with pytest.raises(CheckpointError, match=r"does not look like a Stable Diffusion 1.x/2.x/XL checkpoint"):
        load_single_file(other)


@pytest.mark.parametrize("keys, what", [
    (["conditioner.embedders.0.model.ln_final.weight", "model.diffusion_model.input_blocks.0.0.weight"],
     "an SDXL refiner checkpoint: latentdiff runs SD 1.x/2.x and SDXL base models"),
    (["model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight"], "an SD3 checkpoint"),
    (["double_blocks.0.img_attn.qkv.weight"], "a Flux checkpoint"),
    (["model.diffusion_model.double_blocks.0.img_attn.qkv.weight"], "a Flux checkpoint"),
    (["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"], "a LoRA file: apply it to a model with --lora"),
    (["unet.down_blocks.0.attentions.0.proj_in.lora_A.weight"], "a LoRA file"),
    (["emb_params"], "a textual-inversion embedding"),
    (["encoder.down.0.block.0.conv1.weight", "decoder.up.0.block.0.conv1.weight"], "a VAE-only file (no UNet)"),
    (["text_model.encoder.layers.0.mlp.fc1.weight"], "a text-encoder-only file (no UNet)"),
])
def test_files_latentdiff_cannot_use_are_named(tmp_path, keys, what):
    """One sentence that says what the file is, from its keys, before any model is built."""
    path = tmp_path / "file.safetensors"
    save_file({k: torch.zeros(1) for k in keys}, path)
    with pytest.raises(CheckpointError) as info:
        load_single_file(path)
    assert str(info.value).startswith(f"{path} is {what}")
