"""The JSON bodies of the A1111 endpoints, as pydantic models: a wrong type or a value out of range is a 422 naming
the field (FastAPI's validation error), before the request is queued. Fields A1111 has and latentdiff cannot
honour, and fields nobody knows, are accepted and named in the response's `info` notes."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..config import DEFAULTS
from ..pipeline import MAX_SEED
from ..schedulers import SAMPLERS, SCHEDULERS, from_a1111_combined, schedule_from_a1111

# Bounds that keep one request from exhausting the machine (a 413/422, never an out-of-memory kill)
MAX_SIDE = 2048  # pixels, width or height
MAX_PIXELS = 4 * 1024 * 1024  # width × height × batch_size of one batch
MAX_BATCH, MAX_ITER, MAX_STEPS = 16, 100, 500

# A1111 fields that latentdiff does not honour, with the values that change nothing (None: any value does, e.g. a
# hires-fix setting while enable_hr is false). Sent with another value, they are named in the notes.
UNHONOURED = {
    "enable_hr": (False,), "restore_faces": (False, None), "tiling": (False, None), "subseed_strength": (0, None),
    "styles": ([], None), "script_name": (None, ""), "script_args": ([], None), "alwayson_scripts": ({}, None),
    "s_churn": (0, None), "s_tmax": (0, None), "s_tmin": (0, None), "s_noise": (1, None),
    "seed_resize_from_h": (0, -1, None), "seed_resize_from_w": (0, -1, None), "image_cfg_scale": None,
    "resize_mode": (0, None), "initial_noise_multiplier": (1, None), "inpainting_mask_invert": (0, False, None),
    "refiner_checkpoint": (None, ""), "refiner_switch_at": None, "disable_extra_networks": (False, None),
    "subseed": None, "do_not_save_samples": None, "do_not_save_grid": None, "sampler_index": None,
    "override_settings_restore_afterwards": None, "include_init_images": None, "firstphase_width": None,
    "firstphase_height": None, "hr_scale": None, "hr_upscaler": None, "hr_second_pass_steps": None,
    "hr_resize_x": None, "hr_resize_y": None, "hr_checkpoint_name": None, "hr_sampler_name": None,
    "hr_scheduler": None, "hr_prompt": None, "hr_negative_prompt": None, "comments": None, "force_task_id": None,
    "infotext": None, "user": None, "firstpass_image": None,
    # image-to-image settings of A1111's inpainting that latentdiff's inpainting does in its own way
    "inpainting_fill": None, "inpaint_full_res": None, "inpaint_full_res_padding": None,
}
# override_settings keys that are honoured
OVERRIDES = {"CLIP_stop_at_last_layers": "clip_skip", "s_min_uncond_all": "guidance_min_sigma_all_steps"}


class Txt2Img(BaseModel):
    model_config = ConfigDict(extra="allow")

    prompt: str = ""
    negative_prompt: str = DEFAULTS.negative_prompt
    seed: int = Field(-1, ge=-1, le=MAX_SEED)  # -1: a random seed
    sampler_name: str = Field(DEFAULTS.sampler)  # A1111's name ("DPM++ 2M", "Euler a", "DPM++ 2M Karras") or ours
    scheduler: str | None = None  # A1111's schedule name ("Karras", "automatic") or ours
    batch_size: int = Field(1, ge=1, le=MAX_BATCH)
    n_iter: int = Field(1, ge=1, le=MAX_ITER)
    steps: int = Field(DEFAULTS.steps, ge=1, le=MAX_STEPS)
    cfg_scale: float = Field(DEFAULTS.guidance_scale, ge=0, le=100, allow_inf_nan=False)
    width: int | None = Field(None, ge=8, le=MAX_SIDE)  # None: the model's native size
    height: int | None = Field(None, ge=8, le=MAX_SIDE)
    eta: float | None = Field(None, ge=0, le=1)  # DDIM's; A1111's ancestral eta is 1, the only one "Euler a" runs
    denoising_strength: float | None = Field(None, gt=0, le=1)  # image-to-image only
    s_min_uncond: float | None = Field(None, ge=0, allow_inf_nan=False)  # NGMS; None: the model's own
    save_images: bool = False
    send_images: bool = True
    override_settings: dict = {}

    @model_validator(mode="before")
    @classmethod
    def _old_sampler_field(cls, data):
        """A1111 reads `sampler_index` (its older field) when `sampler_name` is not given."""
        if isinstance(data, dict) and "sampler_name" not in data and data.get("sampler_index"):
            data = {**data, "sampler_name": data["sampler_index"]}
        return data

    @field_validator("sampler_name")
    @classmethod
    def _sampler(cls, name: str) -> str:
        if from_a1111_combined(name)[0] not in SAMPLERS:
            raise ValueError(f"unknown sampler {name!r}; expected one of: "
                             f"{', '.join(s.a1111 for s in SAMPLERS.values())} (or {', '.join(SAMPLERS)})")
        return name

    @field_validator("scheduler")
    @classmethod
    def _scheduler(cls, name: str | None) -> str | None:
        if name is not None and schedule_from_a1111(name) not in (None, *SCHEDULERS):
            raise ValueError(f"unknown scheduler {name!r}; expected automatic or one of: {', '.join(SCHEDULERS)}")
        return name

    def sampler_and_schedule(self) -> tuple[str, str | None]:
        """latentdiff's sampler and schedule (None: the model's own); an old combined name gives both."""
        sampler, schedule = from_a1111_combined(self.sampler_name)
        given = schedule_from_a1111(self.scheduler) if self.scheduler is not None else None
        return sampler, given if given is not None else schedule

    def notes(self) -> list[str]:
        """What this request asks for that latentdiff does not do (the rest of it is done)."""
        notes = []
        for key, value in (self.model_extra or {}).items():
            if key not in UNHONOURED:
                notes.append(f"unknown field {key!r} ignored")
            elif UNHONOURED[key] is not None and value not in UNHONOURED[key]:
                notes.append(f"{key}={value!r} is not supported by latentdiff and was ignored")
        for key in self.override_settings:
            if key not in OVERRIDES:
                notes.append(f"override_settings {key!r} ignored")
        return notes


class Img2Img(Txt2Img):
    init_images: list[str] = []  # base64 images (data: URLs too); the API needs one, the UI passes pictures
    mask: str | None = None  # base64; white repaints, black keeps
    mask_blur: float = Field(DEFAULTS.mask_blur, ge=0, le=64)


class PngInfoRequest(BaseModel):
    image: str  # base64 PNG (data: URLs too)


class Options(BaseModel):
    model_config = ConfigDict(extra="allow")

    sd_model_checkpoint: str | None = None
