"""The content digests the app keys things by: one SHA-256 helper for every hash of content or of a description
(documents, chunk texts, artifact knobs, adapter blobs, index signatures, cancel-flag file names)."""
from __future__ import annotations

import hashlib
import json


def sha256(data: bytes) -> str:
    """The hex SHA-256 of `data`; callers that need a shorter name take a prefix of it."""
    return hashlib.sha256(data).hexdigest()


def artifact_hash(data) -> str:
    """Short key for "the knobs that shaped an artifact": bytes as they are, anything else as sorted JSON."""
    raw = data if isinstance(data, bytes) else json.dumps(data, sort_keys=True).encode()
    return sha256(raw)[:16]
