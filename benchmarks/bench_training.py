"""Training throughput and peak memory, with and without latent caching, side by side.

    python benchmarks/bench_training.py [--batch-size 16] [--steps 12] [--repeats 2] [--threads 1] [--out benchmarks/results]

Fixed config: the shipped shapes model (configs/shapes_model: UNet + CLIP text encoder trained jointly, the 64 px
→ 16×16×4 VAE; random weights cost the same FLOPs), 64 px shapes images, AdamW, EMA, Min-SNR. Every run is a fresh
worker process (its ru_maxrss is its own); the parent alternates the variants within each repeat so background load
hits both alike. images/s: median of the per-step figures of log.jsonl after two warm-up steps.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {"cached": ["--cache-latents"], "uncached": ["--no-cache-latents"]}
WARMUP = 2


def worker(variant: str, data: Path, out: Path, batch_size: int, steps: int) -> dict:
    """One training run in this process; returns its throughput and peak RSS."""
    from latentdiff.commands.train import main

    start = time.perf_counter()
    code = main(["--model-config", str(ROOT / "configs/shapes_model"), "--data", str(data), "--output-dir", str(out),
                 "--resolution", "64", "--batch-size", str(batch_size), "--max-steps", str(steps), "--log-every", "1",
                 "--train-text-encoder", "--ema-decay", "0.999", "--checkpoint-every", "0", "--num-workers", "0",
                 *VARIANTS[variant]])
    wall = time.perf_counter() - start
    assert code == 0, f"training exited with {code}"
    per_step = [json.loads(line)["images_per_s"] for line in (out / "log.jsonl").read_text().splitlines()][WARMUP:]
    return {"variant": variant, "images_per_s": statistics.median(per_step), "wall_s": round(wall, 2),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def run_worker(variant: str, data: Path, tmp: Path, args) -> dict:
    out = tmp / f"{variant}-{time.monotonic_ns()}"
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, __file__, "--worker", variant, "--data", str(data), "--run-dir", str(out),
           "--batch-size", str(args.batch_size), "--steps", str(args.steps)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode:
        raise RuntimeError(f"{variant} worker failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="OMP threads per run (1 is fastest on a shared 2-core box)")
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        import torch

        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
        print(json.dumps(worker(args.worker, args.data, args.run_dir, args.batch_size, args.steps)))
        return

    from latentdiff.data import make_shapes

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_shapes(tmp / "data", args.images)
        runs = []
        for r in range(args.repeats):
            order = list(VARIANTS) if r % 2 == 0 else list(VARIANTS)[::-1]
            for variant in order:
                runs.append(run_worker(variant, tmp / "data", tmp, args))
                print(runs[-1], flush=True)
    summary = {v: {"images_per_s": statistics.median(r["images_per_s"] for r in runs if r["variant"] == v),
                   "s_per_step": args.batch_size / statistics.median(r["images_per_s"] for r in runs if r["variant"] == v),
                   "peak_rss_mb": max(r["peak_rss_mb"] for r in runs if r["variant"] == v),
                   "wall_s": statistics.median(r["wall_s"] for r in runs if r["variant"] == v)} for v in VARIANTS}
    speedup = summary["cached"]["images_per_s"] / summary["uncached"]["images_per_s"]
    result = {"config": {"model": "configs/shapes_model", "resolution": 64, "batch_size": args.batch_size,
                         "steps": args.steps, "warmup_steps_excluded": WARMUP, "threads": args.threads,
                         "train_text_encoder": True, "ema": True, "images": args.images},
              "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                          "load_avg_at_end": os.getloadavg()},
              "summary": summary, "cached_speedup": round(speedup, 3), "runs": runs}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "training.json").write_text(json.dumps(result, indent=2) + "\n")
    rows = "\n".join(f"| {v} | {s['images_per_s']:.2f} | {s['s_per_step']:.2f} | {s['peak_rss_mb']:.0f} | {s['wall_s']:.1f} |"
                     for v, s in summary.items())
    (args.out / "training.md").write_text(
        f"# Training throughput (`bench_training.py`)\n\n"
        f"Shapes model (configs/shapes_model), 64 px, batch {args.batch_size}, {args.steps} steps "
        f"({WARMUP} warm-up excluded), UNet + text encoder trained, EMA on, {args.threads} thread(s), "
        f"{os.cpu_count()} CPUs, load average at the end {os.getloadavg()[0]:.1f}.\n\n"
        f"| latents | images/s | s/step | peak RSS (MB) | wall incl. startup (s) |\n|---|---|---|---|---|\n{rows}\n\n"
        f"Latent caching: {speedup:.2f}× the images/s of encoding every batch (the cached run's wall time includes "
        f"encoding the dataset once).\n")
    print((args.out / "training.md").read_text())


if __name__ == "__main__":
    main()
