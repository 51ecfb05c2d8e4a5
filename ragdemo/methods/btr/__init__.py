"""BTR (Cao et al., ICLR 2024), adapted to a decoder-only LM: passages' lower-layer states are computed
offline, binarized and stored; at query time only the upper layers see them.

forward.py: the query-time forward over stored states; training.py: the distilled LoRA and its objectives;
artifacts.py: what is stored, keyed, made and read; method.py: the `Btr` method (knobs, prepare, answer, nll,
storage). A name used by a module is patched on that module (e.g. `btr.training.train_adapter`)."""
from __future__ import annotations

from .artifacts import FORMAT_VERSION, STOPWORDS, stopword_ids
from .forward import EVERY, ONCE, Forward, btr_forward, decode_step, lower_states
from .method import Btr, BtrParams
from .training import (KL, OBJECTIVES, RECIPE, RECOVERY, SALIENT, SALIENT_FRACTION, distil_lora, distill_loss,
                       passage_saliency, salient_distill_loss)

__all__ = ["Btr", "BtrParams", "EVERY", "FORMAT_VERSION", "Forward", "KL", "OBJECTIVES", "ONCE", "RECIPE", "RECOVERY",
           "SALIENT", "SALIENT_FRACTION", "STOPWORDS", "btr_forward", "decode_step", "distil_lora", "distill_loss",
           "lower_states", "passage_saliency", "salient_distill_loss", "stopword_ids"]
