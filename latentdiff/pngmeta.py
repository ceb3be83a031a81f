"""Generation parameters inside PNGs, in the A1111 `parameters` text-chunk format that SD tools read.

    a red circle on a blue background
    Negative prompt: blurry
    Steps: 20, Sampler: DPM++ 2M, CFG scale: 7.5, Seed: 42, Size: 64x64, Model hash: 1a2b3c4d5e, Model: default_model, Precision: fp32, Schedule type: Karras, Clip skip: 2
"""
from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from .config import DEFAULTS
from .files import atomic_write_bytes, create_exclusive_bytes
from .schedulers import SAMPLERS, SCHEDULE_A1111, from_a1111_combined


@dataclass
class GenerationParams:
    prompt: str
    negative_prompt: str = DEFAULTS.negative_prompt
    steps: int = DEFAULTS.steps
    sampler: str = DEFAULTS.sampler
    cfg_scale: float = DEFAULTS.guidance_scale
    seed: int = 0
    width: int = 512
    height: int = 512
    model: str = ""
    model_hash: str = ""
    extra: dict[str, str] = field(default_factory=dict)  # e.g. Precision, Eta

    def to_text(self) -> str:
        fields = {  # A1111's display name for the sampler, so SD tools read it; ours on the way back (from_text)
            "Steps": self.steps, "Sampler": SAMPLERS[self.sampler].a1111 if self.sampler in SAMPLERS else self.sampler, "CFG scale": _num(self.cfg_scale), "Seed": self.seed,
            "Size": f"{self.width}x{self.height}", "Model hash": self.model_hash, "Model": self.model, **self.extra,
        }
        lines = [self.prompt]
        if self.negative_prompt:
            lines.append(f"Negative prompt: {self.negative_prompt}")
        lines.append(", ".join(f"{k}: {_quote(str(v))}" for k, v in fields.items() if v != ""))
        return "\n".join(lines)

    @classmethod
    def from_text(cls, text: str) -> "GenerationParams":
        lines = text.rstrip("\n").split("\n")
        if not lines or not re.match(r"^Steps: ", lines[-1]):
            raise ValueError("the PNG's parameters text has no 'Steps: …' line; expected A1111-style generation parameters")
        fields = dict(_parse_fields(lines[-1]))
        body = "\n".join(lines[:-1])
        prompt, _, negative = body.partition("\nNegative prompt: ")
        if body.startswith("Negative prompt: "):
            prompt, negative = "", body[len("Negative prompt: "):]
        width, _, height = fields.pop("Size", "512x512").partition("x")
        sampler, schedule = from_a1111_combined(fields.pop("Sampler", DEFAULTS.sampler))
        if schedule is not None and "Schedule type" not in fields:  # "DPM++ 2M Karras": the old combined name
            fields["Schedule type"] = SCHEDULE_A1111[schedule]
        return cls(
            prompt=prompt, negative_prompt=negative, steps=int(fields.pop("Steps")),
            sampler=sampler, cfg_scale=float(fields.pop("CFG scale", DEFAULTS.guidance_scale)),
            seed=int(fields.pop("Seed", 0)), width=int(width), height=int(height),
            model=fields.pop("Model", ""), model_hash=fields.pop("Model hash", ""), extra=fields,
        )


def _num(x: float) -> str:
    return f"{x:g}"


def _quote(v: str) -> str:
    """A1111 quotes a value holding a comma, colon or quote as a JSON string (backslashes escaped too)."""
    return json.dumps(v) if ("," in v or ":" in v or '"' in v) else v


def _parse_fields(line: str):
    for m in re.finditer(r'\s*([\w][\w \-/]*?):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)', line):
        key, value = m.group(1).strip(), m.group(2).strip()
        if value.startswith('"'):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:  # a hand-written quote that is not JSON: take it as latentdiff once wrote it
                value = value[1:-1].replace('\\"', '"')
        yield key, value


def write_png(path, image, parameters: str | None = None, *, exclusive: bool = False) -> None:
    """Write a PIL image as a PNG atomically (temporary name, then rename), with a `parameters` chunk if given.

    `exclusive`: never replace an existing file (FileExistsError instead), even one another process just made.
    """
    (create_exclusive_bytes if exclusive else atomic_write_bytes)(Path(path), png_bytes(image, parameters))


def write_numbered(folder: Path, name, image, parameters: str | None = None) -> Path:
    """Write a PNG as folder / name(n) with the first free n from the number of PNGs there on; never replaces a
    file (another writer may take the same number at the same moment: then the next one). Returns its path."""
    n = len(list(Path(folder).glob("*.png")))
    while True:
        try:
            write_png(Path(folder) / name(n), image, parameters, exclusive=True)
            return Path(folder) / name(n)
        except FileExistsError:
            n += 1


def png_bytes(image, parameters: str | None = None) -> bytes:
    """A PIL image as PNG file bytes, with a `parameters` chunk if given (the server sends these)."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    if parameters is not None:
        info.add_text("parameters", parameters)
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def save_png(path, image, params: GenerationParams, *, exclusive: bool = False) -> None:
    write_png(path, image, params.to_text(), exclusive=exclusive)


def read_params(path) -> GenerationParams:
    from PIL import Image

    with Image.open(path) as im:
        text = im.info.get("parameters")
    if text is None:
        raise ValueError(f"{path} has no 'parameters' text chunk; expected a PNG written by latentdiff or another SD tool")
    return GenerationParams.from_text(text)
