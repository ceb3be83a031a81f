"""The HTTP app: AUTOMATIC1111's /sdapi/v1 endpoints (the ones clients use), the web UI mounted at /, and the
safety middleware in front of both. Every generation and model switch goes through the one worker (worker.py)."""
from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
import logging
import time
from pathlib import Path

from fastapi import APIRouter, FastAPI, HTTPException
from starlette.concurrency import run_in_threadpool

from ..errors import ModelError
from ..pipeline import to_output
from ..pngmeta import GenerationParams, png_bytes
from ..schedulers import SAMPLERS, SCHEDULE_A1111
from .catalog import Catalog
from .jobs import Result, generation_job
from .schema import MAX_SIDE, Img2Img, Options, PngInfoRequest, Txt2Img
from .security import BasicAuth, BodyLimit
from .worker import Worker

logger = logging.getLogger(__name__)
MAX_QUEUE = 256  # waiting requests; beyond it a 503 says "busy" rather than holding connections without end


def decode_image(data: str, field: str):
    """A base64 image (a data: URL too) → PIL, its size checked from the header before the pixels are decoded."""
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(io.BytesIO(base64.b64decode(data.split(",", 1)[-1] if data.startswith("data:") else data)))
    except (binascii.Error, ValueError, UnidentifiedImageError) as e:
        raise HTTPException(422, f"{field}: not a base64-encoded image ({e.__class__.__name__})") from None
    except Image.DecompressionBombError:  # a header claiming billions of pixels
        raise HTTPException(422, f"{field}: the image is larger than {MAX_SIDE} pixels a side") from None
    if max(image.size) > MAX_SIDE:
        raise HTTPException(422, f"{field}: the image is {image.width}x{image.height}; the server takes at most "
                                 f"{MAX_SIDE} pixels a side")
    try:
        image.load()
    except OSError as e:
        raise HTTPException(422, f"{field}: the image cannot be read ({e})") from None
    return image


def encode_png(image, parameters: str | None) -> str:
    return base64.b64encode(png_bytes(image, parameters)).decode()


def a1111_response(req: Txt2Img, result: Result) -> dict:
    info = {**result.info, "infotexts": result.infotexts, "notes": result.notes}
    images = [encode_png(im, text) for im, text in zip(result.images, result.infotexts)] if req.send_images else []
    return {"images": images, "parameters": req.model_dump(exclude={"init_images", "mask"}), "info": json.dumps(info)}


def png_info(text: str | None) -> dict:
    """/png-info's answer: the `parameters` text and its fields under A1111's names (empty if it does not parse)."""
    try:
        p = GenerationParams.from_text(text or "")
    except ValueError:
        return {"info": text or "", "items": {}, "parameters": {}}
    fields = {"Prompt": p.prompt, "Negative prompt": p.negative_prompt, "Steps": p.steps,
              "Sampler": SAMPLERS[p.sampler].a1111 if p.sampler in SAMPLERS else p.sampler, "CFG scale": p.cfg_scale,
              "Seed": p.seed, "Size-1": p.width, "Size-2": p.height, "Model hash": p.model_hash, "Model": p.model}
    return {"info": text, "items": {"parameters": text}, "parameters": fields | p.extra}


class Server:
    """What the endpoints share: the settings, the catalog of loadable things and the worker."""

    def __init__(self, settings):
        self.settings = settings
        self.catalog = Catalog(settings.model, settings.models_dir, settings.lora_dir, settings.embeddings_dir)
        self.worker = Worker(self.catalog.load(self.catalog.first), self.catalog.first.title)

    async def run(self, name: str, job):
        """Queue a job and wait for it; an unexpected failure is this request's 500, and the worker goes on."""
        if self.worker.queued() >= MAX_QUEUE:
            raise HTTPException(503, f"{MAX_QUEUE} requests are waiting; try again later")
        try:
            return await asyncio.wrap_future(self.worker.submit(name, job).future)
        except HTTPException:  # the request's own fault (4xx), raised in the job
            raise
        except ModelError as e:
            raise HTTPException(500, self.catalog.public(f"{name} failed: {e}")) from None
        except Exception as e:
            logger.exception("%s failed", name)
            raise HTTPException(500, self.catalog.public(f"{name} failed: {e.__class__.__name__}: {e}")) from None

    def generate(self, req: Txt2Img, kind: str, **images):
        return self.run(kind, generation_job(req, self.catalog, self.settings.outdir, kind=kind, **images))

    def switch_model(self, title: str):
        """Load a model of the catalog in the worker (queued behind running generations); the old one stays on failure."""
        entry = self.catalog.model(title)

        def load(worker):
            if entry.title == worker.model_title:
                return
            try:
                worker.pipe = self.catalog.load(entry)
            except ModelError as e:  # a file that is not a model: the client named it, a 422
                raise HTTPException(422, self.catalog.public(str(e))) from None
            worker.model_title = entry.title

        return self.run("load model", load)

    def preview(self) -> str | None:
        """The running batch's first image as it stands (the latents decoded), base64 PNG; None if there is none."""
        import torch

        latents = self.worker.progress.latents
        if latents is None:
            return None
        try:
            with torch.inference_mode():
                return encode_png(to_output(self.worker.pipe.decode(latents[None]), "pil")[0], None)
        except Exception:  # a preview is a courtesy: noisy early latents may not decode
            return None


def api_router(server: Server) -> APIRouter:
    api = APIRouter(prefix="/sdapi/v1")
    worker, catalog = server.worker, server.catalog

    @api.post("/txt2img")
    async def txt2img(req: Txt2Img):
        return await run_in_threadpool(a1111_response, req, await server.generate(req, "txt2img"))

    @api.post("/img2img")
    async def img2img(req: Img2Img):
        if not req.init_images:
            raise HTTPException(422, "init_images: give at least one base64 image")
        images = [decode_image(im, f"init_images[{i}]") for i, im in enumerate(req.init_images)]
        mask = decode_image(req.mask, "mask") if req.mask else None
        if mask is not None and mask.size != images[0].size:
            raise HTTPException(422, f"mask is {mask.width}x{mask.height} but init_images[0] is "
                                     f"{images[0].width}x{images[0].height}; a mask must have its image's size")
        result = await server.generate(req, "img2img", images=images, mask=mask)
        return await run_in_threadpool(a1111_response, req, result)

    @api.get("/progress")
    def progress(skip_current_image: bool = False):
        p = worker.progress
        done = (p.job_no + p.step / max(p.steps, 1)) / max(p.job_count, 1) if p.job else 0.0
        elapsed = time.time() - p.started if p.job else 0.0
        state = {"skipped": False, "interrupted": p.interrupted, "job": p.job, "job_count": p.job_count,
                 "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(p.started)) if p.job else "0",
                 "job_no": p.job_no, "sampling_step": p.step, "sampling_steps": p.steps, "queued": worker.queued()}
        return {"progress": done, "eta_relative": elapsed / done - elapsed if done > 0 else 0.0, "state": state,
                "current_image": None if skip_current_image else server.preview(), "textinfo": None}

    @api.post("/interrupt")
    def interrupt():
        worker.interrupt()
        return {}

    @api.get("/samplers")
    def samplers():
        return [{"name": s.a1111, "aliases": [s.name], "options": {"schedulers": list(s.schedulers)}}
                for s in SAMPLERS.values()]

    @api.get("/schedulers")
    def schedulers():
        names = {"automatic": "Automatic"} | SCHEDULE_A1111
        return [{"name": n, "label": label, "aliases": None, "default_rho": -1, "need_inner_model": False}
                for n, label in names.items()]

    @api.get("/sd-models")
    def sd_models():
        return [{"title": e.title, "model_name": Path(e.title).stem, "filename": e.title, "config": None,
                 "hash": worker.pipe.model_hash if e.title == worker.model_title else None, "sha256": None}
                for e in catalog.models()]

    @api.get("/loras")
    def loras():
        return [{"name": p.stem, "alias": p.stem, "path": p.relative_to(catalog.lora_dir).as_posix(), "metadata": {}}
                for p in catalog.loras()]

    @api.get("/embeddings")
    def embeddings():
        pipe = worker.pipe
        width = pipe.text_encoder.get_input_embeddings().weight.shape[1]
        return {"loaded": {w: {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None, "shape": width,
                               "vectors": len(tokens)} for w, tokens in pipe.embeddings.tokens.items()}, "skipped": {}}

    @api.get("/options")
    def get_options():
        return {"sd_model_checkpoint": worker.model_title, "sd_checkpoint_hash": worker.pipe.model_hash}

    @api.post("/options")
    async def set_options(req: Options):
        if req.sd_model_checkpoint is not None:
            await server.switch_model(req.sd_model_checkpoint)
        ignored = sorted(req.model_extra or {})
        return {"notes": [f"option {k!r} ignored" for k in ignored]}

    @api.post("/png-info")
    def png_info_endpoint(req: PngInfoRequest):
        return png_info(decode_image(req.image, "image").info.get("parameters"))

    @api.get("/scripts")
    def scripts():  # clients ask for it to find extensions; latentdiff has none
        return {"txt2img": [], "img2img": []}

    return api


def create_app(settings) -> FastAPI:
    """The app for `settings` (commands/serve.py's Settings); loads the start-up model before it returns."""
    server = Server(settings)
    app = FastAPI(title="latentdiff", description="AUTOMATIC1111-compatible API of latentdiff")
    app.state.server = server
    app.include_router(api_router(server))
    if settings.ui:
        import gradio as gr

        from .ui import build_ui

        # allowed_paths: the gallery shows the saved files (with their parameters chunk) from the output folder
        app = gr.mount_gradio_app(app, build_ui(server), path="/", allowed_paths=[str(settings.outdir)],
                                  max_file_size=settings.max_body_bytes)
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    if settings.api_auth is not None:
        app.add_middleware(BasicAuth, user=settings.api_auth[0], password=settings.api_auth[1])
    return app
