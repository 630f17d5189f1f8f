"""Cases, manifests, validated loading and patch sampling."""
from .cases import (Case, LoadedCase, Manifest, dataset_labels, discover_cases, grid_of, load_case, make_manifest,
                    normalise, to_channels_first)
from .sampling import Batch, PatchSampler, pad_to

__all__ = ["Case", "LoadedCase", "Manifest", "dataset_labels", "discover_cases", "grid_of", "load_case",
           "make_manifest", "normalise", "to_channels_first", "Batch", "PatchSampler", "pad_to"]
