"""Task knowledge for LLM-SegNet: short texts describing a structure, text encoders, an embedding cache, and the
``semiseg knowledge`` command that (re)writes a text with an LLM the user has.

The one call a method makes::

    from semiseg.knowledge import task_embedding
    vector, text = task_embedding("left_atrium", encoder="minilm")   # (d,) float32, cached on disk

Texts live in ``Resources/knowledge/<name>.txt`` (lines starting with ``#`` are provenance comments and are not
encoded) or in any file given by path.
"""
from .encoders import DEFAULT_ENCODER, TextEncoder, encoder_identity, load_encoder, resolve_encoder_path
from .texts import KnowledgeError, available_knowledge, knowledge_dir, read_knowledge, resolve_knowledge
from .cache import TextEmbeddingCache, default_cache_dir, task_embedding

__all__ = ["DEFAULT_ENCODER", "TextEncoder", "encoder_identity", "load_encoder", "resolve_encoder_path",
           "KnowledgeError", "available_knowledge", "knowledge_dir", "read_knowledge", "resolve_knowledge",
           "TextEmbeddingCache", "default_cache_dir", "task_embedding"]
