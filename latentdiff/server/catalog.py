"""What the server may load, by name: the models in the models folder (and the one it started with), the LoRAs of
the LoRA folder, the embeddings of the embeddings folder. A request names an entry and never gives a path; a name
that leads outside its folder is refused (400), one that is not there is 404."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from fastapi import HTTPException

from ..adapters import LORA_SUFFIXES, embedding_files, find_lora, lora_tags
from ..generation import load_model
from ..pipeline import DEFAULT_MODEL, MODEL_SUFFIXES

DEFAULT_TITLE = "default"  # the shipped model
_HASH = re.compile(r"\s*\[[0-9a-fA-F]{8,64}\]$")  # A1111 titles end in " [short hash]"


@dataclass(frozen=True)
class ModelEntry:
    title: str  # what clients send as sd_model_checkpoint: the path relative to the models folder
    path: Path | None  # None: the shipped model


class Catalog:
    def __init__(self, model: Path | None, models_dir: Path | None, lora_dir: Path | None,
                 embeddings_dir: Path | None):
        self.models_dir, self.lora_dir, self.embeddings_dir = models_dir, lora_dir, embeddings_dir
        self.first = self._entry(model)

    def _entry(self, path: Path | None) -> ModelEntry:
        if path is None:
            return ModelEntry(DEFAULT_TITLE, None)
        inside = self.models_dir is not None and path.resolve().is_relative_to(self.models_dir.resolve())
        return ModelEntry(path.resolve().relative_to(self.models_dir.resolve()).as_posix() if inside else path.name, path)

    def models(self) -> list[ModelEntry]:
        """The start-up model, then the folder's single files and diffusers folders (read afresh: new files show up)."""
        found = []
        if self.models_dir is not None:
            folders = [p.parent for p in self.models_dir.rglob("model_index.json")]
            files = [p for p in self.models_dir.rglob("*") if p.suffix.lower() in MODEL_SUFFIXES and p.is_file()
                     and not any(p.is_relative_to(f) for f in folders)]  # a folder's own weights are not models
            found = [self._entry(p) for p in sorted(files + folders)]
        return [self.first] + [e for e in found if e.title != self.first.title]

    def model(self, name: str) -> ModelEntry:
        """The entry a client names by title (A1111's " [hash]" suffix allowed) or by its name without suffix."""
        name = _HASH.sub("", name.strip())
        parts = PurePosixPath(name.replace("\\", "/"))
        if parts.is_absolute() or ".." in parts.parts or re.match(r"^[A-Za-z]:", name):
            raise HTTPException(400, f"sd_model_checkpoint {name!r} is a path; name a model of the models folder "
                                     "(GET /sdapi/v1/sd-models lists them)")
        entries = self.models()
        match = next((e for e in entries if name in (e.title, PurePosixPath(e.title).stem)), None)
        if match is None:
            raise HTTPException(404, f"no model named {name!r}; expected one of: {', '.join(e.title for e in entries)}")
        return match

    def public(self, text: str) -> str:
        """`text` (an error a client will read) with the server's folders named by their flags and the shipped model
        by its title: a client learns no path of the server's disk."""
        folders = [("--models-dir", self.models_dir), ("--lora-dir", self.lora_dir),
                   ("--embeddings-dir", self.embeddings_dir), (DEFAULT_TITLE, DEFAULT_MODEL)]
        for name, folder in folders:
            for spelling in {str(folder.resolve()), str(folder)} if folder is not None else ():
                text = text.replace(spelling, name)
        return text

    def load(self, entry: ModelEntry):
        """The pipeline of a model entry, with every embedding of the embeddings folder loaded (as A1111 does)."""
        pipe = load_model(entry.path)
        for path in self.embedding_files():
            pipe.load_embedding(path)
        return pipe

    def loras(self) -> list[Path]:
        if self.lora_dir is None:
            return []
        return sorted(p for p in self.lora_dir.rglob("*") if p.suffix.lower() in LORA_SUFFIXES and p.is_file())

    def lora_files(self, prompt: str) -> dict[str, Path]:
        """The files a prompt's `<lora:name:w>` tags name, found in the LoRA folder; 400 naming the tag if not."""
        try:
            tags = lora_tags(prompt)[1]
            if tags and self.lora_dir is None:
                raise ValueError(f"the prompt names <lora:{next(iter(tags))}> but the server has no --lora-dir")
            return {name: find_lora(name, self.lora_dir) for name in tags}
        except ValueError as e:
            raise HTTPException(400, self.public(str(e)).rstrip(".")) from None

    def embedding_files(self) -> list[Path]:
        return embedding_files(self.embeddings_dir) if self.embeddings_dir is not None else []
