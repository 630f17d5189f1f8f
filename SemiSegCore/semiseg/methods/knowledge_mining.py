"""Knowledge mining from SAM (Mao et al., arXiv 2503.06816): a small 2D U-Net++ teaches SAM where to look, SAM's
masks teach the U-Net++ back.

1. Warm-up: the U-Net++ trains on the labelled images only (``warmup`` iterations).
2. Mining round: the U-Net++ predicts every unlabelled image (a 3D volume slice by slice along
   ``train.slice_axis``); each foreground class becomes a SAM prompt (box of the largest component above
   ``threshold``, ``n_pos`` positive points where prob >= ``confident``, ``n_neg`` negatives inside the box), given
   to SAM with the image on its source grid (``sam_grid``); SAM's masks pass a quality gate (predicted IoU >=
   ``min_iou`` and Dice with the U-Net++ mask >= ``min_agreement``, per slice and class) and become pseudo-labels
   on the training grid.
3. Fine-tuning: every step adds ``lambda(step) * DiceCE(pseudo batch)`` to the supervised loss, with lambda ramped
   from 0 to ``weight`` over ``rampup`` iterations after the first round.

Schedules: ``one_time`` mines once, after the warm-up; ``continuous`` mines again every ``every`` iterations with the
improved U-Net++ (each round replaces the previous pseudo-labels).

Pseudo-labels are written to ``<run>/pseudo_labels/`` (``pseudolabels/`` in runs of older versions) by the rules of
:mod:`semiseg.io.labels` (``<case>.png`` for 2D (0/255 when binary), ``<case>.nii.gz`` for volumes, plus
``<case>.json`` with the SAM provenance, the prompts, the predicted IoU and the gate decision per slice and class, and
the round) and kept in the checkpoint, so a resumed run trains on the same pseudo-labels. In a volume, a slice whose
prompt fails the gate is marked ``IGNORE`` (255) and left out of the loss; slices where the U-Net++ found nothing are
background. Each round is logged (``event="mining"``) with the number of accepted cases and the Dice of the
pseudo-labels against the hidden references of the unlabelled cases (evaluation only; training never reads them).
"""
from __future__ import annotations

import json
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from tqdm import tqdm

from ..config import ConfigError
from ..data.cases import load_case
from ..data.resample import resample_label, resample_probabilities
from ..data.sampling import Batch
from ..io import Image, label_path, pseudo_label_dir, read_label, write_label, write_sidecar
from ..losses import dice_ce_loss, sigmoid_rampup
from ..metrics import dice_score
from ..utils import atomic_write_text
from .base import Method
from .context import Stream

IGNORE = 255
"""Label value of pixels left out of the pseudo-label loss (slices rejected by the gate)."""

SCHEDULES = ("one_time", "continuous")
SAM_GRIDS = ("source", "working")


@dataclass
class KnowledgeMiningParams:
    schedule: str = "one_time"
    """one_time: mine once after the warm-up; continuous: mine again every ``every`` iterations."""
    warmup: int = 1000
    """Supervised iterations before the first mining round."""
    every: int = 1000
    """continuous: iterations between mining rounds."""
    rampup: int = 500
    """Iterations over which the pseudo-label weight ramps (sigmoid) from 0 to ``weight`` after the first round."""
    weight: float = 1.0
    """Final weight of the pseudo-label loss."""
    threshold: float = 0.5
    """Foreground = U-Net++ probability above this; its largest component gives the box."""
    confident: float = 0.9
    """Positive points where prob >= confident; negative points (inside the box) where prob <= 1 - confident."""
    n_pos: int = 0
    """Positive points per prompt besides the box. 0 by default: LiteMedSAM (like MedSAM) learned from boxes, and
    one point lowered its masks from 0.647 to 0.560 Dice on Kvasir validation images (docs/benchmarks.md)."""
    n_neg: int = 0
    padding: float = 5.0
    """Box padding in pixels."""
    min_area: int = 64
    """No prompt (no pseudo-label) for a component smaller than this many pixels."""
    min_iou: float = 0.8
    """Gate: SAM's predicted IoU."""
    min_agreement: float = 0.5
    """Gate: Dice between SAM's mask and the U-Net++ mask."""
    min_stability: float = 0.0
    """Gate: mean IoU of SAM's mask with the masks of ``jitter_samples`` prompts whose box corners move by up to
    ``jitter`` of the box size (0 turns the check off; only the decoder runs again)."""
    jitter: float = 0.1
    jitter_samples: int = 4
    backend: str = "litemedsam"
    """SAM backend: litemedsam | sam | hf (see semiseg.sam)."""
    checkpoint: Optional[str] = None
    model_type: str = "vit_b"
    """segment-anything model type for backend 'sam'."""
    multimask: Optional[bool] = None
    """None: the backend's default (LiteMedSAM: single mask; SAM: best of three by predicted IoU)."""
    sam_device: str = "auto"
    embedding_cache: Optional[str] = None
    """A folder that keeps SAM's image embeddings on disk (LiteMedSAM: 4 MB per image or slice), so that later rounds
    of a continuous schedule, and other runs mining the same images (seeds, settings), encode each image once. The
    encoder dominates mining on a CPU. None: only the engine's in-memory cache of recent images."""
    save_pseudolabels: bool = True
    sam_grid: str = "source"
    """The grid SAM segments on. ``source``: the image as stored, the U-Net++'s probabilities resampled (linearly)
    to it; ``working``: the training grid (``data.target_spacing``). SAM's gated masks come back to the working grid
    (nearest) for training. On 40 Kvasir validation images with a 128 px working grid, SAM from the same boxes gave
    0.716 Dice on the source 256 px images against 0.685 on the working grid (docs/benchmarks.md). ``padding`` and
    ``min_area`` are in pixels of this grid; a volume resampled to fewer slices costs more SAM calls on its source
    grid."""


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"config key 'knowledge_mining.{key}' {message}")


def _pack(arr: np.ndarray) -> dict:
    return {"shape": list(arr.shape), "data": zlib.compress(np.ascontiguousarray(arr, dtype=np.uint8).tobytes())}


def _unpack(d: dict) -> np.ndarray:
    return np.frombuffer(zlib.decompress(d["data"]), dtype=np.uint8).reshape(d["shape"]).copy()


def _slice_index(ndim: int, axis: int, k: int) -> tuple:
    """Index of slice ``k`` of an array of ``ndim`` spatial axes (the whole array in 2D)."""
    if ndim == 2:
        return (slice(None), slice(None))
    idx = [slice(None)] * ndim
    idx[axis] = k
    return tuple(idx)


def gate(sam_mask: np.ndarray, model_mask: np.ndarray, slices: list[dict], axis: int, min_iou: float,
         min_agreement: float, stability: dict | None = None,
         min_stability: float = 0.0) -> tuple[np.ndarray, list[dict]]:
    """Apply the quality gate to one case.

    slices: the engine's provenance records ``[{"index": k, "prompts": [{"label": c, "iou": s, ...}]}]``.
    Each (slice, class) prompt passes when SAM's predicted IoU >= ``min_iou``, the Dice between SAM's mask and
    the model's mask of that class on that slice >= ``min_agreement`` and (when given) its stability under prompt
    jitter (``{(slice, class): IoU}``) >= ``min_stability``; a slice with a failed prompt becomes ``IGNORE``.
    Returns the gated label map and one decision record per prompt.
    """
    out = sam_mask.astype(np.uint8).copy()
    decisions = []
    for rec in slices:
        sl = _slice_index(sam_mask.ndim, axis, rec["index"])
        for p in rec["prompts"]:
            c = int(p["label"])
            agreement = dice_score(sam_mask[sl] == c, model_mask[sl] == c)
            stable = None if stability is None else stability.get((rec["index"], c), 0.0)
            accepted = (p["iou"] >= min_iou and agreement >= min_agreement
                        and (stable is None or stable >= min_stability))
            decisions.append({"slice": rec["index"], "label": c, "iou": round(float(p["iou"]), 4),
                              "agreement": round(agreement, 4),
                              "stability": None if stable is None else round(stable, 4), "accepted": bool(accepted)})
            if not accepted:
                out[sl] = IGNORE
    return out, decisions


def foreground_dice(pred: np.ndarray, ref: np.ndarray, num_classes: int) -> float:
    """Mean Dice over the foreground classes, on the pixels not marked IGNORE."""
    keep = pred != IGNORE
    return float(np.mean([dice_score((pred == c) & keep, (ref == c) & keep) for c in range(1, num_classes)]))


def quality_correlations(quality: list[list[float]]) -> dict:
    """How well each gate signal predicts the true Dice of SAM's masks (Pearson r over the mined cases that have a
    hidden reference): ``r_iou``, ``r_agreement``, ``r_stability``."""
    q = np.asarray(quality, dtype=float).reshape(-1, 4)
    out = {}
    for i, name in enumerate(("iou", "agreement", "stability"), start=1):
        keep = ~np.isnan(q[:, i])
        signal, truth = q[keep, i], q[keep, 0]
        if len(signal) >= 3 and signal.std() > 0 and truth.std() > 0:
            out[f"r_{name}"] = round(float(np.corrcoef(truth, signal)[0, 1]), 3)
    return out


class KnowledgeMining(Method):
    name = "knowledge_mining"
    needs_unlabelled = True  # loaded for mining; batches come from the accepted ones (stream "pseudo")
    Params = KnowledgeMiningParams

    @classmethod
    def params_from(cls, raw):
        p = super().params_from(raw)
        _check(p.schedule in SCHEDULES, "schedule", f"must be one of {', '.join(SCHEDULES)}, got '{p.schedule}'")
        _check(p.warmup >= 0, "warmup", f"must be >= 0, got {p.warmup}")
        _check(p.every >= 1, "every", f"must be >= 1, got {p.every}")
        _check(p.weight >= 0, "weight", f"must be >= 0, got {p.weight}")
        _check(p.sam_grid in SAM_GRIDS, "sam_grid", f"must be one of {', '.join(SAM_GRIDS)}, got '{p.sam_grid}'")
        _check(p.jitter_samples >= 1, "jitter_samples", f"must be >= 1, got {p.jitter_samples}")
        for key in ("threshold", "confident", "min_iou", "min_agreement", "min_stability", "jitter"):
            _check(0.0 <= getattr(p, key) <= 1.0, key, f"must be in [0, 1], got {getattr(p, key)}")
        return p

    def __init__(self, cfg, device):
        super().__init__(cfg, device)
        if not cfg.model.name.endswith("2d"):
            raise ConfigError(f"config key 'model.name': knowledge_mining trains a 2D network (unetpp2d), got "
                              f"'{cfg.model.name}'")
        self.net = self.build_network()
        self.pseudo: dict[str, np.ndarray] = {}  # case id -> gated label map (IGNORE where rejected)
        self.round = 0
        self.first_round_step = -1
        self.next_round_step = self.params.warmup
        self._engine = None

    # -- training -------------------------------------------------------------------------------------------------
    def pseudo_weight(self, step: int) -> float:
        if self.first_round_step < 0:
            return 0.0
        return self.params.weight * sigmoid_rampup(step - self.first_round_step, self.params.rampup)

    def streams(self, ctx) -> dict:
        """The labelled batches and, once a round accepted cases, ``pseudo``: the pseudo-labelled cases with their
        gated labels (a new seed each round)."""
        streams = {"labelled": self.labelled_stream(ctx)}
        cases = [c for c in ctx.unlabelled if c.id in self.pseudo]
        if cases and self.params.weight > 0:
            streams["pseudo"] = Stream(cases, self.cfg.train.unlabelled_batch_size, seed=700 + self.round,
                                       labels=self.pseudo)
        return streams

    def training_step(self, batches: dict[str, Batch], step: int) -> dict[str, torch.Tensor]:
        lam = self.pseudo_weight(step)
        labelled = batches["labelled"]
        pseudo = batches.get("pseudo") if lam > 0 else None
        x = labelled.image if pseudo is None else torch.cat([labelled.image, pseudo.image])
        logits = self.net(x)
        n = labelled.image.shape[0]
        sup = dice_ce_loss(logits[:n], labelled.label)
        if pseudo is None:
            return {"loss": sup, "sup": sup.detach()}
        valid = pseudo.label != IGNORE
        target = torch.where(valid, pseudo.label, torch.zeros_like(pseudo.label))
        pl = dice_ce_loss(logits[n:], target, weight=valid.float())
        return {"loss": sup + lam * pl, "sup": sup.detach(), "pseudo": pl.detach(),
                "pseudo_weight": torch.tensor(lam)}

    def predict_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def on_step(self, ctx, step: int) -> None:
        if step >= self.next_round_step and step < self.cfg.train.iterations:
            self.mine(ctx, step)

    # -- mining ---------------------------------------------------------------------------------------------------
    def engine(self):
        """The SAM engine, built on first use (not part of the checkpoint)."""
        if self._engine is None:
            from ..sam import SamEngine, build_backend

            p = self.params
            backend = build_backend(p.backend, p.checkpoint, device=p.sam_device, model_type=p.model_type)
            self._engine = SamEngine(backend, multimask=p.multimask, cache_dir=p.embedding_cache)
        return self._engine

    def sam_pseudolabel(self, image: Image, prob: np.ndarray, axis: int):
        """The one call into SAM: (mask, predicted IoU, provenance) for one case from the model's probabilities."""
        from ..sam import pseudolabel_from_probability

        p = self.params
        return pseudolabel_from_probability(self.engine(), image, prob, axis=axis, threshold=p.threshold,
                                            confident=p.confident, n_pos=p.n_pos, n_neg=p.n_neg, padding=p.padding,
                                            min_area=p.min_area, prompt_source=f"knowledge_mining:{self.cfg.name}")

    def _sam_image(self, image: np.ndarray) -> Image:
        """A loaded (normalised, channels-first) image as the engine takes it: RGB back to 0..255 uint8, anything
        else left as floats (the engine scales by percentiles, which ignore our normalisation)."""
        if image.shape[0] == 3:
            scale = 255.0 if self.cfg.data.intensity == "rgb" else 1.0
            rgb = np.clip(np.rint(np.moveaxis(image, 0, -1) * scale), 0, 255).astype(np.uint8)
            return Image(rgb, (1.0, 1.0), channels=3)
        arr = image[0]
        return Image(arr, (1.0,) * arr.ndim)

    def _sam_inputs(self, case, source, prob: np.ndarray) -> tuple[Image, np.ndarray]:
        """The image SAM segments and the U-Net++'s probabilities on the same grid (``sam_grid``). ``source`` is the
        manifest entry of the loaded ``case``, read again when SAM works on the source grid."""
        shape = tuple(case.geometry.spatial_shape)
        if self.params.sam_grid == "working" or shape == prob.shape[1:]:
            return self._sam_image(case.image), prob
        loaded = load_case(source, self.cfg.data.intensity, self.cfg.data.num_classes, with_label=False)
        return self._sam_image(loaded.image), resample_probabilities(prob, shape)

    @torch.no_grad()
    def mine(self, ctx, step: int) -> dict:
        """One mining round over all unlabelled cases; replaces the pseudo-labels (and the ``pseudo`` stream) and
        logs a summary."""
        t0 = time.time()
        p = self.params
        self.round += 1
        was_training = self.training
        self.eval()
        predictor = ctx.predictor()
        sources = {c.id: c for c in ctx.manifest.unlabelled}
        k = self.cfg.data.num_classes
        out_dir = pseudo_label_dir(ctx.run_dir)
        write = p.save_pseudolabels and ctx.is_main
        pseudo, scores = {}, {"pseudo_dice": [], "sam_dice": [], "model_dice": []}
        quality = []  # per prompted case with a reference: SAM's true Dice, predicted IoU, agreement, stability
        n_prompted = 0
        encoded_before = self.engine().timing.embedded
        ctx.log.write(event="mining_start", round=self.round, step=step, cases=len(ctx.unlabelled))
        for case in tqdm(ctx.unlabelled, desc=f"mining round {self.round}", leave=False, disable=ctx.quiet):
            prob = predictor.predict_array(case.image)
            model_mask = prob.argmax(0).astype(np.uint8)
            axis = self.cfg.train.slice_axis % model_mask.ndim
            sam_image, sam_prob = self._sam_inputs(case, sources[case.id], prob)
            sam_mask, score, prov = self.sam_pseudolabel(sam_image, sam_prob, axis)
            stability = None
            if p.min_stability > 0 and prov.get("slices"):
                from ..sam import prompt_stability

                stability = prompt_stability(self.engine(), sam_image, sam_mask, prov["slices"], axis,
                                             p.jitter_samples, p.jitter, seed=self.round)
            gated, decisions = gate(sam_mask, sam_prob.argmax(0), prov.get("slices", []), axis, p.min_iou,
                                    p.min_agreement, stability, p.min_stability)
            accepted = any(d["accepted"] for d in decisions) and bool((gated != IGNORE).any())
            n_prompted += bool(decisions)
            if accepted:
                pseudo[case.id] = resample_label(gated, model_mask.shape)  # trained on the working grid
            ref_path = sources[case.id].reference
            if ref_path:  # evaluation only: the hidden reference on the working grid
                ref = resample_label(read_label(ref_path).array, model_mask.shape)
                scores["model_dice"].append(foreground_dice(model_mask, ref, k))
                if decisions:
                    sam_dice = foreground_dice(resample_label(sam_mask, model_mask.shape), ref, k)
                    scores["sam_dice"].append(sam_dice)
                    quality.append([sam_dice] + [float(np.mean([d[q] for d in decisions]))
                                                 if all(d[q] is not None for d in decisions) else np.nan
                                                 for q in ("iou", "agreement", "stability")])
                if accepted:
                    scores["pseudo_dice"].append(foreground_dice(pseudo[case.id], ref, k))
            if write and decisions:
                self._write(out_dir, case, gated if accepted else None, prov, decisions, step)
        self.pseudo = pseudo
        ctx.refresh_stream("pseudo")
        if self.first_round_step < 0:
            self.first_round_step = step
        self.next_round_step = step + p.every if p.schedule == "continuous" else float("inf")
        if was_training:
            self.train()
        summary = {"round": self.round, "step": step, "cases": len(ctx.unlabelled), "prompted": n_prompted,
                   "accepted": len(pseudo), "encoded": self.engine().timing.embedded - encoded_before,
                   "seconds": round(time.time() - t0, 1),
                   **{k_: (round(float(np.mean(v)), 4) if v else None) for k_, v in scores.items()},
                   **quality_correlations(quality)}
        ctx.log.write(event="mining", **summary)
        if write:
            atomic_write_text(out_dir / "rounds.jsonl", "".join(json.dumps(r) + "\n" for r in
                                                                self._history(out_dir) + [summary]))
        return summary

    @staticmethod
    def _history(out_dir: Path) -> list[dict]:
        path = out_dir / "rounds.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines() if line] if path.exists() else []

    def _write(self, out_dir: Path, case, label: np.ndarray | None, prov: dict, decisions: list[dict],
               step: int) -> None:
        """``<case>.json`` always (the gate decision included); the mask only when accepted (a stale mask of an
        earlier round is removed when the case is now rejected)."""
        mask_path = label_path(out_dir, case.id, case.geometry.path, case.image.ndim - 1)
        record = dict(prov, case=case.id, round=self.round, step=step, accepted=label is not None,
                      gate={"min_iou": self.params.min_iou, "min_agreement": self.params.min_agreement,
                            "decisions": decisions}, ignore_value=IGNORE)
        record.pop("slices", None)  # the per-prompt details are in gate.decisions and prompts below
        record["prompts"] = [dict(pr, slice=s["index"]) for s in prov.get("slices", []) for pr in s["prompts"]]
        if label is None:
            write_sidecar(mask_path, record, has_mask=False)
            mask_path.unlink(missing_ok=True)
            return
        label = resample_label(label, case.geometry.spatial_shape)  # reviewed on the image's own grid
        write_label(case.geometry.with_array(label), mask_path, overwrite=True, provenance=record)

    # -- checkpoint -----------------------------------------------------------------------------------------------
    def get_extra_state(self) -> dict:
        return {"round": self.round, "first_round_step": self.first_round_step,
                "next_round_step": self.next_round_step,
                "pseudo": {cid: _pack(arr) for cid, arr in self.pseudo.items()}}

    def set_extra_state(self, state: dict) -> None:
        self.round = int(state["round"])
        self.first_round_step = int(state["first_round_step"])
        self.next_round_step = state["next_round_step"]
        self.pseudo = {cid: _unpack(d) for cid, d in state["pseudo"].items()}
