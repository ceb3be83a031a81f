"""latentdiff vs diffusers on the same random SD 1.5 (or SDXL) weights, side by side.

    python benchmarks/bench_inference.py [--sizes 256 512] [--steps 20] [--repeats N] [--out benchmarks/results]
    python benchmarks/bench_inference.py --family sdxl --sizes 512 --steps 4 --repeats-512 2 --large 0
    python benchmarks/bench_inference.py --device cuda      # the GPU comparison: bench_cuda.py

Every contender lives in its own worker process, so its peak RSS (ru_maxrss: load + generation) is its own;
the parent alternates the contenders within each repeat, so background load hits all of them alike.
All contenders start from the same initial latents, use DPM-Solver++(2M), the same steps and guidance.
SDXL's contenders (fp32 SDXL is 14 GB a process) run one after the other instead, each alone in memory.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from multiprocessing import get_context
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
# family → (shipped config folder, cache folder, dtype the weights are stored in, description)
FAMILIES = {"sd15": ("sd1", "sd15-random", "float32", "SD 1.5 architecture (UNet 860M, CLIP ViT-L/14)"),
            "sdxl": ("sdxl", "sdxl-random-fp16", "float16", "SDXL base 1.0 architecture (UNet 2.6B, CLIP ViT-L + OpenCLIP ViT-bigG)")}
PROMPT = "a watercolor painting of a lighthouse on a cliff at sunset"
SEED, GUIDANCE = 0, 7.5
TIMED = ("latentdiff", "diffusers_fp32", "diffusers_bf16", "diffusers_tuned")
LABELS = {
    "latentdiff": "latentdiff (default CPU settings)", "latentdiff_fp32": "latentdiff precision=fp32 (PSNR reference)",
    "diffusers_fp32": "diffusers float32 (default)", "diffusers_bf16": "diffusers torch_dtype=bfloat16",
    "diffusers_tuned": "diffusers bf16 + channels_last + fused QKV",
}


# ---------------------------------------------------------------- the model, built once
def ensure_model(family: str = "sd15", device: str = "cpu") -> Path:
    """The family's published architecture with random weights under a fixed seed, saved once under
    benchmarks/cache (random weights cost the same FLOPs as trained ones); built on `device`."""
    import torch

    import latentdiff
    from latentdiff.pipeline import LatentDiffusionPipeline

    configs, name, dtype, what = FAMILIES[family]
    folder = ROOT / "benchmarks" / "cache" / name
    if not (folder / "model_index.json").is_file():
        print(f"building random {what} weights into {folder} (once)", flush=True)
        with torch.device(device):  # SDXL's 3.5B parameters initialise in seconds on a GPU
            pipe = LatentDiffusionPipeline.from_config(Path(latentdiff.__file__).parent / "configs" / configs, seed=SEED)
        pipe.to("cpu", getattr(torch, dtype)).save_pretrained(folder)  # cast first: no second fp32 copy in memory
    return folder


# ---------------------------------------------------------------- one worker per contender
class _Timer:
    """Wall time spent inside one method of a model, summed over calls."""

    def __init__(self, obj, method: str):
        self.seconds, self.calls = 0.0, 0
        inner = getattr(obj, method)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start
                self.calls += 1

        setattr(obj, method, timed)  # instance attribute: nn.Module.__call__ finds `forward` here

    def take(self) -> tuple[float, int]:
        out, self.seconds, self.calls = (self.seconds, self.calls), 0.0, 0
        return out


def _load(name: str, folder: Path):
    """The contender's pipeline and a `generate(latents, size, steps) -> uint8 (H, W, 3)` for it."""
    import torch

    if name.startswith("latentdiff"):
        from latentdiff.pipeline import load_pipeline

        pipe = load_pipeline(folder, precision="fp32" if name.endswith("fp32") else "auto")

        def generate(latents, size, steps):
            return pipe(PROMPT, height=size, width=size, num_inference_steps=steps, guidance_scale=GUIDANCE,
                        latents=latents, sampler="dpmpp_2m", output_type="numpy", progress=False).images[0]
        return pipe, generate

    from diffusers import DiffusionPipeline, DPMSolverMultistepScheduler

    dtype = torch.float32 if name == "diffusers_fp32" else torch.bfloat16
    pipe = DiffusionPipeline.from_pretrained(folder, torch_dtype=dtype)  # StableDiffusion(XL)Pipeline from model_index.json
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    if name == "diffusers_tuned":
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
        pipe.fuse_qkv_projections()

    def generate(latents, size, steps):
        # no negative prompt: "" for SD 1.5, zeros for SDXL (force_zeros_for_empty_prompt), as latentdiff's default
        image = pipe(PROMPT, height=size, width=size, num_inference_steps=steps, guidance_scale=GUIDANCE,
                     latents=latents.to(dtype), output_type="np").images[0]  # float in [0, 1]
        return (image * 255).round().astype("uint8")
    return pipe, generate


def _worker(name: str, folder: str, conn) -> None:
    import resource

    import torch

    start = time.perf_counter()
    pipe, generate = _load(name, Path(folder))
    conn.send({"load_s": time.perf_counter() - start})
    timers = {"text_s": _Timer(pipe.text_encoder, "forward"), "unet": _Timer(pipe.unet, "forward"), "vae_s": _Timer(pipe.vae, "decode")}
    while (job := conn.recv()) is not None:
        size, steps = job
        latents = _initial_latents(size // 2 ** (len(pipe.vae.config.block_out_channels) - 1))
        start = time.perf_counter()
        with torch.inference_mode():
            image = generate(latents, size, steps)
        result = {"seconds": time.perf_counter() - start, "image": image}
        for key, timer in timers.items():
            seconds, calls = timer.take()
            if key == "unet":
                result["unet_s_per_step"] = seconds / max(calls, 1)
            else:
                result[key] = seconds
        result["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
        conn.send(result)


def _initial_latents(side: int):
    """x_T for one image, identical for every contender (σ_max = 1 for this VP schedule's DPM-Solver)."""
    import torch

    from latentdiff.schedulers.base import randn

    return randn((1, 4, side, side), torch.Generator("cpu").manual_seed(SEED), dtype=torch.float32)


class Worker:
    def __init__(self, name: str, folder: Path):
        self.name = name
        self.conn, child = get_context("spawn").Pipe()
        self.proc = get_context("spawn").Process(target=_worker, args=(name, str(folder), child), daemon=True)
        self.proc.start()
        self.load_s = self.conn.recv()["load_s"]

    def run(self, size: int, steps: int) -> dict:
        self.conn.send((size, steps))
        return self.conn.recv()

    def close(self) -> None:
        self.conn.send(None)
        self.proc.join()


# ---------------------------------------------------------------- measurements
def psnr(a, b) -> float:
    import numpy as np

    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255**2 / mse)


def side_by_side(folder: Path, sizes: list[int], steps: int, repeats: dict[int, int], contenders=TIMED,
                 alternate: bool = True) -> dict:
    """`alternate`: every contender's worker alive at once, taking turns in each repeat; else one after the other."""
    # The fp32 reference first, alone, then its memory goes away before the timed contenders load.
    ref = Worker("latentdiff_fp32", folder)
    references = {size: ref.run(size, steps) for size in sizes}
    ref.close()
    runs = {size: {name: [] for name in contenders} for size in sizes}
    load_s = {}

    def run(w: Worker, size: int, r: int) -> None:
        runs[size][w.name].append(w.run(size, steps))
        print(f"{size}px repeat {r + 1}/{repeats[size]} {w.name}: {runs[size][w.name][-1]['seconds']:.1f} s", flush=True)

    if alternate:
        workers = [Worker(name, folder) for name in contenders]
        for size in sizes:  # ascending, so ru_maxrss after a size is that size's peak
            for r in range(repeats[size]):
                for w in workers[r % len(workers):] + workers[: r % len(workers)]:  # rotate who goes first
                    run(w, size, r)
        for w in workers:
            load_s[w.name] = w.load_s
            w.close()
    else:
        for name in contenders:
            w = Worker(name, folder)
            for size in sizes:
                for r in range(repeats[size]):
                    run(w, size, r)
            load_s[name] = w.load_s
            w.close()
    results = {"load_s": load_s, "sizes": {}}
    for size in sizes:
        rows = {}
        for name, rs in runs[size].items():
            warm = rs[1:] or rs  # the first image at a size pays one-time costs (oneDNN primitives, weight packing)
            rows[name] = {key: statistics.median(r[key] for r in warm) for key in ("seconds", "unet_s_per_step", "vae_s", "text_s")}
            rows[name] |= {"first_seconds": rs[0]["seconds"], "all_seconds": [r["seconds"] for r in rs], "peak_rss_gb": rs[-1]["peak_rss_gb"],
                           "psnr_vs_latentdiff_fp32": psnr(rs[-1]["image"], references[size]["image"])}
        ld = rows["latentdiff"]["seconds"]
        rows["latentdiff"]["speedup_vs"] = {name: rows[name]["seconds"] / ld for name in contenders[1:]}
        rows["latentdiff_fp32"] = {k: v for k, v in references[size].items() if k != "image"}
        results["sizes"][str(size)] = rows
    return results


def large_image(folder: Path, size: int, steps: int, out: Path) -> dict:
    """Peak RSS of one latentdiff generation at `size` in a fresh process; the image is saved for a look at tile seams."""
    from PIL import Image

    w = Worker("latentdiff", folder)
    r = w.run(size, steps)
    w.close()
    path = out / f"latentdiff_{size}.png"
    Image.fromarray(r["image"]).save(path)
    return {"size": size, "steps": steps, "seconds": r["seconds"], "vae_s": r["vae_s"], "peak_rss_gb": r["peak_rss_gb"], "image": path.name}


def cold_start(folder: Path, steps: int) -> dict:
    """import + load + one image at the model's own size in a fresh interpreter, wall time seen from outside."""
    code = ("import time; t0 = time.perf_counter(); import latentdiff.pipeline as p; t1 = time.perf_counter(); "
            f"pipe = p.load_pipeline({str(folder)!r}); t2 = time.perf_counter(); "
            f"image = pipe('a red circle', num_inference_steps={steps}, seed=0, progress=False).images[0]; "
            "print('PARTS', image.width, t1 - t0, t2 - t1, time.perf_counter() - t2)")
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, capture_output=True, text=True).stdout
    seconds = time.perf_counter() - start
    size, *parts = next(line for line in out.splitlines() if line.startswith("PARTS")).split()[1:]
    return {"model": str(folder.relative_to(ROOT) if folder.is_relative_to(ROOT) else folder), "size": int(size), "steps": steps,
            "seconds": seconds} | dict(zip(("import_s", "load_s", "generate_s"), map(float, parts)))


# ---------------------------------------------------------------- report
def markdown(res: dict) -> str:
    a = res["args"]
    lines = [f"# Inference: latentdiff vs diffusers {res['versions']['diffusers']} (same weights)", "",
             f"{FAMILIES[a['family']][3]}, random {FAMILIES[a['family']][2]} weights; DPM-Solver++(2M), {a['steps']} steps, guidance {GUIDANCE}, batch 1, "
             f"same initial latents; {res['machine']}. Median of {'alternating ' if a['alternate'] else ''}repeats after each contender's first image, which is reported apart ({', '.join(f'{n} at {s}px' for s, n in a['repeats'].items())}); "
             "peak RSS = the contender's own worker process (load + generation).", ""]
    for size, rows in res["sizes"].items():
        lines += [f"## {size}×{size}", "", "| contender | s / image | first image s | UNet s / step | VAE decode s | text enc. s | peak RSS GB | PSNR vs latentdiff fp32 | latentdiff speed-up |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for name in a["contenders"]:
            r = rows[name]
            speedup = "—" if name == "latentdiff" else f"{rows['latentdiff']['speedup_vs'][name]:.2f}×"
            lines.append(f"| {LABELS[name]} | {r['seconds']:.2f} | {r['first_seconds']:.2f} | {r['unet_s_per_step']:.3f} | {r['vae_s']:.2f} | {r['text_s']:.2f} | "
                         f"{r['peak_rss_gb']:.2f} | {r['psnr_vs_latentdiff_fp32']:.1f} dB | {speedup} |")
        ref = rows["latentdiff_fp32"]
        lines += [f"| {LABELS['latentdiff_fp32']} | {ref['seconds']:.2f} | — | {ref['unet_s_per_step']:.3f} | {ref['vae_s']:.2f} | "
                  f"{ref['text_s']:.2f} | {ref['peak_rss_gb']:.2f} | — | (run once) |", ""]
    if "large" in res:
        big = res["large"]
        lines += [f"**{big['size']}×{big['size']}** ({big['steps']} steps, VAE decode tiled above 1024 px in bf16): peak RSS {big['peak_rss_gb']:.2f} GB, "
                  f"{big['seconds']:.1f} s, decode {big['vae_s']:.1f} s; image: `{big['image']}`.", ""]
    if "cold_start" in res:
        cs = res["cold_start"]
        lines += [f"**Cold start** (fresh interpreter: import + load `{cs['model']}` + one image at its own size, {cs['size']}×{cs['size']}, "
                  f"{cs['steps']} steps): {cs['seconds']:.1f} s wall; inside it: import latentdiff {cs['import_s']:.1f} s, "
                  f"load {cs['load_s']:.1f} s (mostly importing diffusers and transformers), generate {cs['generate_s']:.2f} s.", ""]
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", choices=sorted(FAMILIES), default="sd15", help="the architecture of the random weights")
    ap.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=4, help="alternating repeats below 512 px; the first is reported apart")
    ap.add_argument("--repeats-512", type=int, default=2, help="repeats from 512 px up")
    ap.add_argument("--large", type=int, default=1024, help="size of the peak-RSS check (0: skip)")
    ap.add_argument("--large-steps", type=int, default=2, help="steps for it (RSS does not grow with steps)")
    ap.add_argument("--cold-start-model", type=Path, default=None, help="default: latentdiff/default_model, else the benchmark model")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--device", default="cpu", help="cuda: latentdiff vs diffusers fp16 / compiled on the GPU (bench_cuda.py)")
    args = ap.parse_args(argv)
    if args.device != "cpu":
        from bench_cuda import main as cuda_main

        return cuda_main(["--device", args.device, "--steps", str(args.steps), "--out", str(args.out)])

    import diffusers
    import torch

    folder = ensure_model(args.family)
    args.out.mkdir(parents=True, exist_ok=True)
    sizes = sorted(args.sizes)
    repeats = {s: (args.repeats_512 if s >= 512 else args.repeats) for s in sizes}
    sd15 = args.family == "sd15"
    contenders = TIMED if sd15 else TIMED[:2]  # SDXL: diffusers' default alone; each contender costs minutes
    res = {"args": {"family": args.family, "sizes": sizes, "steps": args.steps, "contenders": contenders,
                    "alternate": sd15, "repeats": {str(s): n for s, n in repeats.items()}},
           "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__},
           "machine": f"{os.cpu_count()} CPU threads, torch threads {torch.get_num_threads()}"}
    res |= side_by_side(folder, sizes, args.steps, repeats, contenders, alternate=sd15)
    if args.large:
        res["large"] = large_image(folder, args.large, args.large_steps, args.out)
    if sd15:  # the cold start is the shipped model's, whatever the family
        from latentdiff.pipeline import DEFAULT_MODEL

        cold_model = args.cold_start_model or (DEFAULT_MODEL if DEFAULT_MODEL.is_dir() else folder)
        res["cold_start"] = cold_start(cold_model, args.steps)
    stem = "inference" if sd15 else f"inference_{args.family}"
    (args.out / f"{stem}.json").write_text(json.dumps(res, indent=2))
    (args.out / f"{stem}.md").write_text(markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
