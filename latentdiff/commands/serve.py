"""`latentdiff serve`: the web UI and the AUTOMATIC1111-compatible API on one server (latentdiff/server/).

Safe by default: it listens on 127.0.0.1 only (`--listen` opens it to the network), `--api-auth user:pass` puts
the API and the UI behind HTTP Basic auth, and requests name models, LoRAs and embeddings of the given folders only.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from ..errors import ModelError, UsageError
from .generate import check_model, check_outdir


@dataclass(frozen=True)
class Settings:
    model: Path | None = None  # None: the shipped model
    models_dir: Path | None = None
    host: str = "127.0.0.1"
    port: int = 7860
    api_auth: tuple[str, str] | None = None
    outdir: Path = Path("outputs")
    ui: bool = True
    lora_dir: Path | None = None
    embeddings_dir: Path | None = None
    max_body_bytes: int = 64 * 2**20  # base64 init images of a few 2048² pictures fit


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="latentdiff serve", description="A web UI and an AUTOMATIC1111-compatible HTTP "
                                "API (/sdapi/v1) on one server; one model worker runs the requests in turn.")
    p.add_argument("--model", type=Path, help="the model to start with (default: the shipped model)")
    p.add_argument("--models-dir", type=Path, help="a folder of models clients may switch to (sd_model_checkpoint)")
    p.add_argument("--host", help="the address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860, help="the port (default 7860, as A1111)")
    p.add_argument("--listen", action="store_true", help="listen on every network interface (0.0.0.0)")
    p.add_argument("--api-auth", metavar="USER:PASS", help="require HTTP Basic auth for the API and the UI")
    p.add_argument("--outdir", type=Path, default=Path("outputs"),
                   help="where images are saved (the UI's, and the API's with save_images)")
    p.add_argument("--no-ui", action="store_true", help="serve the API only")
    p.add_argument("--lora-dir", type=Path, help="the folder <lora:name:weight> prompt tags name files in")
    p.add_argument("--embeddings-dir", type=Path, help="load every embedding in this folder")
    return p


def check_args(args) -> Settings:
    """Everything that can be wrong with the flags, as one sentence, before the model is loaded."""
    if args.listen and args.host is not None:
        raise UsageError("give --host or --listen, not both (--listen is --host 0.0.0.0)")
    if not 0 < args.port < 65536:
        raise UsageError(f"--port must be from 1 to 65535, got {args.port}")
    auth = None
    if args.api_auth is not None:
        user, sep, password = args.api_auth.partition(":")
        if not (user and sep and password):
            raise UsageError("--api-auth must look like USER:PASS, both non-empty")
        auth = (user, password)
    if args.model is not None:
        check_model(args.model)
    for flag, folder in (("--models-dir", args.models_dir), ("--lora-dir", args.lora_dir),
                         ("--embeddings-dir", args.embeddings_dir)):
        if folder is not None and not folder.is_dir():
            raise UsageError(f"{flag} {folder} is not a folder")
    check_outdir(args.outdir.resolve())
    return Settings(args.model, args.models_dir, "0.0.0.0" if args.listen else args.host or "127.0.0.1", args.port,
                    auth, args.outdir.resolve(), not args.no_ui, args.lora_dir, args.embeddings_dir)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = check_args(args)
        import uvicorn

        from ..server import create_app

        app = create_app(settings)
    except (UsageError, ModelError) as e:
        print(f"latentdiff serve: error: {e}", file=sys.stderr)
        return 2
    if settings.host not in ("127.0.0.1", "localhost", "::1") and settings.api_auth is None:
        print("latentdiff serve: warning: listening beyond this machine without --api-auth: anyone who can reach "
              "it can generate and switch models", file=sys.stderr)
    print(f"latentdiff serve: http://{settings.host}:{settings.port}/ ({'API only' if not settings.ui else 'UI and API'}"
          f"{', auth required' if settings.api_auth else ''})", file=sys.stderr)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="warning")
    return 0
