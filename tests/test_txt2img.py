"""scripts/txt2img.py end to end: files, metadata, resume after a kill, sharding under accelerate, bad input."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from latentdiff.commands.generate import main
from latentdiff.pngmeta import read_params

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "txt2img.py"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def pixels(path):
    return np.asarray(Image.open(path))


def run_script(*args, timeout=180):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, env=ENV, timeout=timeout)


def test_batch_writes_samples_grid_and_parameters(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle on a blue background\n\n  a green star on a white background  \n")
    rc = main(["--from-file", prompts, "--model", tiny_model_dir, "--outdir", out, "--n-samples", "2", "--n-iter", "2",
               "--steps", "3", "--scale", "4", "--sampler", "euler", "--seed", "100", "--negative-prompt", "blurry, dark",
               "--precision", "fp32", "--no-progress"])
    assert rc == 0
    files = sorted((out / "samples").glob("*.png"))
    assert [f.name for f in files] == [f"{k:05d}.png" for k in range(8)]
    assert len(list(out.glob("grid-*.png"))) == 1
    params = read_params(files[5])
    assert (params.prompt, params.negative_prompt, params.seed) == ("a green star on a white background", "blurry, dark", 105)
    assert (params.steps, params.sampler, params.cfg_scale, params.width, params.height) == (3, "euler", 4.0, 16, 16)
    assert params.model == "tiny-sd" and len(params.model_hash) == 10 and params.extra["Precision"] == "fp32"
    summary = capsys.readouterr().err
    assert "8 images in" in summary and "s/image" in summary and "model loaded in" in summary
    assert not list(out.rglob("*.tmp"))


def test_from_png_reproduces_bit_for_bit(tiny_model_dir, tmp_path):
    assert main(["--prompt", "a blue square", "--model", tiny_model_dir, "--outdir", tmp_path / "a", "--steps", "3",
                 "--sampler", "ddim", "--eta", "0.5", "--seed", "9", "--skip-grid", "--no-progress"]) == 0
    original = tmp_path / "a" / "samples" / "00000.png"
    assert main(["--from-png", original, "--model", tiny_model_dir, "--outdir", tmp_path / "b", "--no-progress"]) == 0
    assert np.array_equal(pixels(original), pixels(tmp_path / "b" / "samples" / "00000.png"))
    assert read_params(tmp_path / "b" / "samples" / "00000.png") == read_params(original)


@pytest.mark.slow
def test_rerun_after_kill_makes_exactly_the_missing_images(tiny_model_dir, tmp_path):
    args = ["--prompt", "a cat", "--model", tiny_model_dir, "--n-iter", "6", "--steps", "20", "--skip-grid", "--precision", "fp32"]
    proc = subprocess.Popen([sys.executable, str(SCRIPT), *map(str, args), "--outdir", tmp_path / "killed"], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    samples = tmp_path / "killed" / "samples"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(samples.glob("*.png"))) < 2:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = {f.name: f.stat().st_mtime_ns for f in samples.glob("*.png")}
    assert 2 <= len(done) < 6, "the kill should land mid-job"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the killed process (OMP_NUM_THREADS=1): the same kernels, so the same bits
    try:
        assert main([*args, "--outdir", tmp_path / "killed"]) == 0  # the rerun
        assert main([*args, "--outdir", tmp_path / "whole"]) == 0
    finally:
        torch.set_num_threads(threads)
    for name, mtime in done.items():
        assert (samples / name).stat().st_mtime_ns == mtime, "finished images are never rewritten"
    whole = sorted((tmp_path / "whole" / "samples").glob("*.png"))
    assert len(whole) == 6 and len(list(samples.glob("*.png"))) == 6
    for f in whole:
        assert np.array_equal(pixels(f), pixels(samples / f.name))


@pytest.mark.slow
def test_accelerate_two_processes_split_the_job(tiny_model_dir, tmp_path):
    common = ["--prompt", "a cat", "--model", tiny_model_dir, "--n-iter", "5", "--steps", "2", "--skip-grid", "--precision", "fp32", "--no-progress"]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", str(SCRIPT)]
    res = subprocess.run([*launch, *common, "--outdir", tmp_path / "two"], capture_output=True, text=True, env=ENV, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "[process 0 of 2]" in res.stderr and "[process 1 of 2]" in res.stderr
    assert "3 images in" in res.stderr and "2 images in" in res.stderr  # round-robin: 0,2,4 and 1,3
    assert main([*common, "--outdir", tmp_path / "one"]) == 0
    two = sorted((tmp_path / "two" / "samples").glob("*.png"))
    assert [f.name for f in two] == [f"{k:05d}.png" for k in range(5)]
    for f in two:
        assert np.abs(pixels(f).astype(int) - pixels(tmp_path / "one" / "samples" / f.name)).max() <= 1


@pytest.mark.parametrize("args, message", [
    (["--prompt", "x", "--H", "100"], "--H must be a positive multiple of 8, got 100"),
    (["--prompt", "x", "--W", "20"], "--W must be a positive multiple of 8, got 20"),
    (["--prompt", "x", "--steps", "0"], "--steps must be at least 1"),
    (["--prompt", "x", "--sampler", "plms"], "unknown sampler 'plms'"),
    (["--prompt", "x", "--precision", "fp8"], "unknown precision"),
    (["--prompt", "x", "--model", "{tmp}/missing"], "does not exist"),
    (["--prompt", "x", "--model", "{tmp}/model.txt"], "unknown extension"),
    (["--from-file", "{tmp}/empty.txt"], "has no prompts"),
    (["--from-file", "{tmp}/missing.txt"], "cannot read prompt file"),
    ([], "no prompt given"),
    (["--prompt", "x", "--outdir", "{tmp}/model.txt/sub"], "model.txt is a file, not a folder"),
    (["--prompt", "x", "--model", "{tmp}/corrupt.safetensors"], "cannot load model"),
])
def test_bad_input_exits_2_and_writes_nothing(tmp_path, capsys, args, message):
    (tmp_path / "empty.txt").write_text("\n  \n")
    (tmp_path / "model.txt").write_text("not a model")
    (tmp_path / "corrupt.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    before = sorted(tmp_path.rglob("*"))
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    rc = main([*args, "--outdir", str(tmp_path / "out")] if "--outdir" not in args else args)
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert message in err and len(err.splitlines()) == 1
    assert sorted(tmp_path.rglob("*")) == before


def test_ckpt_with_code_is_refused(tmp_path, capsys):
    import torch

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"state_dict": {"model.diffusion_model.x": Payload()}}, tmp_path / "evil.ckpt")
    rc = main(["--prompt", "x", "--model", str(tmp_path / "evil.ckpt"), "--outdir", str(tmp_path / "out")])
    assert rc == 2 and not marker.exists() and not (tmp_path / "out").exists()
    assert "code" in capsys.readouterr().err
