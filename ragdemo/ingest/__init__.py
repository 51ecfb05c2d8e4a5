from .chunking import Chunk, chunk_text
from .pipeline import IngestReport, ingest_bytes, ingest_files
from .readers import SUPPORTED, read_document, safe_name

__all__ = ["Chunk", "chunk_text", "IngestReport", "ingest_bytes", "ingest_files", "SUPPORTED", "read_document", "safe_name"]
