from .corpus import Corpus, group_passages
from .db import Store, artifact_hash, check_collection_name, sha256
from .index import ChunkIndex, IndexCache

__all__ = ["Corpus", "Store", "IndexCache", "ChunkIndex", "group_passages", "check_collection_name", "sha256", "artifact_hash"]
