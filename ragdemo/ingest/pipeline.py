"""Ingest: read, deduplicate by content hash, chunk, embed, and store atomically, reporting progress."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import UserError
from ..hashing import sha256
from ..units import plural
from ..store import Store
from .chunking import chunk_text
from .readers import read_document, safe_name

Progress = Callable[[float, str], None]


@dataclass
class IngestReport:
    name: str
    status: str  # added | duplicate | error; the workbench adds prepared | skipped | dropped
    message: str = ""
    doc_id: int | None = None
    n_tokens: int = 0
    n_chunks: int = 0


def ingest_bytes(store: Store, collection_id: int, name: str, data: bytes, tokenizer, embedder,
                 chunk_tokens: int = 64, max_bytes: int | None = None) -> IngestReport:
    name = safe_name(name)
    if max_bytes is not None and len(data) > max_bytes:
        raise UserError(f"{name}: {len(data) / 1e6:.1f} MB is over the {max_bytes / 1e6:.0f} MB limit (RAGDEMO_MAX_FILE_MB)")
    digest = sha256(data)
    existing = store.find_document(collection_id, digest)
    if existing:
        return IngestReport(name, "duplicate", f"{name}: same content as '{existing['name']}' (id {existing['id']}), not stored again",
                            existing["id"])
    text = read_document(name, data)
    chunks = chunk_text(text, tokenizer, chunk_tokens)
    vectors = embedder.embed([c.text for c in chunks])
    doc_id = store.add_document(collection_id, name, digest, len(data), text, chunks, vectors, embedder.name)
    n_tokens = chunks[-1].tok_end if chunks else 0
    return IngestReport(name, "added", f"{name}: {plural(n_tokens, 'token')} in {plural(len(chunks), 'chunk')}", doc_id, n_tokens, len(chunks))


def ingest_files(store: Store, collection_id: int, files: list[tuple[str, bytes | Path]], tokenizer, embedder,
                 chunk_tokens: int = 64, max_bytes: int | None = None, progress: Progress | None = None) -> list[IngestReport]:
    """Each file succeeds or fails on its own: a bad file is reported and never touches what is stored."""
    reports = []
    for i, (name, source) in enumerate(files):
        if progress:
            progress(i / max(len(files), 1), f"ingesting {safe_name(name)}")
        try:
            data = _read_source(name, source, max_bytes)
            reports.append(ingest_bytes(store, collection_id, name, data, tokenizer, embedder, chunk_tokens, max_bytes))
        except UserError as exc:
            reports.append(IngestReport(safe_name(name), "error", str(exc)))
    if progress:
        progress(1.0, "done")
    return reports


def _read_source(name: str, source: bytes | Path, max_bytes: int | None) -> bytes:
    if isinstance(source, bytes):
        return source
    path = Path(source)
    if not path.is_file():
        raise UserError(f"{safe_name(name)}: no such file")
    if max_bytes is not None and path.stat().st_size > max_bytes:
        raise UserError(f"{safe_name(name)}: {path.stat().st_size / 1e6:.1f} MB is over the {max_bytes / 1e6:.0f} MB limit (RAGDEMO_MAX_FILE_MB)")
    return path.read_bytes()
