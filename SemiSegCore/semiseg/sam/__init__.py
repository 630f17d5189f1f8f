"""SAM pseudo-labelling: backends, prompts, engine.

The call the knowledge-mining method makes::

    from semiseg.sam import build_backend, SamEngine, pseudolabel_from_probability

    engine = SamEngine(build_backend("litemedsam", device="auto"))      # build once, reuse (embedding cache)
    mask, score, provenance = pseudolabel_from_probability(
        engine, image, prob, axis=2, threshold=0.5, confident=0.9, n_pos=0, n_neg=0, padding=5.0, min_area=10)

- ``image``: a :class:`semiseg.io.Image`, 2D (grey or RGB) or a 3D volume (segmented slice by slice along ``axis``).
- ``prob``: (num_classes, *spatial) class probabilities (class 0 is background) or (*spatial) foreground
  probability, on the image's grid.
- returns ``mask`` (uint8 label map, image grid), ``score`` (mean predicted IoU of the decoded prompts, 0 when no
  class reached ``threshold``) and ``provenance`` (a JSON-ready dict: backend, checkpoint, prompt and IoU per slice).

Other entry points: :func:`pseudolabel_from_mask` (prompts from a label map, returns a :class:`PseudoLabel` with
``.write(out_dir, case_id)``), :meth:`SamEngine.segment` (any per-slice prompts), the prompt builders in
:mod:`semiseg.sam.prompts`, and ``semiseg pseudolabel`` (:mod:`semiseg.sam.cli`).
"""
from .backends import (BACKENDS, SAM_CHECKPOINTS, HFSamBackend, LiteMedSAMBackend, SamBackend, SamCheckpointError,
                       SegmentAnythingBackend, build_backend, resolve_sam_checkpoint)
from .engine import (PseudoLabel, SamEngine, SliceEmbeddingCache, prompt_stability, pseudolabel_from_mask,
                     pseudolabel_from_probability, to_uint8)
from .prompts import (Prompt, ijk_to_ras, prompt_from_cam, prompt_from_probability, prompts_from_mask,
                      prompts_from_user, ras_to_ijk)

__all__ = ["BACKENDS", "SAM_CHECKPOINTS", "HFSamBackend", "LiteMedSAMBackend", "SamBackend", "SamCheckpointError",
           "SegmentAnythingBackend", "prompt_stability", "build_backend", "resolve_sam_checkpoint",
           "SliceEmbeddingCache", "PseudoLabel", "SamEngine", "pseudolabel_from_mask", "pseudolabel_from_probability",
           "to_uint8", "Prompt", "ijk_to_ras", "prompt_from_cam", "prompt_from_probability", "prompts_from_mask",
           "prompts_from_user", "ras_to_ijk"]
