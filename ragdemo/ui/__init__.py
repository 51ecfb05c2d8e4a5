"""The Gradio app. `build_app()` returns the Blocks; `app.py` at the repository root launches it."""
from .app import build_app

__all__ = ["build_app"]
