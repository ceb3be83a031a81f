"""latentdiff vs diffusers on a CUDA GPU, side by side on the same weights: inference and training throughput.

    python benchmarks/bench_inference.py --device cuda        # or: python benchmarks/bench_cuda.py
    python benchmarks/bench_cuda.py --model latentdiff/default_model --device cpu --no-compile --steps 4 --train-steps 0
                                                                  # a quick check of the script itself, no GPU needed
    python benchmarks/bench_cuda.py --family sdxl --size 1024 --batches 1 --no-compile --train-steps 0
                                                                  # SDXL-size random fp16 weights at 1024²

Inference: SD 1.5 architecture with random weights (built once, as bench_inference.py does), 512², DPM-Solver++(2M),
20 steps, guidance 7.5, the same initial latents for every contender, batch 1 and 4. Contenders, one at a time in
this process (peak GPU memory reset before each load): latentdiff at its defaults (fp16, CUDA graphs), diffusers fp16
eager (SDPA), diffusers fp16 + torch.compile of the UNet (default mode). Reported: s/image, it/s (denoising steps
per second of one batch), the first call apart (compile or capture), peak GPU memory, PSNR against diffusers fp16
eager; and a cold start (fresh interpreter: import + load + one image) per library.
Training: img/s of `latentdiff train` (bf16 autocast, no latent cache) against a plain diffusers-style step
(vae.encode → add noise → UNet → MSE → AdamW, bf16 autocast) on the same model, batch and resolution.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
from bench_inference import FAMILIES, GUIDANCE, PROMPT, SEED, ensure_model, psnr  # noqa: E402

CONTENDERS = ("latentdiff", "diffusers_fp16", "diffusers_compile")
LABELS = {"latentdiff": "latentdiff (defaults: fp16, CUDA graphs)", "diffusers_fp16": "diffusers fp16 eager (SDPA)",
          "diffusers_compile": "diffusers fp16 + torch.compile"}


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_memory(device) -> float:
    import torch

    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")


def load(name: str, folder: Path, device):
    """(pipe, generate(latents, size, steps) → uint8 (B, H, W, 3))."""
    import torch

    dtype = torch.float16 if device.type == "cuda" else torch.float32
    if name == "latentdiff":
        from latentdiff.pipeline import load_pipeline

        pipe = load_pipeline(folder, device=device, precision="auto" if device.type == "cuda" else "fp32")

        def generate(latents, size, steps):
            return pipe([PROMPT] * len(latents), height=size, width=size, num_inference_steps=steps,
                        guidance_scale=GUIDANCE, latents=latents, sampler="dpmpp_2m", output_type="numpy",
                        progress=False).images
        return pipe, generate

    from diffusers import DiffusionPipeline, DPMSolverMultistepScheduler

    pipe = DiffusionPipeline.from_pretrained(folder, torch_dtype=dtype).to(device)  # SD or SDXL from model_index.json
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    if name == "diffusers_compile":
        pipe.unet = torch.compile(pipe.unet)

    def generate(latents, size, steps):
        # no negative prompt: "" for SD 1.5, zeros for SDXL (force_zeros_for_empty_prompt), as latentdiff's default
        images = pipe([PROMPT] * len(latents), height=size, width=size,
                      num_inference_steps=steps, guidance_scale=GUIDANCE, latents=latents.to(device, dtype),
                      output_type="np").images
        return (images * 255).round().astype("uint8")
    return pipe, generate


def latents_for(batch: int, side: int):
    """x_T per image from its own seed, identical for every contender (σ_max = 1 for DPM-Solver on this schedule)."""
    import torch

    from latentdiff.schedulers.base import randn

    gens = [torch.Generator("cpu").manual_seed(SEED + i) for i in range(batch)]
    return randn((batch, 4, side, side), gens, dtype=torch.float32)


def inference(folder: Path, device, size: int, steps: int, batches: list[int], repeats: int, compile_: bool) -> dict:
    import torch

    rows, reference = {}, {}
    for name in CONTENDERS if compile_ else CONTENDERS[:2]:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        pipe, generate = load(name, folder, device)
        load_s = time.perf_counter() - t0
        side = size // 2 ** (len(pipe.vae.config.block_out_channels) - 1)
        rows[name] = {"load_s": load_s}
        for batch in batches:
            latents = latents_for(batch, side)
            times = []
            with torch.inference_mode():
                for _ in range(repeats + 1):  # the first call pays capture / compile / autotune: reported apart
                    _sync(device)
                    start = time.perf_counter()
                    images = generate(latents, size, steps)
                    _sync(device)
                    times.append(time.perf_counter() - start)
            warm = statistics.median(times[1:])
            if name == "diffusers_fp16":
                reference[batch] = images
            rows[name][f"batch{batch}"] = {"first_s": times[0], "s_per_batch": warm, "s_per_image": warm / batch,
                                           "it_s": steps / warm, "images": images}
        rows[name]["peak_memory_gb"] = _peak_memory(device)
        del pipe, generate
    for name, row in rows.items():
        for batch in batches:
            r = row[f"batch{batch}"]
            r["psnr_vs_diffusers_fp16"] = min(psnr(a, b) for a, b in zip(r.pop("images"), reference[batch]))
    return rows


def cold_start(folder: Path, device, size: int, steps: int) -> dict:
    """import + load + one image in a fresh interpreter, per library."""
    out = {}
    for name in ("latentdiff", "diffusers_fp16"):
        code = (f"import sys, time, torch; sys.path.insert(0, {str(Path(__file__).parent)!r}); t0 = time.perf_counter(); "
                f"import bench_cuda as b; pipe, gen = b.load({name!r}, b.Path({str(folder)!r}), torch.device({str(device)!r})); "
                f"gen(b.latents_for(1, {size} // 2 ** (len(pipe.vae.config.block_out_channels) - 1)), {size}, {steps}); "
                f"print('SECONDS', time.perf_counter() - t0)")
        start = time.perf_counter()
        res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
        if res.returncode:
            raise RuntimeError(f"cold start of {name} failed:\n{res.stderr[-3000:]}")
        out[name] = {"wall_s": time.perf_counter() - start,
                     "inside_s": float(next(line for line in res.stdout.splitlines() if line.startswith("SECONDS")).split()[1])}
    return out


def training(folder: Path, device, size: int, batch: int, steps: int) -> dict:
    """img/s of latentdiff's trainer and of a plain diffusers-style step, same model, batch and resolution."""
    from latentdiff.commands.train import main as train_main
    from latentdiff.data import make_shapes

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_shapes(tmp / "data", max(4 * batch, 32), size=size)
        code = train_main(["--model", str(folder), "--data", str(tmp / "data"), "--output-dir", str(tmp / "run"),
                           "--resolution", str(size), "--batch-size", str(batch), "--max-steps", str(steps),
                           "--mixed-precision", "bf16", "--no-cache-latents", "--log-every", "1",
                           "--checkpoint-every", "0", "--num-workers", "2", "--snr-gamma", "0"])
        assert code == 0, "latentdiff train failed"
        per_step = [json.loads(line)["images_per_s"] for line in (tmp / "run" / "log.jsonl").read_text().splitlines()]
        ours = statistics.median(per_step[3:] or per_step)
        theirs = _plain_training(folder, tmp / "data", device, size, batch, steps)
    return {"batch": batch, "resolution": size, "steps": steps, "latentdiff_img_s": ours, "plain_img_s": theirs,
            "ratio": ours / theirs}


def _plain_training(folder: Path, data: Path, device, size: int, batch: int, steps: int) -> float:
    """The step of diffusers' examples/text_to_image/train_text_to_image.py, reduced to its arithmetic."""
    import torch
    import torch.nn.functional as F
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from latentdiff.data import load_pixels, scan_captioned_images

    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet").to(device).train()
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae").to(device).requires_grad_(False)
    text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder").to(device).requires_grad_(False)
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    noise_scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-5)
    items = scan_captioned_images(data)
    times = []
    for step in range(steps):
        chosen = [items[(step * batch + i) % len(items)] for i in range(batch)]
        pixels = torch.stack([load_pixels(p, size) for p, _ in chosen]).to(device)
        ids = tokenizer([t for _, t in chosen], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        _sync(device)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            with torch.no_grad():
                latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
                context = text_encoder(ids.to(device))[0]
            noise = torch.randn_like(latents)
            t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (batch,), device=device)
            pred = unet(noise_scheduler.add_noise(latents, noise, t), t, context).sample
            loss = F.mse_loss(pred.float(), noise.float())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(device)
        times.append(time.perf_counter() - start)
    return batch / statistics.median(times[3:] or times)


def markdown(res: dict) -> str:
    a = res["args"]
    lines = [f"# latentdiff vs diffusers {res['versions']['diffusers']} on {res['device_name']} (same weights)", "",
             f"{a['model']}; {a['size']}², DPM-Solver++(2M), {a['steps']} steps, guidance {GUIDANCE}, same initial "
             f"latents; median of {a['repeats']} warm calls, the first call reported apart; torch {res['versions']['torch']}.", "",
             "| contender | batch | s / image | it/s | first call s | peak GPU GB | PSNR vs diffusers fp16 | latentdiff speed-up |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    rows = res["inference"]
    for batch in a["batches"]:
        ours = rows["latentdiff"][f"batch{batch}"]["s_per_image"]
        for name, row in rows.items():
            r = row[f"batch{batch}"]
            speedup = "—" if name == "latentdiff" else f"{r['s_per_image'] / ours:.2f}×"
            psnr_text = "∞" if math.isinf(r["psnr_vs_diffusers_fp16"]) else f"{r['psnr_vs_diffusers_fp16']:.1f} dB"
            lines.append(f"| {LABELS[name]} | {batch} | {r['s_per_image']:.3f} | {r['it_s']:.1f} | {r['first_s']:.2f} | "
                         f"{row['peak_memory_gb']:.2f} | {psnr_text} | {speedup} |")
    if "cold_start" in res:
        cs = res["cold_start"]
        lines += ["", "Cold start (fresh interpreter: import + load + one image): "
                  + ", ".join(f"{LABELS[n]} {v['wall_s']:.1f} s" for n, v in cs.items()) + "."]
    if "training" in res:
        t = res["training"]
        lines += ["", f"Training (bf16 autocast, batch {t['batch']}, {t['resolution']}², no latent cache): latentdiff "
                  f"{t['latentdiff_img_s']:.1f} img/s, plain diffusers-style step {t['plain_img_s']:.1f} img/s ({t['ratio']:.2f}×)."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--model", type=Path, default=None, help="a diffusers folder (default: random weights of --family)")
    ap.add_argument("--family", choices=("sd15", "sdxl"), default="sd15", help="the architecture of the random weights")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-compile", action="store_true", help="leave out the torch.compile contender")
    ap.add_argument("--train-steps", type=int, default=20, help="0: skip the training comparison")
    ap.add_argument("--no-cold-start", action="store_true", help="leave out the fresh-interpreter timings")
    ap.add_argument("--train-batch", type=int, default=8)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args(argv)

    import diffusers
    import torch

    device = torch.device(args.device)
    folder = args.model or ensure_model(args.family, args.device)
    res = {"args": {"model": str(args.model or f"{FAMILIES[args.family][3]}, random {FAMILIES[args.family][2]} weights"), "size": args.size,
                    "steps": args.steps, "batches": args.batches, "repeats": args.repeats},
           "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__},
           "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"}
    res["inference"] = inference(folder, device, args.size, args.steps, args.batches, args.repeats, not args.no_compile)
    if not args.no_cold_start:
        res["cold_start"] = cold_start(folder, device, args.size, args.steps)
    if args.train_steps:
        res["training"] = training(folder, device, args.size, args.train_batch, args.train_steps)
    stem = ("cuda" if device.type == "cuda" else f"cuda_script_check_{device.type}") + ("_sdxl" if args.family == "sdxl" else "")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps(res, indent=2))
    (args.out / f"{stem}.md").write_text(markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
