"""The SAM pseudo-labelling engine: one place for caching, batching, slicing of 3D volumes and provenance.

For every backend: intensities are mapped to RGB uint8 slices, only slices with a prompt are embedded (in batches,
through a bounded LRU cache keyed by the slice's content hash), all prompts of a slice are decoded against its one
embedding, and the masks are painted back into a label map on the image's grid. Where two prompts of a slice
claim the same pixel, the one with the higher predicted IoU wins.
"""
from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..io import Image, label_path, write_label
from .backends import Embedding, SamBackend
from .prompts import Prompt, prompt_from_probability, prompts_from_mask, slice_prompts

PromptsBySlice = dict[int, list[Prompt]]


# ---------------------------------------------------------------------------------------------------- intensities

def to_uint8(image: Image, intensity: str = "auto") -> np.ndarray:
    """The image's intensities as uint8 in [0, 255] (same shape; RGB images keep their channel axis).

    intensity: "auto" (RGB and uint8 images pass through, others: percentile), "percentile[:lo,hi]" (clip to the
    given percentiles, default 0.5 and 99.5, over the whole image, then scale), "window:center,width" (CT
    window/level), "minmax". A whole volume is scaled at once so that its slices stay comparable.
    """
    arr = np.asarray(image.array)
    mode, _, args = intensity.partition(":")
    if mode == "auto":
        if image.channels == 3 or arr.dtype == np.uint8:
            return np.clip(arr, 0, 255).astype(np.uint8)
        mode, args = "percentile", ""
    if mode == "rgb":
        return np.clip(arr, 0, 255).astype(np.uint8)
    arr = arr.astype(np.float32)
    try:
        values = [float(v) for v in args.split(",")] if args else []
    except ValueError:
        values = None
    if mode == "percentile" and values is not None and len(values) in (0, 2):
        lo, hi = np.percentile(arr, values or [0.5, 99.5])
    elif mode == "window" and values is not None and len(values) == 2:
        lo, hi = values[0] - values[1] / 2, values[0] + values[1] / 2
    elif mode == "minmax" and not values:
        lo, hi = float(arr.min()), float(arr.max())
    else:
        raise ValueError(f"intensity '{intensity}' not understood (auto, rgb, percentile[:lo,hi], "
                         f"window:center,width, minmax)")
    scaled = (np.clip(arr, lo, hi) - lo) / max(float(hi - lo), 1e-6) * 255.0
    return np.rint(scaled).astype(np.uint8)


def rgb_slice(u8: np.ndarray, channels: int, axis: int, k: int) -> np.ndarray:
    """Slice ``k`` along ``axis`` of a uint8 image as an (H, W, 3) RGB array (grey replicated to 3 channels)."""
    if channels == 3:
        return u8  # a 2D colour image is its own only slice
    s = u8 if u8.ndim == 2 else np.take(u8, k, axis=axis)
    return np.repeat(s[:, :, None], 3, axis=2)


# ---------------------------------------------------------------------------------------------------- cache

def content_key(arr: np.ndarray) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(str((arr.shape, arr.dtype.str)).encode())
    h.update(np.ascontiguousarray(arr).data)
    return h.hexdigest()


class SliceEmbeddingCache:
    """Least-recently-used image-slice embeddings in memory, at most ``max_items``, keyed by slice content (and the
    backend). With a ``directory`` every embedding is also kept on disk, one file per key, so that runs sharing a
    frozen encoder (seeds, settings, validation and test) compute each slice once; they are read back onto
    ``device``. (Text embeddings are cached on disk by :class:`semiseg.knowledge.TextEmbeddingCache`.)"""

    def __init__(self, max_items: int = 32, directory: str | Path | None = None, device="cpu"):
        self.max_items = max_items
        self.directory = None if directory is None else Path(directory)
        self.device = device
        self._items: OrderedDict[str, Embedding] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def _file(self, key: str) -> Path:
        return self.directory / f"{hashlib.sha256(key.encode()).hexdigest()}.pt"

    def get(self, key: str) -> Embedding | None:
        item = self._items.get(key)
        if item is None and self.directory is not None and self._file(key).exists():
            import torch

            saved = torch.load(self._file(key), map_location=self.device, weights_only=True)
            item = Embedding(saved["features"], tuple(saved["original_size"]), tuple(saved["resized_size"]))
            self._remember(key, item)
        if item is None:
            self.misses += 1
            return None
        self._items.move_to_end(key)
        self.hits += 1
        return item

    def put(self, key: str, value: Embedding) -> None:
        if self.directory is not None and not self._file(key).exists():
            from ..utils import atomic_torch_save

            self.directory.mkdir(parents=True, exist_ok=True)
            # a float32 copy: a view would save its whole batch's storage, and float32 reads on any device
            features = value.features.detach().cpu().float().clone()
            atomic_torch_save({"features": features, "original_size": list(value.original_size),
                               "resized_size": list(value.resized_size)}, self._file(key))
        self._remember(key, value)

    def _remember(self, key: str, value: Embedding) -> None:
        if self.max_items <= 0:
            return
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self.max_items:
            self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)

    def clear(self) -> None:
        """Forget the embeddings held in memory (those on disk stay)."""
        self._items.clear()


# ---------------------------------------------------------------------------------------------------- results

@dataclass
class PseudoLabel:
    label: Image  # integer label map on the input image's grid
    score: float  # mean predicted IoU over all decoded prompts (0 when none)
    provenance: dict = field(default_factory=dict)

    def write(self, out_dir: str | Path, case_id: str, overwrite: bool = False) -> Path:
        """Write the label map where :func:`semiseg.io.label_path` puts it, its provenance beside it (both
        atomically; the mask last, so that its presence marks a finished case)."""
        path = label_path(out_dir, case_id, self.provenance.get("image"), self.label.spatial_ndim)
        return write_label(self.label, path, overwrite=overwrite, provenance=self.provenance)


@dataclass
class SliceTiming:
    embed_s: float = 0.0
    decode_s: float = 0.0
    embedded: int = 0
    decoded: int = 0


# ---------------------------------------------------------------------------------------------------- engine

class SamEngine:
    """Prompted segmentation of 2D images and 3D volumes (slice by slice) with any :class:`SamBackend`.

    batch_size: slices embedded per encoder call; None: 8 on a GPU, 1 on a CPU (on a 2-core CPU a batch of 4
    LiteMedSAM slices took longer per slice than single slices). cache_size: embeddings kept in memory (LRU);
    cache_dir: a folder where every embedding is also kept on disk (see :class:`SliceEmbeddingCache`). multimask:
    None uses the backend's default; True keeps the candidate with the highest predicted IoU.
    """

    def __init__(self, backend: SamBackend, batch_size: int | None = None, cache_size: int = 32,
                 multimask: bool | None = None, cache_dir: str | Path | None = None):
        self.backend = backend
        if batch_size is None:
            batch_size = 8 if backend.device.type == "cuda" else 1
        self.batch_size = max(1, int(batch_size))
        self.cache = SliceEmbeddingCache(cache_size, cache_dir, backend.device)
        self.multimask = multimask
        self.timing = SliceTiming()

    def embed_slices(self, slices: list[np.ndarray]) -> list[Embedding]:
        """Embeddings for RGB uint8 slices: cached ones reused, the others encoded ``batch_size`` at a time."""
        keys = [self.backend.key + content_key(s) for s in slices]
        out: list[Embedding | None] = [self.cache.get(k) for k in keys]
        todo: dict[str, list[int]] = {}
        for i, (k, e) in enumerate(zip(keys, out)):
            if e is None:
                todo.setdefault(k, []).append(i)  # identical slices are encoded once
        pending = list(todo.items())
        for start in range(0, len(pending), self.batch_size):
            chunk = pending[start:start + self.batch_size]
            t0 = time.perf_counter()
            embs = self.backend.embed([slices[idx[0]] for _, idx in chunk])
            self.timing.embed_s += time.perf_counter() - t0
            self.timing.embedded += len(chunk)
            for (k, idx), e in zip(chunk, embs):
                self.cache.put(k, e)
                for i in idx:
                    out[i] = e
        return out  # type: ignore[return-value]

    def decode(self, embedding: Embedding, prompts: list[Prompt]):
        t0 = time.perf_counter()
        masks, scores = self.backend.decode(embedding, prompts, self.multimask)
        self.timing.decode_s += time.perf_counter() - t0
        self.timing.decoded += len(prompts)
        return masks, scores

    def segment(self, image: Image, prompts: PromptsBySlice | list[Prompt], axis: int = 2,
                intensity: str = "auto", prompt_source: str = "") -> PseudoLabel:
        """Segment ``image`` from per-slice prompts ({slice index: [Prompt]}; a plain list for a 2D image).

        Slices without prompts are neither embedded nor decoded and stay background."""
        nd = image.spatial_ndim
        if nd not in (2, 3):
            raise ValueError(f"{image.path or 'image'}: SAM pseudo-labels need a 2D or 3D image, got {nd}D")
        if nd == 3 and image.channels != 1:
            raise ValueError(f"{image.path or 'image'}: multi-channel volumes are not supported")
        if nd == 3 and axis not in (0, 1, 2):
            raise ValueError(f"axis must be 0, 1 or 2 for a volume, got {axis}")
        if isinstance(prompts, list):
            prompts = {0: prompts} if prompts else {}
        n_slices = 1 if nd == 2 else image.spatial_shape[axis]
        bad = [k for k in prompts if not 0 <= k < n_slices]
        if bad:
            raise ValueError(f"{image.path or 'image'}: prompts for slices {bad[:5]} outside 0..{n_slices - 1}")
        u8 = to_uint8(image, intensity)
        out = np.zeros(image.spatial_shape, dtype=np.uint8)
        slice_records, all_scores = [], []
        ks = [k for k in sorted(prompts) if prompts[k]]
        for start in range(0, len(ks), self.batch_size):
            chunk = ks[start:start + self.batch_size]
            embs = self.embed_slices([rgb_slice(u8, image.channels, axis, k) for k in chunk])
            for k, emb in zip(chunk, embs):
                masks, scores = self.decode(emb, prompts[k])
                painted = _paint(masks, scores, [p.label for p in prompts[k]])
                if nd == 2:
                    out[...] = painted
                else:
                    idx = [slice(None)] * 3
                    idx[axis] = k
                    out[tuple(idx)] = painted
                all_scores.extend(scores.tolist())
                slice_records.append({"index": k, "prompts": [dict(p.to_json(), iou=round(float(s), 4))
                                                              for p, s in zip(prompts[k], scores)]})
        score = float(np.mean(all_scores)) if all_scores else 0.0
        prov = self.provenance(image, axis if nd == 3 else None, intensity, prompt_source)
        prov.update(score=round(score, 4), slices=slice_records)
        return PseudoLabel(image.with_array(out, path=None), score, prov)

    def provenance(self, image: Image, axis, intensity: str, prompt_source: str) -> dict:
        from .. import __version__

        multimask = self.backend.default_multimask if self.multimask is None else self.multimask
        return {"source": "sam", **self.backend.describe(), "multimask": multimask,
                "mask_choice": "highest predicted IoU" if multimask else "single-mask output",
                "image": image.path, "axis": axis, "intensity": intensity, "prompt_source": prompt_source,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "semiseg_version": __version__}


def _paint(masks: np.ndarray, scores: np.ndarray, labels: list[int]) -> np.ndarray:
    """One label map from several masks; higher-scoring masks are painted last so they win overlaps."""
    out = np.zeros(masks.shape[1:], dtype=np.uint8)
    for i in np.argsort(scores, kind="stable"):
        out[masks[i]] = labels[i]
    return out


# ---------------------------------------------------------------------------------------------------- high level

def pseudolabel_from_mask(engine: SamEngine, image: Image, mask: np.ndarray, axis: int = 2, padding: float = 5.0,
                          n_pos: int = 0, n_neg: int = 0, min_area: int = 1, intensity: str = "auto",
                          prompt_source: str = "mask") -> PseudoLabel:
    """Pseudo-label ``image`` with prompts drawn from a (reference or predicted) label map on its grid: per slice
    and label, the label's box (+ ``padding`` px) and optional interior/exterior points."""
    mask = np.asarray(mask)
    if mask.shape != image.spatial_shape:
        raise ValueError(f"{image.path or 'image'}: prompt mask shape {mask.shape} does not match the image "
                         f"{image.spatial_shape}")
    prompts = slice_prompts(mask, axis, lambda m: prompts_from_mask(m, padding=padding, n_pos=n_pos, n_neg=n_neg,
                                                                    min_area=min_area, source="mask"))
    return engine.segment(image, prompts, axis=axis, intensity=intensity, prompt_source=prompt_source)


def pseudolabel_from_probability(engine: SamEngine, image: Image, prob: np.ndarray, axis: int = 2,
                                 threshold: float = 0.5, confident: float = 0.9, n_pos: int = 0, n_neg: int = 0,
                                 padding: float = 5.0, min_area: int = 10, use_box: bool = True,
                                 intensity: str = "auto", prompt_source: str = "probability"):
    """Pseudo-label from a model's probabilities; returns ``(mask, score, provenance)``.

    prob: (num_classes, *spatial) class probabilities (class 0 background; every other class is prompted from its
    own map) or (*spatial) foreground probability (class 1). Per slice along ``axis`` (3D) or on the image (2D), each
    class gets the box of its largest component above ``threshold`` and ``n_pos`` positive points where prob >=
    ``confident`` (see :func:`prompt_from_probability`). mask: uint8 label map on the image grid; score: mean
    predicted IoU of the decoded prompts (0 when no class passed the threshold anywhere)."""
    prob = np.asarray(prob, dtype=np.float32)
    if prob.shape == image.spatial_shape:
        prob = np.stack([1 - prob, prob])
    if prob.shape[1:] != image.spatial_shape:
        raise ValueError(f"{image.path or 'image'}: probability shape {prob.shape} does not match the image "
                         f"{image.spatial_shape} (expected (classes, *spatial) or (*spatial))")
    prompts: PromptsBySlice = {}
    for c in range(1, prob.shape[0]):
        def make(p2d, c=c):
            pr = prompt_from_probability(p2d, threshold, confident, n_pos, n_neg, padding, min_area, label=c,
                                         use_box=use_box)
            return [pr] if pr is not None else []

        for k, ps in slice_prompts(prob[c], axis, make).items():
            prompts.setdefault(k, []).extend(ps)
    result = engine.segment(image, prompts, axis=axis, intensity=intensity, prompt_source=prompt_source)
    return result.label.array, result.score, result.provenance


def prompt_stability(engine: SamEngine, image: Image, mask: np.ndarray, slices: list[dict], axis: int = 2,
                     n: int = 4, jitter: float = 0.1, seed: int = 0, intensity: str = "auto") -> dict[tuple, float]:
    """How stable SAM's answer is under small changes of the prompt: for every boxed prompt of a segmentation's
    provenance records (``slices``, as :meth:`SamEngine.segment` writes them), decode ``n`` copies whose box corners
    move by up to ``jitter`` of the box size and return {(slice, label): mean IoU of those masks with ``mask``'s}.
    Only the decoder runs again (the slice embeddings are cached). A mask that falls apart when the box moves a
    little is a guess; one that stays put is what SAM sees in the image."""
    from .prompts import Prompt

    rng = np.random.default_rng(seed)
    u8 = to_uint8(image, intensity)
    nd = image.spatial_ndim
    out = {}
    for rec in slices:
        k = rec["index"]
        boxed = [p for p in rec["prompts"] if p.get("box")]
        if not boxed:
            continue
        emb = engine.embed_slices([rgb_slice(u8, image.channels, axis, k)])[0]
        base = mask if nd == 2 else np.take(mask, k, axis=axis)
        h, w = base.shape
        for p in boxed:
            x0, y0, x1, y1 = p["box"]
            size = np.array([x1 - x0, y1 - y0, x1 - x0, y1 - y0]) + 1
            prompts = []
            for _ in range(n):
                b = np.array([x0, y0, x1, y1]) + rng.uniform(-jitter, jitter, 4) * size
                b = np.clip(b, 0, [w - 1, h - 1, w - 1, h - 1])
                bx0, bx1 = sorted((b[0], b[2]))
                by0, by1 = sorted((b[1], b[3]))
                prompts.append(Prompt((bx0, by0, bx1, by1), p.get("points", []), p.get("point_labels", []),
                                      label=int(p["label"])))
            masks, _ = engine.decode(emb, prompts)
            ref = base == int(p["label"])
            ious = [np.logical_and(m, ref).sum() / max(np.logical_or(m, ref).sum(), 1) for m in masks]
            out[(k, int(p["label"]))] = float(np.mean(ious))
    return out
