"""SAM-Mix (arXiv 2412.08575): a slice classifier whose activation maps prompt a LoRA-adapted SAM.

Two branches trained jointly on 2D slices (3D volumes are cut along ``train.slice_axis``; 2D images are one slice):

- **Classifier** (does the slice contain structure k?): FC (``cls_hidden``, 256) -> ReLU -> Dropout 0.3 -> FC (K-1)
  on the SAM image embedding, trained with a binary focal loss on image-level labels of every training slice. With
  ``cls_pooling: features`` (ADA-SAM) it reads the averaged embedding and its Grad-CAM is the activation map; with
  ``scores`` it scores every position and the score map is. The map, min-max scaled and thresholded
  (``cam_threshold``), gives a box around the largest component. With ``box_source: mask_head`` the boxes come
  instead from a small convolutional head on the embedding trained on the labelled slices' masks (``BoxHead``; not
  in the paper); presence stays the classifier's.
- **SAM** (LiteMedSAM by default, from :mod:`semiseg.sam`): mask decoder fine-tuned, image encoder frozen with
  LoRA adapters (``lora_rank`` on the attention ``qkv`` / ``proj`` layers). Dice + BCE on the few labelled slices
  (``labelled_slices``, drawn reproducibly from the labelled cases' foreground slices; no other pixel label is read).
  Slices reach SAM as in the pseudo-labelling engine: per-slice min-max to uint8, then the backend's own
  preprocessing, encoder and decoder (:mod:`semiseg.sam.backends`); a frozen encoder's embeddings are kept in a
  :class:`semiseg.sam.SliceEmbeddingCache` shared by the runs of one process.

Inference never looks at a reference: for each slice and structure the classifier decides presence
(``cls_threshold``, or in a volume optionally the volume's own threshold, ``presence_relative``; in a volume the
slices found are made one run per structure, ``presence_gap``), the activation map gives the box (and, with
``mask_prompt``, a dense prompt), and the decoder gives the mask. Structures a slice lacks get a fixed negative
logit.

Choices where the paper is silent (see seeds.md section 4): the classifier sits on the SAM embedding as in the
authors' ADA-SAM (not a separate ResNet-38), Grad-CAM is computed in closed form for that head
(:meth:`SliceClassifier.grad_cam`), threshold 0.4, single-mask output (LiteMedSAM's training mode), fallback box
the central half of the slice, focal alpha 0.5 / gamma 2, prompt encoder frozen, training prompts of labelled
slices a 50/50 mix of jittered reference boxes and the model's own boxes (``train_prompt``).

Two baselines share the slice selection and input transform (``variant``): ``frozen_sam`` (classifier trained,
SAM not fine-tuned: CAM boxes into the base SAM) and ``unet`` (a 2D U-Net trained on the same labelled slices).
Only the trainable parts are checkpointed (adapters, decoder, classifier); the base SAM comes from its package.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ConfigError
from ..data.sampling import Batch
from ..losses import binary_focal_loss, dice_bce_loss, dice_ce_loss
from ..models.slice_classifier import POOLINGS, SliceClassifier
from ..sam.backends import Embedding, crop_to_slice, input_frame, resized_size
from ..sam.engine import SliceEmbeddingCache, content_key
from .base import Method


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"config key 'sam_mix.{key}' {message}")


NEGATIVE_LOGIT = -20.0
"""Mask logit of a structure the classifier says is absent from a slice."""

BOX_HEAD_THRESHOLD = 0.5
"""The box head's box surrounds the largest component where its probability is at least this (or at least half its
maximum, where no position reaches it)."""


class BoxHead(nn.Module):
    """Where each structure lies on the SAM embedding grid (B, K, h, w logits): two 3x3 convolutions (64 channels,
    ReLU), dropout, and a 1x1 convolution per structure. Trained on the labelled slices' masks pooled to the grid;
    only its boxes are used (``box_source: mask_head``)."""

    def __init__(self, channels: int, num_structures: int, hidden: int = 64, dropout: float = 0.3):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(channels, hidden, 3, padding=1), nn.ReLU(),
                                      nn.Conv2d(hidden, hidden, 3, padding=1), nn.ReLU())
        self.drop = nn.Dropout2d(dropout)
        self.out = nn.Conv2d(hidden, num_structures, 1)

    def forward(self, emb: torch.Tensor, dropout: bool = True) -> torch.Tensor:
        h = self.features(emb)
        return self.out(self.drop(h) if dropout else h)


@dataclass
class SamMixParams:
    variant: str = "sam_mix"
    """sam_mix | frozen_sam (baseline: SAM with CAM boxes, no fine-tuning) | unet (baseline: 2D U-Net, same slices)."""
    backend: str = "litemedsam"
    """SAM backend (litemedsam | sam): its networks and input geometry are used."""
    checkpoint: Optional[str] = None
    model_type: str = "vit_b"
    labelled_slices: int = 50
    """Slices with pixel labels, drawn (seed ``data.seed``) from the labelled cases' foreground slices."""
    image_level_from: str = "all"
    """Slices whose image-level labels train the classifier: all (labelled + unlabelled training cases; the
    protocol of the paper) or labelled (the labelled cases only)."""
    lora_rank: int = 8
    """0: no adapters (encoder frozen; its embeddings are then cached)."""
    lora_alpha: float = 8.0
    lora_targets: list = field(default_factory=lambda: ["qkv", "proj"])
    lora_init: Optional[str] = None
    """A file from ``SamMix.save_adapters`` to start from."""
    cls_batch: int = 4
    seg_batch: int = 2
    cls_weight: float = 1.0
    cls_lr_scale: float = 10.0
    """The classifier's learning rate as a multiple of ``train.lr``. The classifier learns from scratch while SAM's
    decoder is fine-tuned at ``train.lr`` (1e-4): at that rate it underfits its own training slices (LA, 2000
    iterations: 82% of them classified right, presence probabilities 0.5 to 0.63)."""
    cls_pooling: str = "features"
    """features: the classifier's MLP reads the averaged embedding and its Grad-CAM gives the boxes (ADA-SAM's
    head); scores: the MLP scores every embedding position, the logit pools the scores (log-mean-exp) and the score
    map gives the boxes (see ``SliceClassifier``)."""
    cls_hidden: int = 256
    """Width of the classifier's hidden layer (256 in ADA-SAM's head)."""
    seg_weight: float = 1.0
    focal_alpha: float = 0.5
    focal_gamma: float = 2.0
    cam_threshold: float = 0.4
    cls_threshold: float = 0.5
    presence_gap: int = 2
    """In a volume, the slices where a structure is found are made one run (a structure such as an organ or a heart
    chamber spans contiguous slices): runs of found slices separated by at most this many slices are joined, gaps
    included, and only the run with the most found slices is kept. -1: each slice decides on its own."""
    presence_relative: Optional[float] = None
    """In a volume, a slice holds a structure where its probability is at least lo + presence_relative * (hi - lo),
    lo and hi the 10th and 90th percentiles of that structure's probabilities over the volume's slices (and only if
    some slice passes ``cls_threshold``), instead of ``cls_threshold``. The classifier's probabilities shift from
    volume to volume (LA: slices without atrium at 0.2-0.3 in one volume, 0.6 in another); the range within a
    volume is steadier. null: ``cls_threshold`` alone."""
    box_source: str = "cam"
    """Where the boxes come from. cam: the classifier's activation map (the paper). mask_head: a small
    convolutional head on the SAM embedding (``BoxHead``), trained with BCE on the labelled slices' masks pooled to
    the embedding grid; its probability map (>= 0.5, else >= half its maximum) gives the box. On LA, with the same
    cached embeddings, its boxes overlap the reference boxes more than the scoring head's CAM boxes (IoU 0.63 vs
    0.45 on 2 validation volumes, 0.56 vs 0.37 on 4 volumes outside the run's splits), but on the test volumes of
    two seeds SAM-Mix scored no better with them (0.643 / 0.563 against 0.647 / 0.621; docs/benchmarks.md), so it
    stays opt-in. Presence stays the classifier's."""
    mask_prompt: bool = False
    """Also feed the thresholded activation map (CAM or box head) to the decoder as a dense prompt."""
    train_prompt: str = "mix"
    """Prompts of labelled slices in training: gt (jittered reference box) | cam | mix (each with probability 0.5)."""
    box_jitter: float = 0.1
    """Reference boxes move each side by up to this fraction of the box size."""
    embedding_cache: int = 512
    """Embeddings kept in memory (only with a frozen encoder); shared by the runs of one process."""
    embedding_dir: str | None = None
    """A folder that also keeps every frozen-encoder embedding on disk (4 MB per slice, keyed by the backend and
    the slice's content), so that runs on the same slices (seeds, variants, validation, test) encode each once."""


# ---------------------------------------------------------------------------------------------------- prompts

def box_from_cam(cam: np.ndarray, threshold: float, scale: float, limit: tuple[int, int]) -> np.ndarray:
    """Box (x0, y0, x1, y1) in the SAM input frame around the largest component of ``cam >= threshold``.

    ``scale`` maps CAM pixels to input pixels; the box is clipped to ``limit`` = (h, w) of the unpadded slice.
    A flat CAM gives the central half of the slice (the ADA-SAM fallback)."""
    from ..sam.prompts import prompt_from_cam

    h, w = limit
    prompt = prompt_from_cam(cam, threshold)
    if prompt is None:
        return np.array([w / 4, h / 4, 3 * w / 4, 3 * h / 4], dtype=np.float32)
    x0, y0, x1, y1 = prompt.box
    box = np.array([x0 * scale, y0 * scale, (x1 + 1) * scale - 1, (y1 + 1) * scale - 1], dtype=np.float32)
    return np.clip(box, 0, [w - 1, h - 1, w - 1, h - 1]).astype(np.float32)


def one_run(found: np.ndarray, gap: int) -> np.ndarray:
    """The slices (bool, along a volume) where a structure is kept: runs of ``found`` slices separated by at most
    ``gap`` slices joined (gaps filled), and only the joined run holding the most found slices kept."""
    idx = np.flatnonzero(found)
    if len(idx) == 0:
        return found.copy()
    breaks = np.flatnonzero(np.diff(idx) > gap + 1)
    starts, ends = np.r_[idx[0], idx[breaks + 1]], np.r_[idx[breaks], idx[-1]]
    best = int(np.argmax([found[a:b + 1].sum() for a, b in zip(starts, ends)]))
    out = np.zeros_like(found, dtype=bool)
    out[starts[best]:ends[best] + 1] = True
    return out


def volume_presence(prob: np.ndarray, threshold: float, relative: float | None, gap: int) -> np.ndarray:
    """Where each structure is found (N, K) from presence probabilities (N, K) of one volume's slices, in order:
    ``threshold``, or with ``relative`` the volume's own threshold lo + relative * (hi - lo) (lo, hi: the 10th and
    90th percentiles of the structure's probabilities) where some slice passes ``threshold``; then one run of slices
    per structure (``one_run`` with ``gap``; -1: none)."""
    found = prob >= threshold
    if relative is not None:
        lo, hi = np.percentile(prob, 10, axis=0), np.percentile(prob, 90, axis=0)
        found = (prob >= lo + relative * (hi - lo)) & found.any(0)
    if gap >= 0:
        found = np.stack([one_run(found[:, k], gap) for k in range(found.shape[1])], 1)
    return found


def box_from_mask(mask: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    return np.array([xs.min(), ys.min(), xs.max(), ys.max()], dtype=np.float32)


_EMBEDDINGS = SliceEmbeddingCache(SamMixParams.embedding_cache)
"""Frozen-encoder embeddings by slice content and backend, shared by the SamMix instances of one process."""


@dataclass
class SliceItem:
    """One training slice: its pixels as SAM takes them, its labels in the SAM input frame."""

    key: str  # case id and slice index
    pixels: torch.Tensor  # (C, H, W) uint8, C = 1 (grey) or 3
    size: tuple[int, int]  # (h, w) of the resized slice inside the padded S x S input frame
    present: torch.Tensor  # (K-1,) float, image-level labels
    label: torch.Tensor | None = None  # (S, S) long, only for the labelled slices


# ---------------------------------------------------------------------------------------------------- method

class SamMix(Method):
    name = "sam_mix"
    Params = SamMixParams
    inference_only_params = ("cls_threshold", "presence_gap", "presence_relative")
    whole_image_inference = True  # every variant resizes whole slices to SAM's input, in training as in inference

    @classmethod
    def params_from(cls, raw):
        p = super().params_from(raw)
        choices = {"variant": ("sam_mix", "frozen_sam", "unet"), "image_level_from": ("all", "labelled"),
                   "train_prompt": ("gt", "cam", "mix"), "backend": ("litemedsam", "sam"),
                   "box_source": ("cam", "mask_head")}
        for key, allowed in choices.items():
            _check(getattr(p, key) in allowed, key, f"must be one of {', '.join(allowed)}, got '{getattr(p, key)}'")
        _check(p.box_source == "cam" or p.variant == "sam_mix", "box_source",
               f"mask_head learns from the labelled slices, which only the sam_mix variant trains on (variant "
               f"'{p.variant}')")
        _check(p.presence_gap >= -1, "presence_gap", f"must be >= -1 (-1: off), got {p.presence_gap}")
        _check(p.cls_pooling in POOLINGS, "cls_pooling",
               f"must be one of {', '.join(POOLINGS)}, got '{p.cls_pooling}'")
        _check(p.presence_relative is None or 0 <= p.presence_relative <= 1, "presence_relative",
               f"must be in [0, 1] or null, got {p.presence_relative}")
        _check(p.cls_lr_scale > 0, "cls_lr_scale", f"must be > 0, got {p.cls_lr_scale}")
        for key in ("labelled_slices", "cls_batch", "seg_batch", "cls_hidden"):
            _check(getattr(p, key) >= 1, key, f"must be >= 1, got {getattr(p, key)}")
        _check(p.lora_rank >= 0, "lora_rank", f"must be >= 0, got {p.lora_rank}")
        for key in ("cam_threshold", "cls_threshold", "focal_alpha"):
            _check(0 <= getattr(p, key) <= 1, key, f"must be in [0, 1], got {getattr(p, key)}")
        return p

    def __init__(self, cfg, device):
        super().__init__(cfg, device)
        p = self.params
        self.k = cfg.data.num_classes - 1
        self.needs_unlabelled = p.image_level_from == "all" and p.variant != "unet"
        self.rng = np.random.default_rng(cfg.train.seed)
        self.cls_items: list[SliceItem] = []
        self.seg_items: list[SliceItem] = []
        self.sam = self.backend = self.box_head = None
        if p.variant == "unet":
            from ..sam.backends import LiteMedSAMBackend

            self.input_size = LiteMedSAMBackend.input_size  # the U-Net sees [0, 1] pixels in LiteMedSAM's frame
            self.unet = self.build_network(name="unet2d", in_channels=3)
            self._frozen: set[str] = set()
            return
        from ..sam import build_backend

        # the encoder as trained (BatchNorms kept): LoRA may adapt it, and train() keeps its frozen parts in eval mode
        self.backend = build_backend(p.backend, p.checkpoint, device=device, model_type=p.model_type,
                                     fold_batchnorm=False)
        self.input_size = self.backend.input_size
        self.sam = self.backend.model
        for q in self.sam.parameters():
            q.requires_grad_(False)
        self.encoder_trains = p.variant == "sam_mix" and p.lora_rank > 0
        if self.encoder_trains:
            from ..models.lora import add_lora, load_lora

            add_lora(self.sam.image_encoder, p.lora_rank, p.lora_alpha, p.lora_targets)
            if p.lora_init:
                load_lora(self, p.lora_init)
        if p.variant == "sam_mix":
            for q in self.sam.mask_decoder.parameters():
                q.requires_grad_(True)
        _EMBEDDINGS.max_items = p.embedding_cache
        if p.embedding_dir and not self.backend.checkpoint_sha256:
            raise ConfigError(f"sam_mix.embedding_dir: the {p.backend} backend's weights have no checksum, so "
                              "embeddings on disk could not be told apart from another network's")
        _EMBEDDINGS.directory = Path(p.embedding_dir) if p.embedding_dir else None
        with torch.no_grad():
            channels = self.backend.encode(torch.zeros(1, 3, self.input_size, self.input_size, device=device))
        self.emb_size = channels.shape[-1]
        self.classifier = SliceClassifier(channels.shape[1], self.k, hidden=p.cls_hidden, pooling=p.cls_pooling)
        if p.box_source == "mask_head":
            self.box_head = BoxHead(channels.shape[1], self.k)
        trainable = {n for n, q in self.named_parameters() if q.requires_grad}
        self._frozen = {n for n in super().state_dict() if n.startswith("sam.") and n not in trainable}
        self.train(self.training)

    def train(self, mode: bool = True):
        """Train mode for what trains; the frozen SAM parts always stay in eval mode.

        LiteMedSAM's TinyViT encoder has 27 BatchNorm layers: in train mode they would normalise with batch
        statistics and drift their running statistics, which are frozen buffers left out of checkpoints, so in-run
        validation and a reloaded run (``semiseg predict``) would see different embeddings (measured: 84% relative
        norm between train- and eval-mode embeddings of LA slices). The encoder (with or without LoRA adapters,
        which are plain linear updates) and the prompt encoder are therefore always in eval mode; the mask decoder
        (no BatchNorm) follows ``mode`` when it trains."""
        super().train(mode)
        if self.sam is not None:
            self.sam.eval()
            if mode and self.params.variant == "sam_mix":
                self.sam.mask_decoder.train()
        return self

    # -- checkpoints: only what trains; the base SAM is rebuilt from its checkpoint ------------------------------
    def state_dict(self, *args, destination=None, prefix="", keep_vars=False):
        full = super().state_dict(destination=destination, prefix=prefix, keep_vars=keep_vars)
        for name in self._frozen:
            full.pop(prefix + name, None)
        return full

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        result = super().load_state_dict(state_dict, strict=False, assign=assign)
        missing = [k for k in result.missing_keys if k not in self._frozen]
        if strict and (missing or result.unexpected_keys):
            raise RuntimeError(f"SAM-Mix checkpoint does not fit this configuration: missing {missing[:3]}, "
                               f"unexpected {result.unexpected_keys[:3]} (other variant or lora_rank?)")
        return result

    def get_extra_state(self):
        return {"rng": self.rng.bit_generator.state}

    def set_extra_state(self, state):
        self.rng.bit_generator.state = state["rng"]

    def save_adapters(self, path) -> None:
        """The LoRA adapters alone, with the hash of the base checkpoint they belong to."""
        from ..models.lora import save_lora

        save_lora(self, path, base=self.backend.describe())

    # -- slices through the SAM backend --------------------------------------------------------------------------
    @staticmethod
    def to_uint8(x: torch.Tensor) -> torch.Tensor:
        """Slices (B, C, H, W), any intensities, as uint8 pixels: per-slice min-max to [0, 255]."""
        lo = x.flatten(1).min(1).values.view(-1, 1, 1, 1)
        hi = x.flatten(1).max(1).values.view(-1, 1, 1, 1)
        return ((x - lo) / (hi - lo).clamp_min(1e-6) * 255.0).round().clamp(0, 255).to(torch.uint8)

    def label_to_input(self, label: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """A (H, W) label map in the input frame (nearest-neighbour resize to ``size``, zero padding)."""
        lab = F.interpolate(label[None, None].float(), size=size, mode="nearest")[0, 0]
        return F.pad(lab, (0, self.input_size - size[1], 0, self.input_size - size[0])).long()

    def embed(self, pixels) -> torch.Tensor:
        """Image embeddings (B, 256, h, w) of uint8 slices (C, H, W), by the backend's preprocessing and encoder;
        kept in the process's cache (keyed as the SAM engine keys it) when the encoder does not train."""
        if self.encoder_trains:
            return self.backend.encode(self.backend.preprocess(pixels)[0])
        keys = [self.backend.key + content_key(p.cpu().numpy()) for p in pixels]
        found = [_EMBEDDINGS.get(k) for k in keys]
        todo = [i for i, e in enumerate(found) if e is None]
        for start in range(0, len(todo), 16):  # 16 slices through the encoder at a time
            chunk = todo[start:start + 16]
            batch, sizes = self.backend.preprocess([pixels[i] for i in chunk])
            with torch.no_grad():
                features = self.backend.encode(batch)
            for j, i in enumerate(chunk):
                found[i] = Embedding(features[j:j + 1], *sizes[j])
                _EMBEDDINGS.put(keys[i], found[i])
        return torch.cat([e.features.to(self.device) for e in found])

    def own_boxes(self, emb: torch.Tensor, sizes: list[tuple[int, int]]) -> tuple[np.ndarray, torch.Tensor]:
        """The model's own boxes (B, K, 4) in the input frame and the maps (B, K, h, w) they come from, thresholded
        at the map's threshold: the classifier's activation maps (``cam_threshold``) or the box head's
        probabilities (``box_source``)."""
        if self.box_head is None:
            maps = self.classifier.activation_maps(emb.detach())
            thresholds = np.full(maps.shape[:2], self.params.cam_threshold)
        else:
            with torch.no_grad():
                maps = torch.sigmoid(self.box_head(emb.detach(), dropout=False))
            thresholds = np.minimum(BOX_HEAD_THRESHOLD, maps.flatten(2).max(-1).values.cpu().numpy() / 2)
        scale = self.input_size / maps.shape[-1]
        arr = maps.cpu().numpy()
        boxes = np.stack([np.stack([box_from_cam(arr[b, k], thresholds[b, k], scale, sizes[b])
                                    for k in range(self.k)]) for b in range(len(arr))])
        return boxes, (maps >= torch.from_numpy(thresholds).to(maps)[..., None, None]).to(maps.dtype)

    def decode(self, emb: torch.Tensor, boxes: torch.Tensor, cams: torch.Tensor | None) -> torch.Tensor:
        """Mask logits (N, S, S) in the input frame for N boxes (input-frame pixels) on one embedding (1, C, h, w),
        single-mask output; ``cams`` (N, h, w), the thresholded maps from ``own_boxes`` (0/1), are also given as
        dense prompts, or None."""
        dense = None
        if cams is not None:
            dense = self.backend.dense_prompt(cams[:, None] > 0, emb)
        logits, _ = self.backend.decode_logits(emb, boxes=boxes, masks=dense, multimask=False)
        return logits[:, 0]

    # -- training data: built once from the run's cases ----------------------------------------------------------
    def setup(self, ctx) -> None:
        self.build_slices(ctx)

    def streams(self, ctx) -> dict:
        return {}  # batches are drawn from the slice sets

    def _slices(self, image: np.ndarray, label: np.ndarray | None, axis: int):
        """(index, (C, H, W) image, (H, W) label) for each slice of a case (a 2D case is one slice)."""
        if image.ndim == 3:
            yield 0, image, label
            return
        for i in range(image.shape[axis + 1]):
            yield i, np.take(image, i, axis=axis + 1), None if label is None else np.take(label, i, axis=axis)

    def _item(self, case_id: str, index: int, image: np.ndarray, label: np.ndarray | None) -> SliceItem:
        pixels = self.to_uint8(torch.from_numpy(np.ascontiguousarray(image))[None].float())[0]
        present = torch.tensor([bool((label == k).any()) for k in range(1, self.k + 1)], dtype=torch.float32)
        return SliceItem(f"{case_id}:{index}", pixels, resized_size(*image.shape[-2:], self.input_size), present)

    def build_slices(self, ctx) -> None:
        """The labelled slices (pixel labels) and the classifier's slices (image-level labels)."""
        from ..io import read_label

        axis = self.cfg.train.slice_axis
        foreground = []
        for case in ctx.labelled:
            ax = axis % max(case.image.ndim - 1, 1)
            for i, img, lab in self._slices(case.image, case.label, ax):
                item = self._item(case.id, i, img, lab)
                self.cls_items.append(item)
                if lab.any():
                    foreground.append((item, lab))
        if not foreground:
            raise ValueError("SAM-Mix: the labelled cases have no foreground slice")
        pick = np.random.default_rng(self.cfg.data.seed).permutation(len(foreground))[: self.params.labelled_slices]
        for j in sorted(pick):
            item, lab = foreground[j]
            item.label = self.label_to_input(torch.from_numpy(lab.astype(np.int64)), item.size)
            self.seg_items.append(item)
        if self.needs_unlabelled:  # image-level labels only: each slice's label is reduced to presence flags
            refs = {c.id: c.reference for c in ctx.manifest.unlabelled}
            for case in ctx.unlabelled:
                if not refs.get(case.id):
                    continue
                ref = np.asarray(read_label(refs[case.id]).array)
                ax = axis % max(case.image.ndim - 1, 1)
                for i, img, lab in self._slices(case.image, ref, ax):
                    self.cls_items.append(self._item(case.id, i, img, lab))
        ctx.log.write(event="sam_mix_slices", labelled_slices=[it.key for it in self.seg_items],
                      classifier_slices=len(self.cls_items), variant=self.params.variant)

    # -- training ----------------------------------------------------------------------------------------------
    def _draw(self, items: list[SliceItem], n: int) -> list[SliceItem]:
        return [items[i] for i in self.rng.integers(0, len(items), size=n)]

    def training_step(self, batches: dict[str, Batch], step: int) -> dict[str, torch.Tensor]:
        if not self.seg_items:
            raise RuntimeError("SAM-Mix trains through the trainer (its setup builds the slice sets)")
        p = self.params
        seg = self._draw(self.seg_items, p.seg_batch)
        seg_labels = torch.stack([it.label for it in seg]).to(self.device)
        if p.variant == "unet":
            pixels = input_frame([it.pixels for it in seg], self.input_size, device=self.device)[0]
            loss = dice_ce_loss(self.unet(pixels), seg_labels)
            return {"loss": loss, "seg": loss.detach()}
        cls = self._draw(self.cls_items, p.cls_batch)
        items = cls + (seg if p.variant == "sam_mix" else [])
        emb = self.embed([it.pixels for it in items])
        present = torch.stack([it.present for it in items]).to(self.device)
        cls_loss = binary_focal_loss(self.classifier(emb), present, p.focal_alpha, p.focal_gamma)
        out = {"cls": cls_loss.detach()}
        loss = p.cls_weight * cls_loss
        if p.variant == "sam_mix":
            seg_loss = self._seg_loss(emb[len(cls):], seg, seg_labels)
            loss = loss + p.seg_weight * seg_loss
            out["seg"] = seg_loss.detach()
        if self.box_head is not None:
            box_loss = self._box_head_loss(emb[len(cls):], seg_labels)
            loss = loss + box_loss
            out["box"] = box_loss.detach()
        out["loss"] = loss
        return out

    def _box_head_loss(self, emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """BCE of the box head on labelled slices against each structure's share of every embedding cell (the
        input-frame mask averaged over the cell)."""
        cell = self.input_size // emb.shape[-1]
        masks = torch.stack([labels == k + 1 for k in range(self.k)], 1).float()
        return F.binary_cross_entropy_with_logits(self.box_head(emb.detach()), F.avg_pool2d(masks, cell))

    def _seg_loss(self, emb: torch.Tensor, items: list[SliceItem], labels: torch.Tensor) -> torch.Tensor:
        p = self.params
        own, cams = self.own_boxes(emb, [it.size for it in items])
        losses = []
        for b, it in enumerate(items):
            lab = labels[b].cpu().numpy()
            ks = [k for k in range(self.k) if (lab == k + 1).any()]
            boxes = []
            for k in ks:
                use_gt = p.train_prompt == "gt" or (p.train_prompt == "mix" and self.rng.random() < 0.5)
                if use_gt:
                    box = box_from_mask(lab == k + 1)
                    span = np.array([box[2] - box[0], box[3] - box[1]] * 2) + 1
                    box = box + self.rng.uniform(-1, 1, 4) * p.box_jitter * span
                    box = np.clip(np.minimum(box, [box[2], box[3], 1e9, 1e9]), 0, self.input_size - 1)
                else:
                    box = own[b, k]
                boxes.append(box)
            box_t = torch.tensor(np.stack(boxes), dtype=torch.float32, device=self.device)
            logits = self.decode(emb[b:b + 1], box_t, cams[b, ks] if p.mask_prompt else None)
            targets = torch.stack([labels[b] == k + 1 for k in ks])
            losses.append(dice_bce_loss(logits, targets))
        return torch.stack(losses).mean()

    # -- inference ---------------------------------------------------------------------------------------------
    def predict_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, K, H, W) for slices (B, C, H, W): background 0, structure k its mask logit, or
        ``NEGATIVE_LOGIT`` where the classifier finds it absent. Prompts come from the model's own CAMs."""
        return self.slice_logits(x)

    def predict_volume_slices(self, x: torch.Tensor) -> torch.Tensor:
        """``predict_logits`` for the slices (N, C, H, W) of one volume, in order: each structure is kept in one run
        of slices (``presence_gap``; ``infer.Predictor`` calls this for a volume)."""
        return self.slice_logits(x, one_volume=True)

    def slice_logits(self, x: torch.Tensor, present: torch.Tensor | None = None,
                     boxes: np.ndarray | None = None, one_volume: bool = False) -> torch.Tensor:
        """``predict_logits`` with prompts that may come from elsewhere: ``present`` (B, K-1) bool replaces the
        classifier's verdicts, ``boxes`` (B, K-1, 4, input frame) the model's own boxes (``prompt_sources`` uses the
        reference's to measure how much of the error each prompt causes). With ``one_volume`` the slices are one
        volume's, in order, and the classifier's verdicts are made one run per structure."""
        h, w = x.shape[-2:]
        pixels = self.to_uint8(x.float())
        size = resized_size(h, w, self.input_size)
        s = self.input_size
        if self.params.variant == "unet":
            logits = torch.cat([self.unet(input_frame(pixels[i:i + 32], s, device=self.device)[0])
                                for i in range(0, len(pixels), 32)])
            return crop_to_slice(logits, (h, w), size)
        emb = self.embed(pixels)
        if present is None:
            prob = torch.sigmoid(self.classifier(emb)).cpu().numpy()
            p = self.params
            present = torch.from_numpy(volume_presence(prob, p.cls_threshold, p.presence_relative, p.presence_gap)
                                       if one_volume else prob >= p.cls_threshold)
        own, cams = self.own_boxes(emb, [size] * len(x))
        boxes = own if boxes is None else boxes
        masks = torch.full((len(x), self.k, s, s), NEGATIVE_LOGIT, device=x.device)
        for b in range(len(x)):
            ks = [k for k in range(self.k) if present[b, k]]
            if ks:
                box_t = torch.tensor(boxes[b, ks], dtype=torch.float32, device=self.device)
                masks[b, ks] = self.decode(emb[b:b + 1], box_t, cams[b, ks] if self.params.mask_prompt
                                           else None).to(masks.dtype)
        logits = torch.cat([torch.zeros_like(masks[:, :1]), masks], 1)
        return crop_to_slice(logits, (h, w), size)

    def parameter_groups(self) -> list[dict]:
        """What trains; the classifier (and the box head) in a group of their own at ``cls_lr_scale`` times the
        learning rate: both learn from scratch while the decoder is fine-tuned."""
        if self.params.variant == "unet":
            return super().parameter_groups()
        heads = ("classifier.", "box_head.")
        rest = [q for n, q in self.named_parameters() if q.requires_grad and not n.startswith(heads)]
        groups = [{"params": rest}] if rest else []
        own = [q for n, q in self.named_parameters() if n.startswith(heads)]
        return groups + [{"params": own, "lr_scale": self.params.cls_lr_scale}]


# ---------------------------------------------------------------------------------------------------- diagnosis

PROMPT_SOURCES = {
    "model": "the model's own classifier verdicts and CAM boxes (as it predicts)",
    "true_presence": "reference presence per slice, the model's CAM boxes",
    "true_boxes": "reference presence and reference boxes (the decoder's upper bound)",
}


def prompt_sources(method: SamMix, cases) -> list[dict]:
    """Where a SAM-Mix model's error comes from: each loaded case (``LoadedCase``, with its label) segmented slice
    by slice with each of ``PROMPT_SOURCES``, scored on the working grid (argmax and the configured clean-up, as
    ``semiseg predict``). One row per case: ``case`` and the mean Dice over structures for each source."""
    from ..evaluate import labels_from
    from ..metrics import dice_score

    if method.params.variant == "unet":
        raise ValueError("prompt_sources needs a SAM variant (sam_mix or frozen_sam), not the unet baseline")
    method.eval()
    rows = []
    for case in cases:
        if case.label is None:
            raise ValueError(f"case {case.id}: prompt_sources needs its reference label")
        axis = method.cfg.train.slice_axis % (case.image.ndim - 1)
        x = torch.from_numpy(np.ascontiguousarray(np.moveaxis(case.image, axis + 1, 0))).to(method.device)
        labels = torch.from_numpy(np.moveaxis(case.label, axis, 0).astype(np.int64))  # (N, H, W)
        size = resized_size(*x.shape[-2:], method.input_size)
        present = torch.stack([(labels == k + 1).flatten(1).any(1) for k in range(method.k)], 1)
        boxes = np.zeros((len(x), method.k, 4), dtype=np.float32)
        for b, k in zip(*np.nonzero(present.numpy())):
            boxes[b, k] = box_from_mask(method.label_to_input(labels[b], size).numpy() == k + 1)
        prompts = {"model": {"one_volume": True}, "true_presence": {"present": present},
                   "true_boxes": {"present": present, "boxes": boxes}}
        row = {"case": case.id}
        structures = [k for k in range(1, method.k + 1) if (case.label == k).any()]
        for source, given in prompts.items():
            with torch.no_grad():
                probs = torch.softmax(method.slice_logits(x, **given), 1).cpu().numpy()
            pred = labels_from(np.moveaxis(probs, 0, axis + 1), method.cfg)
            row[source] = float(np.mean([dice_score(pred == k, case.label == k) for k in structures]))
        rows.append(row)
    return rows
