from .corpus import Corpus, RetrieverComparison, reading_order
from .db import RETRIEVERS, ArtifactRow, Store, StoredArtifact, artifact_hash, check_collection_name, chunk_key, sha256
from .index import BinaryChunkIndex, ChunkIndex, IndexCache

__all__ = ["Corpus", "Store", "IndexCache", "ChunkIndex", "BinaryChunkIndex", "RetrieverComparison", "RETRIEVERS",
           "reading_order", "check_collection_name", "sha256", "artifact_hash", "chunk_key", "StoredArtifact",
           "ArtifactRow"]
