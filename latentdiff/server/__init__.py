"""`latentdiff serve`'s server: AUTOMATIC1111's /sdapi/v1 API and a Gradio web UI on one FastAPI app, with one model
worker that runs requests in turn (worker.py). commands/serve.py parses the flags into its Settings."""
from .app import create_app

__all__ = ["create_app"]
