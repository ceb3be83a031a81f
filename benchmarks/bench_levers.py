"""One CFG UNet step of the SD 1.5 benchmark model, lever by lever, and where the time goes inside it.

    python benchmarks/bench_levers.py [--sizes 256 512] [--compile]

Every configuration runs in its own fresh process (same weights, same inputs), adding one lever at a time, so each
row's gain over the row above is that lever's. The latentdiff default configuration is also profiled per operator
class (convolution, linear, attention, norms, elementwise) to show where the rest of the time goes.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_inference import ROOT, ensure_model  # noqa: E402

# name -> (dtype, levers); each adds one lever to the row above it
CONFIGS = {
    "bf16 (diffusers' torch_dtype=bfloat16)": ("bfloat16", []),
    "+ channels_last": ("bfloat16", ["channels_last"]),
    "+ lean SDPA attention processor": ("bfloat16", ["channels_last", "lean_attention"]),
    "+ prepacked oneDNN weights = latentdiff default": ("bfloat16", ["channels_last", "lean_attention", "prepacked"]),
    "fp32 (diffusers' default)": ("float32", []),
    "fp32 + latentdiff levers": ("float32", ["channels_last", "lean_attention", "prepacked"]),
}
COMPILED = {"bf16 + channels_last + lean attention + torch.compile(freezing)": ("bfloat16", ["channels_last", "lean_attention", "compile"])}
DEFAULT = "+ prepacked oneDNN weights = latentdiff default"
CATEGORIES = {  # profiler op name fragment -> class
    "convolution": "convolution", "linear": "linear", "addmm": "linear", "aten::mm": "linear", "attention": "attention",
    "group_norm": "norm", "layer_norm": "norm", "gelu": "elementwise", "silu": "elementwise", "aten::mul": "elementwise",
    "aten::add": "elementwise", "aten::div": "elementwise", "copy_": "copy / cat", "aten::cat": "copy / cat",
}


def measure(dtype_name: str, levers: list[str], size: int, steps: int, profile: bool) -> dict:
    """Runs inside a fresh process: median seconds of one batch-2 (CFG) UNet call at `size` px."""
    import torch
    from diffusers import UNet2DConditionModel

    from latentdiff import optimize

    dtype = getattr(torch, dtype_name)
    unet = UNet2DConditionModel.from_pretrained(ensure_model() / "unet", torch_dtype=dtype).eval()
    if "channels_last" in levers:
        optimize.use_channels_last(unet)
    if "lean_attention" in levers:
        optimize.use_lean_attention(unet)
    if "prepacked" in levers:
        optimize.use_prepacked_weights(unet)
    if "compile" in levers:
        optimize.compile_unet(unet)
    g = torch.Generator().manual_seed(0)
    side = size // 8
    x = torch.randn(2, 4, side, side, generator=g).to(dtype)
    if "channels_last" in levers:  # a channels_last input alone turns every conv channels_last: baselines stay plain
        x = x.contiguous(memory_format=torch.channels_last)
    context, t = torch.randn(2, 77, 768, generator=g).to(dtype), torch.tensor(500)
    with torch.inference_mode():
        start = time.perf_counter()
        unet(x, t, context)  # first call: packs weights / compiles
        first = time.perf_counter() - start
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            unet(x, t, context)
            times.append(time.perf_counter() - start)
        result = {"step_s": statistics.median(times), "min_step_s": min(times), "first_call_s": first}
        if profile:
            result["profile"] = _profile(lambda: unet(x, t, context))
    return result


def _profile(call) -> dict:
    """Self CPU seconds of one call, summed per operator class."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        call()
    shares: dict[str, float] = {}
    for event in prof.key_averages():
        cls = next((c for fragment, c in CATEGORIES.items() if fragment in event.key), "other")
        shares[cls] = shares.get(cls, 0.0) + event.self_cpu_time_total / 1e6
    return dict(sorted(shares.items(), key=lambda kv: -kv[1]))


def run_fresh(name: str, config: tuple[str, list[str]], size: int, steps: int) -> dict:
    """`measure` in a new interpreter, so no configuration inherits another's caches or memory."""
    dtype, levers = config
    code = (f"import json, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import bench_levers as b; "
            f"print('RESULT' + json.dumps(b.measure({dtype!r}, {levers!r}, {size}, {steps}, {name == DEFAULT})))")
    with tempfile.TemporaryDirectory() as cache:  # an empty inductor cache: a compile's first call is a cold compile
        out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=ROOT,
                             env={**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}).stdout
    return json.loads(next(line for line in out.splitlines() if line.startswith("RESULT"))[6:])


def markdown(res: dict) -> str:
    lines = ["# One CFG UNet step, lever by lever (SD 1.5 architecture, batch 2)", "",
             f"{res['machine']}; torch {res['torch']}. Median of {res['steps']} calls after a first call (which packs "
             "weights or compiles from an empty cache: its time is the last column). Each row adds one lever to the "
             "row above it; each ran in a fresh process.", ""]
    for size, rows in res["sizes"].items():
        base = rows[next(iter(CONFIGS))]["step_s"]
        lines += [f"## {size}×{size}", "", "| configuration | s / step | vs bf16 | first call s |", "| --- | ---: | ---: | ---: |"]
        lines += [f"| {name} | {r['step_s']:.3f} | {base / r['step_s']:.2f}× | {r['first_call_s']:.1f} |" for name, r in rows.items()]
        prof = rows[DEFAULT]["profile"]
        total = sum(prof.values())
        lines += ["", f"Where the default's step goes (profiler self time, {total:.2f} s with profiling overhead):", "",
                  "| operator class | s | share |", "| --- | ---: | ---: |"]
        lines += [f"| {cls} | {sec:.3f} | {100 * sec / total:.0f} % |" for cls, sec in prof.items()]
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    ap.add_argument("--steps", type=int, default=5, help="timed calls per configuration")
    ap.add_argument("--compile", action="store_true", help="also torch.compile with freezing (about a minute of compile per size)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args(argv)

    import torch

    ensure_model()
    configs = CONFIGS | (COMPILED if args.compile else {})
    res = {"machine": f"{os.cpu_count()} CPU threads", "torch": torch.__version__, "steps": args.steps, "sizes": {}}
    for size in sorted(args.sizes):
        res["sizes"][str(size)] = {}
        for name, config in configs.items():
            res["sizes"][str(size)][name] = run_fresh(name, config, size, args.steps)
            print(f"{size}px {name}: {res['sizes'][str(size)][name]['step_s']:.3f} s/step", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "levers.json").write_text(json.dumps(res, indent=2))
    (args.out / "levers.md").write_text(markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
