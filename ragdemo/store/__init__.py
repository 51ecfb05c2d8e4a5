from ..hashing import artifact_hash, sha256
from .artifacts import ArtifactRow, StoredArtifact, chunk_key
from .corpus import Corpus, RetrieverComparison, reading_order
from .db import RETRIEVERS, Store, check_collection_name
from .index import BinaryChunkIndex, ChunkIndex, IndexCache

__all__ = ["Corpus", "Store", "IndexCache", "ChunkIndex", "BinaryChunkIndex", "RetrieverComparison", "RETRIEVERS",
           "reading_order", "check_collection_name", "sha256", "artifact_hash", "chunk_key", "StoredArtifact",
           "ArtifactRow"]
