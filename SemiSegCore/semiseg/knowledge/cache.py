"""On-disk cache of text embeddings keyed by a hash of (text, encoder identity), so the encoder is loaded only the
first time a text is used (training, prediction, and Slicer all hit the cache afterwards)."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from .encoders import DEFAULT_ENCODER, encoder_identity, load_encoder
from .texts import read_knowledge


def default_cache_dir() -> Path:
    """``$SEMISEG_CACHE/text_embeddings``, default ``~/.cache/semiseg/text_embeddings``."""
    base = os.environ.get("SEMISEG_CACHE") or Path.home() / ".cache" / "semiseg"
    return Path(base) / "text_embeddings"


class TextEmbeddingCache:
    """Text embeddings on disk, one ``<key>.npy`` (and a ``.json`` naming text and encoder) per (text, encoder)."""

    def __init__(self, folder: str | Path | None = None):
        self.folder = Path(folder) if folder else default_cache_dir()

    @staticmethod
    def key(text: str, encoder_id: str) -> str:
        return hashlib.sha256(f"{encoder_id}\0{text}".encode("utf-8")).hexdigest()[:32]

    def get(self, text: str, encoder_id: str) -> np.ndarray | None:
        path = self.folder / f"{self.key(text, encoder_id)}.npy"
        return np.load(path) if path.is_file() else None

    def put(self, text: str, encoder_id: str, vector: np.ndarray, encoder_spec: str = "") -> Path:
        from ..utils import atomic_write_text

        self.folder.mkdir(parents=True, exist_ok=True)
        key = self.key(text, encoder_id)
        tmp = self.folder / f".tmp-{key}-{os.getpid()}.npy"
        np.save(tmp, np.asarray(vector, dtype=np.float32))
        os.replace(tmp, self.folder / f"{key}.npy")
        atomic_write_text(self.folder / f"{key}.json", json.dumps(
            {"encoder": encoder_spec, "encoder_id": encoder_id, "dim": int(vector.shape[-1]), "text": text}, indent=1))
        return self.folder / f"{key}.npy"

    def embed(self, text: str, encoder_spec: str = DEFAULT_ENCODER) -> np.ndarray:
        """The cached embedding of ``text``, computing (and storing) it on a miss."""
        enc_id = encoder_identity(encoder_spec)
        vector = self.get(text, enc_id)
        if vector is None:
            vector = load_encoder(encoder_spec).encode([text])[0]
            self.put(text, enc_id, vector, encoder_spec)
        return vector


def task_embedding(knowledge: str, encoder: str = DEFAULT_ENCODER,
                   cache_dir: str | Path | None = None) -> tuple[np.ndarray, str]:
    """(vector (d,), text) for a knowledge name or file."""
    text = read_knowledge(knowledge)
    return TextEmbeddingCache(cache_dir).embed(text, encoder), text
