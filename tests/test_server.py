"""`latentdiff serve`'s A1111-compatible API on the real server (uvicorn on a free localhost port), driven by the
A1111 client library webuiapi, against the shipped model: images equal the pipeline's and the batch script's bit for
bit, concurrent requests are each answered with their own images, interrupt, auth, paths, bad input."""
import base64
import io
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests

pytest.importorskip("fastapi")
webuiapi = pytest.importorskip("webuiapi")

from helpers import start_server  # noqa: E402
from latentdiff.commands.serve import Settings  # noqa: E402
from latentdiff.config import DEFAULTS  # noqa: E402
from latentdiff.pipeline import load_pipeline  # noqa: E402

STEPS, SIZE = 4, 64  # the shipped model's native size; few steps keep every request well under a second


@pytest.fixture(scope="module")
def api(server):
    host, port = server.url.removeprefix("http://").split(":")
    return webuiapi.WebUIApi(host=host, port=int(port), sampler="DPM++ 2M", steps=STEPS)


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline()


def pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def b64png(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_txt2img_equals_the_pipeline_and_the_batch_script(api, pipe, server, tmp_path):
    r = api.txt2img(prompt="a red circle on a blue background", seed=123, width=SIZE, height=SIZE, batch_size=2,
                    cfg_scale=DEFAULTS.guidance_scale, sampler_name="Euler a", scheduler="Karras", save_images=True)
    assert r.info["all_seeds"] == [123, 124] and r.info["sampler_name"] == "Euler a" and r.info["notes"] == []
    ref = pipe(["a red circle on a blue background"] * 2, seed=[123, 124], num_inference_steps=STEPS,
               sampler="euler_ancestral", scheduler="karras", output_type="numpy", progress=False).images
    for image, expected, text in zip(r.images, ref, r.info["infotexts"]):
        assert np.array_equal(pixels(image), expected)
        assert image.info["parameters"] == text
    saved = sorted((Path(server.app.state.server.settings.outdir) / "txt2img-images").glob("*.png"))
    assert [p.name for p in saved] == ["00000-123.png", "00001-124.png"]

    from latentdiff.commands.generate import main  # the batch script writes the same pixels and parameters
    assert main(["--prompt", "a red circle on a blue background", "--seed", "123", "--steps", str(STEPS),
                 "--sampler", "euler_ancestral", "--scheduler", "karras", "--H", "64", "--W", "64",
                 "--outdir", str(tmp_path), "--skip-grid", "--no-progress"]) == 0
    from PIL import Image
    with Image.open(tmp_path / "samples" / "00000.png") as batch:
        assert np.array_equal(pixels(batch), pixels(r.images[0]))
        assert batch.info["parameters"] == r.info["infotexts"][0]


def test_ngms_fields_reach_the_pipeline(pipe, server):
    """A1111's s_min_uncond and its "NGMS all steps" setting (override_settings s_min_uncond_all)."""
    url = f"{server.url}/sdapi/v1/txt2img"
    body = {"prompt": "a green star on a black background", "seed": 5, "steps": STEPS, "sampler_name": "DPM++ 2M",
            "s_min_uncond": 3.0, "override_settings": {"s_min_uncond_all": False}}
    r = requests.post(url, json=body)
    info = json.loads(r.json()["info"])
    ref = pipe(body["prompt"], seed=5, num_inference_steps=STEPS, guidance_min_sigma=3.0,
               guidance_min_sigma_all_steps=False, output_type="numpy", progress=False).images[0]
    from PIL import Image
    assert np.array_equal(pixels(Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0])))), ref)
    assert info["notes"] == [] and "NGMS: 3" in info["infotexts"][0] and "NGMS all steps" not in info["infotexts"][0]
    bad = requests.post(url, json={**body, "override_settings": {"s_min_uncond_all": "yes"}})
    assert bad.status_code == 422 and "s_min_uncond_all must be true or false" in bad.text


def test_concurrent_requests_are_each_answered_with_their_own_images(api, pipe):
    jobs = [(f"a {c} {s} on a white background", 1000 + 17 * k)
            for k, (c, s) in enumerate(zip(["red", "green", "blue", "yellow", "purple", "black"],
                                           ["circle", "square", "star", "triangle", "circle", "square"]))]
    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(lambda j: api.txt2img(prompt=j[0], seed=j[1], steps=2, width=SIZE, height=SIZE), jobs))
    for (prompt, seed), r in zip(jobs, results):
        assert r.info["prompt"] == prompt and r.info["all_seeds"] == [seed]
        ref = pipe(prompt, seed=seed, num_inference_steps=2, guidance_scale=7.0, output_type="numpy",
                   progress=False).images[0]
        assert np.array_equal(pixels(r.images[0]), ref), prompt


def test_img2img_and_inpainting_equal_the_pipeline(api, pipe):
    from PIL import Image

    init = pipe("a red circle on a blue background", seed=5, num_inference_steps=STEPS, progress=False).images[0]
    mask = Image.new("L", init.size)
    mask.paste(255, (16, 16, 48, 48))
    r = api.img2img(images=[init], mask_image=mask, mask_blur=1, denoising_strength=0.75, seed=9,
                    prompt="a green square on a blue background", width=SIZE, height=SIZE, cfg_scale=DEFAULTS.guidance_scale)
    ref = pipe("a green square on a blue background", image=init, mask_image=mask, mask_blur=1, strength=0.75, seed=9,
               num_inference_steps=STEPS, output_type="numpy", progress=False).images[0]
    assert np.array_equal(pixels(r.images[0]), ref)
    assert "Denoising strength: 0.75" in r.info["infotexts"][0] and "Mask blur: 1" in r.info["infotexts"][0]
    small = requests.post(f"{api.baseurl}/img2img", json={"init_images": [b64png(init.resize((48, 40)))], "steps": 2})
    assert json.loads(small.json()["info"])["width"] == 48  # no size given: the init image's, as the pipeline
    with pytest.raises(RuntimeError, match="422"):  # a mask of another size is refused, not stretched
        api.img2img(images=[init], mask_image=mask.resize((32, 32)), width=SIZE, height=SIZE)


def test_progress_and_interrupt(server, api):
    box = {}
    slow = threading.Thread(target=lambda: box.update(r=api.txt2img(prompt="a blue star", seed=1, steps=400,
                                                                     n_iter=3, width=SIZE, height=SIZE)))
    slow.start()
    for _ in range(500):
        p = api.get_progress()
        if p["state"]["sampling_step"] > 1:
            break
        time.sleep(0.02)
    assert p["state"]["job"] == "txt2img" and 0 < p["progress"] < 1 and p["state"]["sampling_steps"] == 400
    assert p["current_image"] is not None and base64.b64decode(p["current_image"]).startswith(b"\x89PNG")
    api.interrupt()
    slow.join(30)
    assert not slow.is_alive(), "interrupt did not stop the request"
    r = box["r"]
    assert r.info["interrupted"] and len(r.images) < 3 and any("interrupted" in n for n in r.info["notes"])
    assert api.get_progress()["state"]["job"] == ""
    assert len(api.txt2img(prompt="a blue star", seed=1, width=SIZE, height=SIZE).images) == 1  # it serves on


def test_lists_options_and_png_info(api, server):
    assert {"DPM++ 2M", "Euler a", "DDIM"} <= {s["name"] for s in api.get_samplers()}
    assert {"automatic", "karras"} <= {s["name"] for s in api.get_schedulers()}
    assert [m["title"] for m in api.get_sd_models()] == ["default", "broken.safetensors", "shapes-copy"]
    assert {"name": "style", "alias": "style", "path": "style.safetensors", "metadata": {}} in api.get_loras()
    assert api.get_embeddings()["loaded"]["filmgrain"]["vectors"] == 2
    assert api.get_options()["sd_model_checkpoint"] == "default"
    r = api.txt2img(prompt="a yellow star", seed=3, width=SIZE, height=SIZE)
    info = api.png_info(r.images[0])
    assert info.info == r.info["infotexts"][0] and info.json["parameters"]["Seed"] == 3


def test_embeddings_and_lora_tags_from_their_folders(api, pipe, serve_folders):
    from helpers import random_lora_file
    from latentdiff.pipeline import DEFAULT_MODEL

    pipe.load_embedding(serve_folders / "embeddings" / "filmgrain.safetensors")
    r = api.txt2img(prompt="filmgrain a red circle", seed=2, width=SIZE, height=SIZE, sampler_name="Euler")
    ref = pipe("filmgrain a red circle", seed=2, num_inference_steps=STEPS, guidance_scale=7.0, sampler="euler",
               output_type="numpy", progress=False).images[0]
    assert np.array_equal(pixels(r.images[0]), ref) and "TI hashes: \"filmgrain: " in r.info["infotexts"][0]

    random_lora_file(DEFAULT_MODEL, serve_folders / "loras" / "ink.safetensors")
    r = api.txt2img(prompt="<lora:ink:0.8> a red circle", seed=2, width=SIZE, height=SIZE)
    ref = pipe("<lora:ink:0.8> a red circle", seed=2, num_inference_steps=STEPS, guidance_scale=7.0,
               lora_dir=serve_folders / "loras", output_type="numpy", progress=False).images[0]
    plain = pipe("a red circle", seed=2, num_inference_steps=STEPS, guidance_scale=7.0, output_type="numpy",
                 progress=False).images[0]
    assert np.array_equal(pixels(r.images[0]), ref) and not np.array_equal(ref, plain)
    assert "Lora hashes: \"ink: " in r.info["infotexts"][0]


def test_model_switch_and_failures_keep_the_server_serving(api, pipe, server, serve_folders):
    api.set_options({"sd_model_checkpoint": "shapes-copy"})
    assert api.get_options()["sd_model_checkpoint"] == "shapes-copy"
    r = api.txt2img(prompt="a red square", seed=4, width=SIZE, height=SIZE)
    ref = pipe("a red square", seed=4, num_inference_steps=STEPS, guidance_scale=7.0, output_type="numpy",
               progress=False).images[0]
    assert np.array_equal(pixels(r.images[0]), ref) and "Model: shapes-copy" in r.info["infotexts"][0]
    bad = requests.post(f"{server.url}/sdapi/v1/options", json={"sd_model_checkpoint": "broken.safetensors"})
    assert bad.status_code == 422 and "--models-dir/broken.safetensors" in bad.json()["detail"]
    assert str(serve_folders) not in bad.text
    assert api.get_options()["sd_model_checkpoint"] == "shapes-copy"  # the old model stays
    api.set_options({"sd_model_checkpoint": "default"})

    worker_pipe = server.app.state.server.worker.pipe
    worker_pipe.decode = lambda latents: (_ for _ in ()).throw(RuntimeError("the device fell over"))
    try:  # a generation that fails mid-way is that request's 500, with the cause
        failed = requests.post(f"{server.url}/sdapi/v1/txt2img", json={"prompt": "x", "steps": 2, "width": 64, "height": 64})
    finally:
        del worker_pipe.decode
    assert failed.status_code == 500 and "the device fell over" in failed.json()["detail"]
    assert len(api.txt2img(prompt="a red square", seed=4, width=SIZE, height=SIZE).images) == 1


def test_paths_outside_the_folders_are_refused(server, serve_folders):
    post = lambda path, body: requests.post(f"{server.url}/sdapi/v1/{path}", json=body)  # noqa: E731
    for name in ("../secret.safetensors", str(serve_folders / "secret.safetensors"), "shapes-copy/../../secret.safetensors"):
        r = post("options", {"sd_model_checkpoint": name})
        assert r.status_code == 400 and "path" in r.json()["detail"], name
    assert post("options", {"sd_model_checkpoint": "nothing-here"}).status_code == 404
    for tag in ("<lora:../secret:1>", "<lora:/etc/passwd:1>", "<lora:*:1>", "<lora:missing:1>"):
        r = post("txt2img", {"prompt": f"{tag} a red circle", "steps": 1, "width": 64, "height": 64})
        assert r.status_code == 400, tag
    # errors name the server's folders by their flags, never by their paths on its disk
    assert "no LoRA named 'missing' in --lora-dir" in r.json()["detail"] and str(serve_folders) not in r.text


def test_bad_input_is_a_4xx_naming_the_field(server):
    url = f"{server.url}/sdapi/v1/txt2img"
    r = requests.post(url, data="{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["detail"][0]["type"] == "json_invalid"
    for body, field in (({"steps": "many"}, "steps"), ({"width": 100_000}, "width"), ({"seed": -5}, "seed"),
                        ({"sampler_name": "Bogus"}, "sampler_name"), ({"cfg_scale": "nan"}, "cfg_scale"),
                        ({"batch_size": 1000}, "batch_size"), ({"scheduler": "spiral"}, "scheduler"),
                        ({"s_min_uncond": -1}, "s_min_uncond")):
        r = requests.post(url, json={"prompt": "x", **body})
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", field], (body, r.text)
    big = requests.post(url, json={"prompt": "x" * (2**20 + 1)})  # over the body bound (1 MiB here)
    assert big.status_code == 413
    huge = requests.post(f"{server.url}/sdapi/v1/img2img", json={"init_images": [b64png(_blank((2100, 8)))]})
    assert huge.status_code == 422 and "init_images[0]" in huge.json()["detail"]
    bomb = requests.post(f"{server.url}/sdapi/v1/img2img", json={"init_images": [_png_header(100_000, 100_000)]})
    assert bomb.status_code == 422 and "2048" in bomb.json()["detail"]  # refused from the header, never decoded
    r = requests.post(url, json={"prompt": "x", "steps": 1, "width": 68, "height": 64, "mystery": 1,
                                 "restore_faces": True, "enable_hr": False})
    notes = json.loads(r.json()["info"])["notes"]
    assert r.status_code == 200 and len(r.json()["images"]) == 1
    assert any("mystery" in n for n in notes) and any("restore_faces" in n for n in notes)
    assert any("width 68 rounded down to 64" in n for n in notes) and not any("enable_hr" in n for n in notes)
    old_field = requests.post(url, json={"prompt": "x", "steps": 1, "sampler_index": "Euler a"})  # A1111 < 1.5 clients
    assert json.loads(old_field.json()["info"])["sampler_name"] == "Euler a"


def _png_header(width: int, height: int) -> str:
    """A base64 PNG that only claims its size (IHDR, no pixels): what a decompression bomb looks like up front."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    return base64.b64encode(b"\x89PNG\r\n\x1a\n" + ihdr + chunk(b"IEND", b"")).decode()


def _blank(size):
    from PIL import Image

    return Image.new("RGB", size)


def test_auth_protects_the_api_and_no_ui_serves_the_api_only(serve_folders):
    srv = start_server(Settings(outdir=serve_folders / "out-auth", ui=False, api_auth=("ann", "s3cret")))
    try:
        assert requests.get(srv.url + "/", auth=("ann", "s3cret")).status_code == 404  # --no-ui
        url = f"{srv.url}/sdapi/v1/sd-models"
        assert requests.get(url).status_code == 401
        assert requests.get(url, auth=("ann", "wrong")).status_code == 401
        assert requests.post(f"{srv.url}/sdapi/v1/txt2img", json={"prompt": "x"}).status_code == 401
        assert requests.get(url, auth=("ann", "s3cret")).status_code == 200
        host, port = srv.url.removeprefix("http://").split(":")
        client = webuiapi.WebUIApi(host=host, port=int(port), steps=1, username="ann", password="s3cret")
        assert len(client.txt2img(prompt="a red circle", seed=1, width=SIZE, height=SIZE).images) == 1
    finally:
        srv.stop()


@pytest.mark.parametrize("argv, says", [
    (["--port", "0"], "--port"), (["--api-auth", "nopass"], "USER:PASS"), (["--models-dir", "/nonexistent"], "--models-dir"),
    (["--listen", "--host", "10.0.0.1"], "--listen"), (["--model", "/nonexistent.safetensors"], "does not exist"),
])
def test_serve_refuses_bad_flags_before_loading(argv, says, capsys):
    from latentdiff.cli import main

    assert main(["serve", *argv]) == 2
    err = capsys.readouterr().err
    assert says in err and err.count("\n") == 1


def test_serve_names_a_model_it_cannot_load(serve_folders, capsys):
    from latentdiff.cli import main

    assert main(["serve", "--model", str(serve_folders / "models" / "broken.safetensors"), "--no-ui"]) == 2
    assert "cannot load model" in capsys.readouterr().err
