"""Small helpers shared by several test files."""
import contextlib
import resource
import signal


def random_lora_file(model_dir, path, *, seed: int = 0, text_encoder: bool = False):
    """A LoRA (rank 4 on the UNet's to_q/to_v, and with `text_encoder` on its four attention projections; B drawn from
    `seed`, so it changes the output) for the model in `model_dir`, saved the way the trainer saves one; returns
    `path`."""
    import torch
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from latentdiff.pipeline import load_pipeline

    donor = load_pipeline(model_dir, device="cpu", precision="fp32", optimize=False)
    donor.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["to_q", "to_v"]))
    models = [donor.unet]
    if text_encoder:
        donor.text_encoder.add_adapter(LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian",
                                                  target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]))
        models.append(donor.text_encoder)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for model in models:
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.5, generator=generator)
    layers = {"unet_lora_layers": get_peft_model_state_dict(donor.unet)}
    if text_encoder:
        layers["text_encoder_lora_layers"] = get_peft_model_state_dict(donor.text_encoder)
    StableDiffusionPipeline.save_lora_weights(path.parent, weight_name=path.name, safe_serialization=True, **layers)
    return path


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(settings):
    """The real server (`latentdiff serve`'s app on uvicorn) in a thread on a free localhost port; returns
    .url, .app and .stop(). The model loads before it listens, as the command does."""
    import dataclasses
    import threading
    import time
    from types import SimpleNamespace

    import uvicorn

    from latentdiff.server import create_app

    settings = dataclasses.replace(settings, port=free_port())
    app = create_app(settings)
    server = uvicorn.Server(uvicorn.Config(app, host=settings.host, port=settings.port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        assert thread.is_alive(), "the server did not start"
        time.sleep(0.02)

    def stop():
        server.should_exit = True
        thread.join()

    return SimpleNamespace(url=f"http://{settings.host}:{settings.port}", app=app, stop=stop)


@contextlib.contextmanager
def file_size_limit(limit: int):
    """Inside the block, a write past `limit` bytes fails with EFBIG (SIGXFSZ ignored), as on a full disk; in this
    process, so the code under test runs without a subprocess's imports."""
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)
