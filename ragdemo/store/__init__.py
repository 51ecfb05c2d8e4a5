from .corpus import Corpus, RetrieverComparison, group_passages
from .db import RETRIEVERS, ArtifactRow, Store, StoredArtifact, artifact_hash, check_collection_name, chunk_key, sha256
from .index import BinaryChunkIndex, ChunkIndex, IndexCache

__all__ = ["Corpus", "Store", "IndexCache", "ChunkIndex", "BinaryChunkIndex", "RetrieverComparison", "RETRIEVERS",
           "group_passages", "check_collection_name", "sha256", "artifact_hash", "chunk_key", "StoredArtifact",
           "ArtifactRow"]
