"""Sliding-window inference and the predictor that runs a network on whole images."""
from __future__ import annotations

from itertools import combinations
from typing import Callable

import numpy as np
import torch

from .data.cases import to_channels_first
from .data.intensity import normalise
from .evaluate import labels_from
from .io import Image, ImageError
from .registry import size_multiple


def mean_probabilities(net: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, mirror: bool,
                       amp: bool = False) -> torch.Tensor:
    """Softmax of ``net`` on a batch (B, C, *spatial); with ``mirror`` the mean over the batch and its mirror images
    along every subset of the spatial axes, each mirrored back (2^d network passes)."""
    spatial_axes = list(range(2, x.ndim))
    flips = [list(axes) for n in range(len(spatial_axes) + 1) for axes in combinations(spatial_axes, n)
             ] if mirror else [[]]

    def probabilities(axes: list[int]) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, enabled=amp and x.device.type == "cuda"):
            logits = net(x.flip(axes) if axes else x)
        probs = torch.softmax(logits.float(), dim=1)
        return probs.flip(axes) if axes else probs

    return sum(probabilities(axes) for axes in flips) / len(flips)


@torch.inference_mode()
def sliding_window_probs(net: Callable[[torch.Tensor], torch.Tensor], image: np.ndarray, patch_size, overlap: float,
                         device, batch_size: int = 4, amp: bool = False, multiple: int | tuple = 16,
                         mirror: bool = False) -> np.ndarray:
    """Class probabilities (K, *spatial) of a channels-first image by Gaussian-weighted sliding windows.

    ``image`` may also be a stack (N, C, *spatial) of same-sized images (e.g. the slices of a volume), giving
    (N, K, *spatial). The image is padded to at least the patch size (and to a multiple of ``multiple``, one value or
    one per axis, where it is smaller than the patch) and the padding is cut off again, so the output is on the input
    grid. With ``mirror`` each window's probabilities are the mean over the window and its mirror images along every
    subset of the spatial axes, each flipped back (nnU-Net's test-time mirroring; 2^d network passes). The training
    augmentation flips along every axis, so the network has seen mirrored images.
    """
    from monai.inferers import sliding_window_inference

    stacked = image.ndim == len(patch_size) + 2
    batch = image if stacked else image[None]
    spatial = batch.shape[2:]
    multiples = np.broadcast_to(multiple, len(spatial))
    roi = [min(int(p), int(np.ceil(s / m) * m)) for p, s, m in zip(patch_size, spatial, multiples)]
    target = [max(s, r) for s, r in zip(spatial, roi)]
    pads = [(0, 0), (0, 0)] + [((t - s) // 2, (t - s) - (t - s) // 2) for s, t in zip(spatial, target)]
    if any(p != (0, 0) for p in pads):
        batch = np.pad(batch, pads, mode="edge")
    x = torch.from_numpy(np.ascontiguousarray(batch)).to(device)

    def predictor(patch: torch.Tensor) -> torch.Tensor:
        return mean_probabilities(net, patch, mirror, amp)

    probs = sliding_window_inference(x, roi, batch_size, predictor, overlap=overlap, mode="gaussian")
    crop = tuple(slice(lo, lo + s) for (lo, _), s in zip(pads[2:], spatial))
    out = probs[(slice(None), slice(None)) + crop].float().cpu().numpy()
    return out if stacked else out[0]


class Predictor:
    """Runs a trained network on whole images: normalisation, resampling to the working grid
    (``data.target_spacing``), sliding window, and probabilities resampled back to the image's own grid. With
    ``whole_image`` the window is each whole image (or slice): for networks that resize their input themselves.
    ``volume_net``, for such a network, takes all slices of one volume at once, in order (N, C, H, W), so that it
    can make its slices agree (SAM-Mix's presence per slice)."""

    def __init__(self, net: Callable[[torch.Tensor], torch.Tensor], config, device, run_dir: str | None = None,
                 checkpoint: str | None = None, whole_image: bool = False,
                 volume_net: Callable[[torch.Tensor], torch.Tensor] | None = None):
        if volume_net is not None and not whole_image:
            raise ValueError("volume_net needs whole_image windows (it takes whole slices)")
        self.net = net
        self.volume_net = volume_net
        self.whole_image = whole_image
        self.config = config
        self.device = device
        self.run_dir = run_dir
        self.checkpoint = checkpoint

    @classmethod
    def of(cls, method, **kwargs) -> "Predictor":
        """The predictor of a trained method (``semiseg.methods.Method``): its ``predict_logits`` read with its
        ``inference_config()``, on the method's device, with whole-image windows where the method asks for them."""
        return cls(method.predict_logits, method.inference_config(), method.device,
                   whole_image=method.whole_image_inference,
                   volume_net=getattr(method, "predict_volume_slices", None), **kwargs)

    @property
    def patch_size(self):
        return self.config.infer.patch_size or self.config.train.patch_size

    def window(self, spatial) -> list[int]:
        """The sliding window for an image (or slice) of this spatial shape."""
        return list(spatial) if self.whole_image else list(self.patch_size)

    def prepare(self, image: Image) -> np.ndarray:
        """The image as the network takes it: channels first, normalised, on the working grid."""
        from .data.resample import resample_image, working_shape

        arr = to_channels_first(image)
        if arr.shape[0] != self.config.model.in_channels:
            raise ImageError(f"{image.path}: {arr.shape[0]} channel(s), the model expects "
                             f"{self.config.model.in_channels}")
        if arr.ndim - 1 not in (len(self.patch_size), len(self.patch_size) + 1):
            raise ImageError(f"{image.path}: a {arr.ndim - 1}D image, the model works on {len(self.patch_size)}D")
        arr = normalise(arr, self.config.data.intensity).astype(np.float32)
        return resample_image(arr, working_shape(image.spatial_shape, image.spacing, self.config.data.target_spacing))

    def predict_array(self, arr: np.ndarray) -> np.ndarray:
        """Probabilities (K, *spatial) for an array already on the working grid (normalised, channels first). A 3D
        volume given to a 2D network is predicted slice by slice along ``train.slice_axis``."""
        multiple = size_multiple(self.config.model.name, self.config.model.strides)
        if arr.ndim - 1 == len(self.patch_size) + 1:
            axis = self.config.train.slice_axis % (arr.ndim - 1) + 1
            stack = np.moveaxis(arr, axis, 0)  # (N, C, *2D)
            if self.volume_net is not None:
                with torch.inference_mode():
                    x = torch.from_numpy(np.ascontiguousarray(stack)).to(self.device)
                    probs = mean_probabilities(self.volume_net, x, self.config.infer.mirror, self.config.train.amp)
                return np.moveaxis(probs.cpu().numpy(), 0, axis)
            window = self.window(stack.shape[2:])
            chunks = [sliding_window_probs(self.net, stack[i:i + 32], window, self.config.infer.overlap, self.device,
                                           32, amp=self.config.train.amp, multiple=multiple,
                                           mirror=self.config.infer.mirror)
                      for i in range(0, len(stack), 32)]
            return np.moveaxis(np.concatenate(chunks), 0, axis)
        return sliding_window_probs(self.net, arr, self.window(arr.shape[1:]), self.config.infer.overlap, self.device,
                                    self.config.infer.batch_size, amp=self.config.train.amp, multiple=multiple,
                                    mirror=self.config.infer.mirror)

    def predict(self, image: Image) -> np.ndarray:
        """Probabilities (K, *spatial) on the image's own grid."""
        from .data.resample import resample_probabilities

        return resample_probabilities(self.predict_array(self.prepare(image)), image.spatial_shape)

    def predict_case(self, case) -> np.ndarray:
        """Probabilities on the source grid of a loaded case (``semiseg.data.LoadedCase``, already on the working
        grid)."""
        from .data.resample import resample_probabilities

        return resample_probabilities(self.predict_array(case.image), case.geometry.spatial_shape)

    def segment(self, image: Image) -> Image:
        """Label map on the image's grid (argmax and the configured clean-up, ``evaluate.labels_from``)."""
        return image.with_array(labels_from(self.predict(image), self.config), path=None)
