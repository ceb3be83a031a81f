"""LoRA adapters (Hu et al. 2021) on a model for inference: several at once, by name, each with its own scale.

Files are read the way diffusers' `StableDiffusionPipeline.load_lora_weights` reads them: latentdiff's own files
(peft `lora_A`/`lora_B` keys with the LoraConfig in the metadata) and the community layouts diffusers converts
(kohya/A1111 `lora_unet_…`/`lora_te_…` with `.alpha`). Each file becomes one named peft adapter in the UNet and
text encoder; a scale change only sets each layer's scaling (peft `set_adapters`), nothing is merged or reloaded.

A1111's prompt tags `<lora:name:weight>` name files in a LoRA folder; `lora_tags` takes them out of the text.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import re
import warnings
from pathlib import Path

LORA_SUFFIXES = (".safetensors",)
_TAG = re.compile(r"<lora:([^>]*)>")
_NAME = re.compile(r"[^0-9A-Za-z_-]+")
_SIZE_MISMATCH = re.compile(r"size mismatch for (\S+?): copying a param with shape (torch\.Size\(\[[^\]]*\]\)) from "
                            r"checkpoint, the shape in current model is (torch\.Size\(\[[^\]]*\]\))")


def adapter_name(name: str) -> str:
    """A peft-safe adapter name (no dots: they are module paths) from a file stem or a tag."""
    return _NAME.sub("_", name).strip("_") or "lora"


def lora_tags(prompt: str) -> tuple[str, dict[str, float]]:
    """(prompt without its `<lora:name>` / `<lora:name:weight>` tags, {name: weight}), as A1111 reads them."""
    tags: dict[str, float] = {}
    for body in _TAG.findall(prompt):
        name, *weights = body.split(":")
        if not name or len(weights) > 1:
            raise ValueError(f"prompt tag <lora:{body}> must look like <lora:name> or <lora:name:weight>.")
        try:
            weight = float(weights[0]) if weights else 1.0
        except ValueError:
            raise ValueError(f"prompt tag <lora:{body}> has a weight that is not a number.") from None
        if tags.get(name, weight) != weight:
            raise ValueError(f"the prompt names LoRA {name!r} twice with different weights.")
        tags[name] = weight
    return re.sub(r"\s{2,}", " ", _TAG.sub("", prompt)).strip(" ,"), tags


def find_lora(name: str, folder) -> Path:
    """The file `name`.safetensors in `folder` or a subfolder (as A1111's LoRA folder); ValueError if none, or if
    `name` is not a plain file name (a path or a wildcard would find files outside the folder, or any file)."""
    if Path(name).name != name or name in (".", "..") or any(c in name for c in "*?[]\\"):
        raise ValueError(f"<lora:{name}> must name a LoRA file by its name, not a path or a pattern.")
    folder = Path(folder)
    for suffix in LORA_SUFFIXES:
        found = sorted(folder.rglob(f"{name}{suffix}"))
        if found:
            return found[0]
    raise ValueError(f"no LoRA named {name!r} in {folder} (expected {name}.safetensors there).")


def lora_hash(path) -> str:
    """A1111's short LoRA hash for `Lora hashes:`: the first 12 hex digits of the sha256 of a safetensors file's
    tensor bytes (after its header, kohya's "addnet" hash, so metadata edits keep it)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        header = int.from_bytes(f.read(8), "little")
        f.seek(8 + header)
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:12]


@contextlib.contextmanager
def _quiet_stacking():
    peft_report = logging.getLogger("transformers.integrations.peft")
    level = peft_report.level
    peft_report.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            yield
    finally:
        peft_report.setLevel(level)


class Loras:
    """The LoRA files loaded into one UNet and its text encoders: name → (file, scale).

    `text_encoders` maps each encoder's key prefix in diffusers' layout to it: {"text_encoder": …} for SD 1.x/2.x,
    plus "text_encoder_2" (bigG) for SDXL, whose kohya files say lora_te1_/lora_te2_."""

    def __init__(self, unet, text_encoders: dict):
        self.unet, self.text_encoders = unet, {k: v for k, v in text_encoders.items() if v is not None}
        self.files: dict[str, Path] = {}
        self.scales: dict[str, float] = {}
        self._in: dict[str, set[str]] = {"unet": set()} | {prefix: set() for prefix in self.text_encoders}

    def load(self, path, scale: float = 1.0, name: str | None = None) -> str:
        """Load one file as adapter `name` (default: from the file name); returns the name."""
        from diffusers import StableDiffusionPipeline

        path = Path(path)
        name = adapter_name(name or path.stem)
        if name in self.files:
            raise ValueError(f"a LoRA named {name!r} is already loaded (from {self.files[name]}); unload it or "
                             "give this one another name.")
        if not path.is_file():
            raise ValueError(f"LoRA file {path} does not exist.")
        state, alphas, metadata = StableDiffusionPipeline.lora_state_dict(
            str(path.parent), weight_name=path.name, unet_config=self.unet.config, return_lora_metadata=True)
        try:
            self._inject(state, alphas, metadata, name)
        except (RuntimeError, ValueError) as e:
            self._remove(name)
            mismatch = _SIZE_MISMATCH.search(str(e))
            if mismatch is None:
                raise
            layer, theirs, ours = mismatch.groups()
            raise ValueError(f"{path} does not fit this model: layer {layer} is {theirs} in the file and {ours} here "
                             "(a LoRA for another base model?).") from None
        if not any(name in names for names in self._in.values()):
            raise ValueError(f"{path} holds no LoRA weights for a UNet or text encoder.")
        self.files[name], self.scales[name] = path, float(scale)
        self._apply(self.scales)
        return name

    def _inject(self, state, alphas, metadata, name: str) -> None:
        """As StableDiffusion(XL)Pipeline.load_lora_weights does it; state and metadata keys carry the component
        prefixes (unet., text_encoder., text_encoder_2.). A second adapter makes peft warn that one exists and
        transformers report the first one's keys as missing from this file: both are the point of stacking."""
        from diffusers import StableDiffusionPipeline

        with _quiet_stacking():
            if any(k.startswith("unet.") for k in state):
                StableDiffusionPipeline.load_lora_into_unet(state, alphas, self.unet, adapter_name=name,
                                                            metadata=metadata)
                self._in["unet"].add(name)
            for prefix, encoder in self.text_encoders.items():
                if any(k.startswith(prefix + ".") for k in state):
                    StableDiffusionPipeline.load_lora_into_text_encoder(state, alphas, encoder, prefix=prefix,
                                                                        adapter_name=name, metadata=metadata)
                    self._in[prefix].add(name)

    def set_scales(self, scales: dict[str, float]) -> None:
        self._check_loaded(scales)
        self.scales |= {name: float(s) for name, s in scales.items()}
        self._apply(self.scales)

    def unload(self, name: str) -> None:
        self._check_loaded([name])
        self._remove(name)
        self._apply(self.scales)

    def _remove(self, name: str) -> None:
        """Take adapter `name` out of every model, whatever part of it got in."""
        from diffusers.utils.peft_utils import delete_adapter_layers

        if name in getattr(self.unet, "peft_config", {}):
            self.unet.delete_adapters(name)
        for encoder in self.text_encoders.values():
            if name in getattr(encoder, "peft_config", {}):
                delete_adapter_layers(encoder, name)  # pops its peft_config entry too
        for registry in (self.files, self.scales):
            registry.pop(name, None)
        for names in self._in.values():
            names.discard(name)

    @contextlib.contextmanager
    def scaled(self, scales: dict[str, float]):
        """These scales on top of the loaded ones for the duration (A1111's per-generation prompt tags)."""
        self._check_loaded(scales)
        self._apply(self.scales | scales)
        try:
            yield
        finally:
            self._apply(self.scales)

    def _check_loaded(self, names) -> None:
        unknown = [n for n in names if n not in self.files]
        if unknown:
            loaded = ", ".join(self.files) or "none"
            raise ValueError(f"no LoRA named {', '.join(map(repr, unknown))} is loaded (loaded: {loaded}).")

    def _apply(self, scales: dict[str, float]) -> None:
        """Every adapter active at its scale: peft sums their outputs, W x + Σ_i s_i (α_i/r_i) B_i A_i x."""
        from diffusers.utils.peft_utils import set_weights_and_activate_adapters

        unet_names = [n for n in scales if n in self._in["unet"]]
        if unet_names:
            self.unet.set_adapters(unet_names, weights=[scales[n] for n in unet_names])
        for prefix, encoder in self.text_encoders.items():
            names = [n for n in scales if n in self._in[prefix]]
            if names:
                set_weights_and_activate_adapters(encoder, names, [scales[n] for n in names])
