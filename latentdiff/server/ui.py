"""The web UI (Gradio, mounted at / on the API's app): txt2img, img2img with a mask brush, PNG info, a model picker.

It builds the same request objects as the API (schema.py) and queues the same jobs on the same worker (jobs.py),
so an image made here equals the API's for the same settings and carries the same PNG parameters.
"""
from __future__ import annotations

import time

import gradio as gr
from fastapi import HTTPException
from pydantic import ValidationError

from ..config import DEFAULTS
from ..pngmeta import GenerationParams
from ..schedulers import SAMPLERS, SCHEDULE_A1111
from .jobs import generation_job
from .schema import MAX_BATCH, MAX_ITER, MAX_SIDE, MAX_STEPS, Img2Img, Txt2Img

SCHEDULES = ["Automatic", *SCHEDULE_A1111.values()]
FIELDS = ("prompt", "negative_prompt", "sampler_name", "scheduler", "steps", "cfg_scale", "width", "height", "seed",
          "n_iter", "batch_size")  # the settings controls, in this order


def _message(e: Exception) -> str:
    if isinstance(e, HTTPException):
        return str(e.detail)
    if isinstance(e, ValidationError):
        return "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
    return f"{e.__class__.__name__}: {e}"


def settings_controls(tab: str, native: int) -> list:
    """Prompt, negative prompt, sampler, schedule, steps, CFG, size, seed (with random and reuse), batches."""
    prompt = gr.Textbox(label="Prompt", lines=2, elem_id=f"{tab}_prompt")
    negative = gr.Textbox(label="Negative prompt", lines=1, elem_id=f"{tab}_negative")
    with gr.Row():
        sampler = gr.Dropdown([s.a1111 for s in SAMPLERS.values()], value=SAMPLERS[DEFAULTS.sampler].a1111,
                              label="Sampler")
        schedule = gr.Dropdown(SCHEDULES, value="Automatic", label="Schedule type")
    with gr.Row():
        steps = gr.Slider(1, MAX_STEPS, value=DEFAULTS.steps, step=1, label="Steps", elem_id=f"{tab}_steps")
        cfg = gr.Slider(0, 30, value=DEFAULTS.guidance_scale, step=0.5, label="CFG scale")
    with gr.Row():
        width = gr.Slider(8, MAX_SIDE, value=native, step=8, label="Width")
        height = gr.Slider(8, MAX_SIDE, value=native, step=8, label="Height")
    with gr.Row():
        seed = gr.Number(-1, precision=0, label="Seed (-1: random)", elem_id=f"{tab}_seed", scale=4)
        random_seed = gr.Button("Random", scale=1, min_width=60)
        reuse_seed = gr.Button("Reuse last", scale=1, min_width=60)
    with gr.Row():
        n_iter = gr.Slider(1, MAX_ITER, value=1, step=1, label="Batch count")
        batch_size = gr.Slider(1, MAX_BATCH, value=1, step=1, label="Batch size")
    random_seed.click(lambda: -1, outputs=seed)
    return [prompt, negative, sampler, schedule, steps, cfg, width, height, seed, n_iter, batch_size], reuse_seed


def output_panel(tab: str):
    generate = gr.Button("Generate", variant="primary", elem_id=f"{tab}_generate")
    status = gr.Markdown("", elem_id=f"{tab}_status")
    gallery = gr.Gallery(label="Images (captions: their parameters)", columns=4, height=360, object_fit="contain",
                         preview=False, elem_id=f"{tab}_gallery")
    parameters = gr.Textbox(label="Parameters of the selected image", lines=4, interactive=False,
                            elem_id=f"{tab}_parameters")
    return generate, status, gallery, parameters


def build_ui(server) -> gr.Blocks:
    worker, catalog, outdir = server.worker, server.catalog, server.settings.outdir
    native = worker.pipe.check_size(None, None)[1]

    def run(kind: str, cls, values: list, extra: dict, **images):
        """Queue the job; yield its place or step until done, then the gallery (files with their parameters)."""
        try:
            req = cls(**dict(zip(FIELDS, values)), **extra, save_images=True)
            job = worker.submit(kind, generation_job(req, catalog, outdir, kind=kind, **images))
        except (HTTPException, ValidationError) as e:
            raise gr.Error(_message(e)) from None
        while not job.future.done():
            p, place = worker.progress, worker.place(job)
            yield (f"Waiting: {place} ahead" if place else
                   f"Batch {p.job_no + 1}/{p.job_count}, step {p.step}/{p.steps}"), gr.skip(), gr.skip(), gr.skip(), gr.skip()
            time.sleep(0.2)
        try:
            result = job.future.result()
        except Exception as e:
            raise gr.Error(_message(e)) from None
        done = f"{len(result.images)} images, seeds {result.info['all_seeds']}" + "".join(f"; {n}" for n in result.notes)
        yield (done, [(str(f), text) for f, text in zip(result.files, result.infotexts)],
               result.infotexts[0] if result.infotexts else "", result.infotexts, result.info["seed"])

    with gr.Blocks(title="latentdiff") as ui:
        last_seed, infotexts = gr.State(-1), gr.State([])
        model = gr.Dropdown([e.title for e in catalog.models()], value=worker.model_title, label="Model",
                            elem_id="model")
        with gr.Tabs() as tabs:
            with gr.Tab("txt2img", id="txt2img"):
                with gr.Row():
                    with gr.Column(scale=2):
                        t2i, t2i_reuse = settings_controls("txt2img", native)
                    with gr.Column(scale=3):
                        t2i_go, t2i_status, t2i_gallery, t2i_params = output_panel("txt2img")
            with gr.Tab("img2img", id="img2img"):
                with gr.Row():
                    with gr.Column(scale=2):
                        editor = gr.ImageEditor(type="pil", label="Init image (paint the region to repaint: inpainting)",
                                                brush=gr.Brush(colors=["#ffffff"], color_mode="fixed"),
                                                format="png", elem_id="img2img_image")  # png: lossless init pixels
                        strength = gr.Slider(0.01, 1, value=DEFAULTS.strength, step=0.01, label="Denoising strength")
                        mask_blur = gr.Slider(0, 64, value=DEFAULTS.mask_blur, step=1, label="Mask blur")
                        i2i, i2i_reuse = settings_controls("img2img", native)
                    with gr.Column(scale=3):
                        i2i_go, i2i_status, i2i_gallery, i2i_params = output_panel("img2img")
            with gr.Tab("PNG info", id="pnginfo"):
                png = gr.Image(type="pil", sources=["upload"], label="A PNG made by latentdiff or A1111",
                               image_mode=None, elem_id="pnginfo_image")
                png_text = gr.Textbox(label="Parameters", lines=6, interactive=False, elem_id="pnginfo_parameters")
                send = gr.Button("Send to txt2img", elem_id="pnginfo_send")

        def txt2img(*values):
            yield from run("txt2img", Txt2Img, list(values), {})

        def img2img(editor_value, denoise, blur, *values):
            image, mask = editor_inputs(editor_value)
            yield from run("img2img", Img2Img, list(values), {"denoising_strength": denoise, "mask_blur": blur},
                           images=[image], mask=mask)

        # concurrency_limit=None: the worker queues the jobs (and tells each its place), not Gradio
        t2i_go.click(txt2img, inputs=t2i, outputs=[t2i_status, t2i_gallery, t2i_params, infotexts, last_seed],
                     concurrency_limit=None)
        i2i_go.click(img2img, inputs=[editor, strength, mask_blur, *i2i],
                     outputs=[i2i_status, i2i_gallery, i2i_params, infotexts, last_seed], concurrency_limit=None)

        def selected(texts: list[str], evt: gr.SelectData) -> str:
            return texts[evt.index] if evt.index < len(texts) else ""

        for gallery, params in ((t2i_gallery, t2i_params), (i2i_gallery, i2i_params)):
            gallery.select(selected, inputs=infotexts, outputs=params)
        t2i_reuse.click(lambda s: s, inputs=last_seed, outputs=t2i[8])
        i2i_reuse.click(lambda s: s, inputs=last_seed, outputs=i2i[8])

        async def pick(title: str):
            try:
                await server.switch_model(title)
            except HTTPException as e:
                raise gr.Error(_message(e)) from None
            gr.Info(f"model {title} loaded")

        model.focus(lambda: gr.Dropdown(choices=[e.title for e in catalog.models()]), outputs=model)
        model.input(pick, inputs=model)
        png.change(lambda im: (im.info.get("parameters", "(this PNG has no parameters)") if im else ""),
                   inputs=png, outputs=png_text)
        send.click(replay, inputs=png_text, outputs=[*t2i[:10], tabs])
    return ui


def editor_inputs(value: dict | None):
    """The image editor's picture (RGB) and its paint layer as the mask: white where painted, None if nothing is
    (then it is image-to-image)."""
    if not value or value.get("background") is None:
        raise gr.Error("upload an init image first")
    layers = value.get("layers") or []
    mask = layers[0].getchannel("A").point(lambda a: 255 if a else 0) if layers else None
    return value["background"].convert("RGB"), mask if mask is not None and mask.getbbox() else None


def replay(text: str):
    """PNG info → txt2img: the settings a `parameters` text holds, into the txt2img controls."""
    try:
        p = GenerationParams.from_text(text or "")
    except ValueError as e:
        raise gr.Error(str(e)) from None
    schedule = p.extra.get("Schedule type", "Automatic")
    return (p.prompt, p.negative_prompt, SAMPLERS[p.sampler].a1111 if p.sampler in SAMPLERS else p.sampler,
            schedule if schedule in SCHEDULES else "Automatic", p.steps, p.cfg_scale, p.width, p.height, p.seed, 1,
            gr.Tabs(selected="txt2img"))
