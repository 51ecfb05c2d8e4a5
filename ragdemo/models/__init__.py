"""Model loading. `Models` hands out the shared LM and embedder lazily, so commands that need neither stay fast."""
from __future__ import annotations

from ..config import Settings
from .embedder import Embedder, load_embedder
from .lm import LM, load_lm, loaded_lm


class Models:
    def __init__(self, settings: Settings | None = None):
        self.settings = settings or Settings()

    @property
    def lm(self) -> LM:
        return load_lm(self.settings)

    def loaded(self) -> LM | None:
        """The LM if it is loaded already (loads nothing)."""
        return loaded_lm(self.settings)

    def load(self, progress=None) -> LM:
        """The LM, with (fraction, message) progress while it loads: the first start converts the embedded model."""
        return load_lm(self.settings, progress=progress)

    @property
    def embedder(self) -> Embedder:
        return load_embedder(self.settings.embedder_id)


__all__ = ["LM", "Embedder", "Models", "load_lm", "load_embedder"]
