"""Cases, manifests, validated loading and patch sampling."""
from .cases import (Case, LoadedCase, Manifest, dataset_labels, discover_cases, grid_of, load_case, make_manifest,
                    to_channels_first)
from .intensity import normalise


def __getattr__(name):  # sampling needs torch: imported on first use, so that listing cases does not load torch
    if name in ("Batch", "PatchSampler", "pad_to"):
        from . import sampling

        return getattr(sampling, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["Case", "LoadedCase", "Manifest", "dataset_labels", "discover_cases", "grid_of", "load_case",
           "make_manifest", "normalise", "to_channels_first", "Batch", "PatchSampler", "pad_to"]
