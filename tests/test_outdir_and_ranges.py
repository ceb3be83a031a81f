"""The batch script's output folder belongs to its jobs, bad values are refused before any work, and OS errors are
sentences; the API names the argument it refuses."""
import json
import math
import re
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import file_size_limit

from latentdiff.commands.generate import main
from latentdiff.commands.outdir import MANIFEST, read_manifest
from latentdiff.pipeline import load_pipeline
from latentdiff.pngmeta import read_params

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def generate(model, outdir, *args):
    return main(["--model", model, "--outdir", outdir, "--steps", "2", "--precision", "fp32", "--no-progress", *args])


def samples(outdir):
    return sorted((outdir / "samples").glob("*.png"))


def test_a_different_job_continues_the_numbering_and_a_rerun_fills_only_its_own_gaps(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert generate(tiny_model_dir, out, "--prompt", "a red circle", "--n-iter", "2") == 0
    first = {f.name: f.read_bytes() for f in samples(out)}
    assert generate(tiny_model_dir, out, "--prompt", "a blue star", "--n-iter", "2") == 0
    files = samples(out)
    assert [f.name for f in files] == [f"{k:05d}.png" for k in range(4)]
    assert [read_params(f).prompt for f in files] == ["a red circle"] * 2 + ["a blue star"] * 2
    assert all(f.read_bytes() == first[f.name] for f in files[:2]), "another job's images are never replaced"
    assert [e["first"] for e in read_manifest(out)] == [0, 2]

    capsys.readouterr()
    assert generate(tiny_model_dir, out, "--prompt", "a red circle", "--n-iter", "2") == 0  # the same job again
    assert "0 images" in capsys.readouterr().err and len(samples(out)) == 4
    files[2].unlink()
    assert generate(tiny_model_dir, out, "--prompt", "a blue star", "--n-iter", "2") == 0
    assert len(samples(out)) == 4 and read_params(files[2]).prompt == "a blue star"
    assert len(read_manifest(out)) == 2
    assert len(list(out.glob("grid-*.png"))) == 3  # one per run that made images, none replaced


def test_a_torn_manifest_line_and_stale_temporaries_do_not_block_the_next_job(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    assert generate(tiny_model_dir, out, "--prompt", "a cat", "--skip-grid") == 0
    with open(out / MANIFEST, "a") as f:
        f.write('{"job": "torn", "fir')  # what a kill mid-append leaves
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = out / "samples" / f".00007.png.{dead.stdout.strip()}.tmp"
    stale.write_bytes(b"half a png")
    assert generate(tiny_model_dir, out, "--prompt", "a dog", "--skip-grid") == 0
    assert [read_params(f).prompt for f in samples(out)] == ["a cat", "a dog"]
    assert [e["first"] for e in read_manifest(out)] == [0, 1]
    assert not stale.exists()


@pytest.mark.slow
def test_concurrent_jobs_in_one_outdir_lose_no_image(tiny_model_dir, tmp_path):
    out = tmp_path / "shared"
    script = ROOT / "scripts" / "txt2img.py"
    procs = [subprocess.Popen([sys.executable, str(script), "--prompt", prompt, "--n-iter", "6", "--model", str(tiny_model_dir),
                               "--outdir", str(out), "--steps", "2", "--precision", "fp32", "--no-progress"],
                              env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for prompt in ("a red circle", "a blue star", "a green square")]
    for p in procs:
        assert p.wait(timeout=300) == 0, p.stderr.read()[-2000:]
    files = samples(out)
    assert len(files) == 18
    by_prompt = {}
    for f in files:
        by_prompt.setdefault(read_params(f).prompt, []).append(read_params(f).seed)
    assert {p: sorted(s) for p, s in by_prompt.items()} == {p: list(range(42, 48)) for p in ("a red circle", "a blue star", "a green square")}
    ranges = sorted((e["first"], e["count"]) for e in read_manifest(out))
    assert ranges == [(0, 6), (6, 6), (12, 6)]


@pytest.mark.parametrize("args, message", [
    (["--steps", "999"], "--steps must be an integer between 1 and 998"),  # DPM++ 2M on SD's leading schedule
    (["--steps", "1000", "--sampler", "euler"], "--steps must be an integer between 1 and 999"),
    (["--seed", str(2**64)], "--seed must be from 0 to 2**64 - 1"),
    (["--seed", "-1"], "--seed must be from 0 to 2**64 - 1"),
    (["--n-samples", "10000000", "--H", "512", "--W", "512"], "lower --n-samples"),
    (["--eta", "2", "--sampler", "ddim"], "--eta must be between 0 and 1"),
    (["--scale", "nan"], "--scale must be a finite number"),
    (["--W", "20"], "--W must be a positive multiple of 8"),
])
def test_values_beyond_their_real_bounds_are_refused_before_anything_is_written(tiny_model_dir, tmp_path, capsys, args, message):
    rc = generate(tiny_model_dir, tmp_path / "out", "--prompt", "x", *args)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_a_full_disk_is_one_sentence_with_the_path_and_leaves_no_temporaries(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    with file_size_limit(300):
        rc = generate(tiny_model_dir, out, "--prompt", "a cat")
    lines = capsys.readouterr().err.strip().splitlines()
    assert rc == 1, lines[-5:]
    assert re.fullmatch(rf"txt2img.py: error: cannot write {out}/(jobs.jsonl|samples/00000.png): File too large", lines[-1])
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]


@pytest.fixture(scope="module")
def pipe(tiny_model_dir):
    return load_pipeline(tiny_model_dir, device="cpu", precision="fp32")


@pytest.mark.parametrize("kwargs, message", [
    (dict(prompt=None), "prompt must be a string or a list of strings, got None"),
    (dict(prompt=["a cat", 3]), "prompt must be a string or a list of strings"),
    (dict(negative_prompt=7), "negative_prompt must be a string or a list of strings"),
    (dict(height=0), "height and width must be positive multiples of 8"),
    (dict(height="64"), "height and width must be positive multiples of 8"),
    (dict(width=16.0), "height and width must be positive multiples of 8"),
    (dict(width=20), "height and width must be positive multiples of 8"),
    (dict(guidance_scale=math.nan), "guidance_scale must be a finite number"),
    (dict(sampler="ddim", eta=2), "eta must be between 0"),
    (dict(sampler="euler", eta=0.5), "sampler 'euler' takes no eta"),
    (dict(seed=2**64), "seed must be an integer from 0 to 2**64 - 1"),
    (dict(seed=[-1]), "seed must be an integer from 0 to 2**64 - 1"),
    (dict(num_inference_steps=1000), "num_inference_steps must be an integer between 1 and 998"),
    (dict(num_inference_steps=2.5), "num_inference_steps must be an integer of at least 1"),
    (dict(num_images_per_prompt=0), "num_images_per_prompt must be an integer of at least 1"),
])
def test_api_names_the_argument_it_refuses(pipe, kwargs, message):
    kwargs = {"prompt": "a cat", **kwargs}
    with pytest.raises(ValueError) as info:
        pipe(kwargs.pop("prompt"), progress=False, num_inference_steps=kwargs.pop("num_inference_steps", 2), **kwargs)
    assert message in str(info.value)


def test_manifest_records_the_job(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    assert generate(tiny_model_dir, out, "--prompt", "a cat", "--n-samples", "2", "--scale", "3", "--skip-grid") == 0
    (entry,) = [json.loads(line) for line in (out / MANIFEST).read_text().splitlines()]
    assert entry["count"] == 2 and entry["first"] == 0
    assert entry["spec"]["prompts"] == ["a cat"] and entry["spec"]["scale"] == 3.0 and entry["spec"]["width"] == 16
