"""The `latentdiff` command: dispatch only; each command lives in latentdiff/commands/."""
from __future__ import annotations

import sys

USAGE = """usage: latentdiff COMMAND [ARGS]

commands:
  generate PROMPT [options]   text to image (the same options as scripts/txt2img.py; --help lists them)
  train --config FILE [...]   fine-tune or train a model (full or LoRA) with accelerate
  train-vae --config FILE     train the VAE of a model from scratch
  make-shapes OUTDIR --n N    write the synthetic captioned "shapes" dataset
  eval-shapes [--model M]     judge a model on every caption of the shapes grammar
  convert SRC DST [--dtype D]  a model between diffusers folder and single file; a LoRA to kohya's layout
  serve [--port 7860] [...]   a web UI and an AUTOMATIC1111-compatible API (/sdapi/v1) on 127.0.0.1
"""


def _generate(argv):
    from .commands.generate import main

    return main(argv, prog="latentdiff generate", positional_prompt=True)


def _train(argv):
    from .commands.train import main

    return main(argv)


def _train_vae(argv):
    from .commands.train import vae_main

    return vae_main(argv)


def _make_shapes(argv):
    from .commands.make_shapes import main

    return main(argv)


def _eval_shapes(argv):
    from .commands.eval_shapes import main

    return main(argv)


def _convert(argv):
    from .commands.convert import main

    return main(argv)


def _serve(argv):
    from .commands.serve import main

    return main(argv)


# Imported on use: `latentdiff --help` and bad commands answer without importing torch.
COMMANDS = {"generate": _generate, "train": _train, "train-vae": _train_vae, "make-shapes": _make_shapes, "eval-shapes": _eval_shapes,
            "convert": _convert, "serve": _serve}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command = COMMANDS.get(argv[0])
    if command is None:
        print(f"latentdiff: error: unknown command {argv[0]!r}; expected one of: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    return command(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
