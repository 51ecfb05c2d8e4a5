"""The `__metadata__` of a safetensors blob (its string key/value pairs), read from the header alone: the
passage caches (engine/kv.py) and the LoRA adapters (engine/lora.py) store their shapes and knobs there."""
from __future__ import annotations

import json
import struct


def safetensors_metadata(blob: bytes) -> dict:
    """safetensors starts with the header's length (8 bytes, little-endian) and the header as JSON."""
    size = struct.unpack("<Q", blob[:8])[0]
    return json.loads(blob[8:8 + size]).get("__metadata__", {})
