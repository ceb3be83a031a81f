#!/usr/bin/env python
"""Batch text-to-image with SD-style flags; `latentdiff generate` runs the same code. See --help."""
import sys

from latentdiff.commands.generate import main

if __name__ == "__main__":
    sys.exit(main(prog="txt2img.py"))
