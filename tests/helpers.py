"""Small helpers shared by several test files."""
from latentdiff.data.shapes import parse_caption  # noqa: F401  (re-exported for the tests)


def random_lora_file(model_dir, path):
    """A UNet LoRA (rank 4 on to_q/to_v, B drawn at random so it changes the output) for the model in `model_dir`,
    saved the way the trainer saves one; returns `path`."""
    import torch
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from latentdiff.pipeline import load_pipeline

    donor = load_pipeline(model_dir, device="cpu", precision="fp32", optimize=False)
    donor.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["to_q", "to_v"]))
    with torch.no_grad():
        for name, p in donor.unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    StableDiffusionPipeline.save_lora_weights(path.parent, weight_name=path.name, safe_serialization=True,
                                              unet_lora_layers=get_peft_model_state_dict(donor.unet))
    return path
