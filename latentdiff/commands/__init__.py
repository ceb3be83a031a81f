"""Command-line front ends: argument parsing and bad-input checks, then one call into the library.

generate (`scripts/txt2img.py`, `latentdiff generate`), train (`latentdiff train`, `train-vae`),
make_shapes, eval_shapes, convert, serve (whose server lives in latentdiff/server/). Nothing in the library imports
from here.
"""
