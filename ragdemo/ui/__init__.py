"""The Gradio app. `build_app()` returns the Blocks; `app.py` at the repository root launches it with `CSS`."""
from .app import CSS, build_app

__all__ = ["CSS", "build_app"]
