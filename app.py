"""ragdemo web app. Host and port come from GRADIO_SERVER_NAME / GRADIO_SERVER_PORT (Gradio's own variables)."""
import spaces  # noqa: F401  first: on ZeroGPU it sets up CUDA for its GPU workers before torch is imported

from ragdemo.ui import CSS, build_app

demo = build_app()

if __name__ == "__main__":
    demo.launch(css=CSS)
