"""ragdemo web app. Host and port come from GRADIO_SERVER_NAME / GRADIO_SERVER_PORT (Gradio's own variables)."""
import spaces  # noqa: F401  first: on ZeroGPU it sets up CUDA for its GPU workers before torch is imported
import logging

from ragdemo.ui import CSS, build_app

# the server's log says what the start does (the first start converts the embedded model, about 20 s)
logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
logging.getLogger("ragdemo").setLevel(logging.INFO)

demo = build_app()

if __name__ == "__main__":
    demo.launch(css=CSS)
