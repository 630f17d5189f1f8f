"""LLM-SegNet (Kumari et al., arXiv 2407.05088), as reconstructed in research/seeds.md section 2.

Two networks are co-trained. Network A sees the raw batch; network B sees the same labelled images and a CutMix view
of the unlabelled ones. Both get Dice + cross-entropy on the labelled images. On the unlabelled images each network
is supervised by the other (the peer's softmax, without gradient) through the Unified Segmentation Loss, compared in
the CutMix space: A's raw predictions are mixed with the same box (mixing is voxel selection, so every voxel of A's
prediction is used once) and set against B's prediction on the mixed images, and vice versa.

Task knowledge: a fixed text about the structure (``Resources/knowledge/<name>.txt``) is encoded once by a frozen
text encoder into t (d,), kept in the checkpoint as a buffer, and fused at each V-Net's bottleneck:
F' = F + lambda * Linear(t), lambda a learnable scalar per network. With a single task the text is the same for every
image, so the fused term is a learned per-channel bottleneck bias initialised from the text; it cannot carry
image-specific information.

Inference: the average of the two networks' softmax (``predict_with: mean``) or network A alone (``a``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ConfigError
from ..data.sampling import Batch
from ..losses import dice_ce_loss, sigmoid_rampup
from .base import Method


@dataclass
class LLMSegNetParams:
    use_text: bool = True
    """Fuse the task-knowledge embedding at the bottleneck (V-Net only). False: plain co-training."""
    knowledge: str = "left_atrium"
    """A name in Resources/knowledge (file stem) or a path to a text file."""
    text_encoder: str = "minilm"
    """'minilm' (bundled all-MiniLM-L6-v2) or a local transformers model folder."""
    embedding_cache: str = ""
    """Folder of the text-embedding cache; empty: $SEMISEG_CACHE/text_embeddings or ~/.cache/semiseg/..."""
    fusion_init: float = 0.1
    """Initial value of the learnable fusion weight lambda."""
    unlabelled_loss: str = "usl"
    """usl: Unified Segmentation loss; cps: cross pseudo-supervision (CE on the peer's argmax everywhere)."""
    confidence: float = 0.65
    """USL threshold tau on the peer's max class probability: NLL at or above it, MSE below."""
    unlabelled_weight: float = 1.0
    """Weight of the unlabelled loss after the ramp-up."""
    rampup: float = 0.4
    """Fraction of train.iterations over which the unlabelled weight rises (sigmoid ramp) to its full value."""
    cutmix_beta: float = 4.0
    """Fraction of each mixed patch taken from the partner image ~ Beta(b, b) (a box with that volume)."""
    predict_with: str = "mean"
    """mean: average of the two networks' softmax; a: network A only."""


def unified_segmentation_loss(logits: torch.Tensor, peer_probs: torch.Tensor, confidence: float) -> torch.Tensor:
    """Mean over voxels of: -log p[argmax q] where max q >= tau (confident peer), else mean_k (p_k - q_k)^2.

    logits (B, K, *spatial) of the trained network, peer_probs (B, K, *spatial) softmax of the peer (no gradient).
    Each voxel contributes exactly one of the two terms, so the loss stays on one scale whatever the share of
    confident voxels (the paper does not give its normalisation; this is our choice).
    """
    peer_probs = peer_probs.detach()
    conf, hard = peer_probs.max(1)
    confident = (conf >= confidence).to(logits.dtype)
    nll = F.cross_entropy(logits, hard, reduction="none")
    mse = (torch.softmax(logits, 1) - peer_probs).pow(2).mean(1)
    return (confident * nll + (1 - confident) * mse).mean()


def cross_pseudo_loss(logits: torch.Tensor, peer_probs: torch.Tensor) -> torch.Tensor:
    """Cross pseudo-supervision (Chen et al. 2021): cross-entropy against the peer's hard labels on every voxel."""
    return F.cross_entropy(logits, peer_probs.detach().argmax(1))


def cutmix_box(shape: tuple[int, ...], beta: float, device=None) -> torch.Tensor:
    """A (1, 1, *spatial) 0/1 mask with one random box (1 = take the partner) holding a Beta(beta, beta) share of
    the volume (same proportion along every axis)."""
    share = float(torch.distributions.Beta(beta, beta).sample())
    side = share ** (1.0 / len(shape))
    mask = torch.zeros((1, 1) + tuple(shape), device=device)
    box = []
    for s in shape:
        n = max(1, int(round(s * side)))
        start = int(torch.randint(0, s - n + 1, (1,)))
        box.append(slice(start, start + n))
    mask[(slice(None), slice(None)) + tuple(box)] = 1.0
    return mask


def mix(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """CutMix each sample with the next one in the batch (a cyclic shift): inside the box, the partner's values."""
    return x * (1 - mask) + x.roll(1, dims=0) * mask


class TextFusion(nn.Module):
    """F' = F + lambda * Linear(t), broadcast over the bottleneck's spatial grid."""

    def __init__(self, text_dim: int, channels: int, init: float):
        super().__init__()
        self.proj = nn.Linear(text_dim, channels)
        self.weight = nn.Parameter(torch.tensor(float(init)))

    def forward(self, feat: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        t = self.proj(text.to(feat.dtype)).view(1, -1, *([1] * (feat.ndim - 2)))
        return feat + self.weight * t


class TextGuidedNet(nn.Module):
    """A V-Net whose bottleneck is fused with a text embedding (passed in, shared by both networks)."""

    def __init__(self, net: nn.Module, text_dim: int, fusion_init: float):
        super().__init__()
        self.net = net
        self.fusion = TextFusion(text_dim, net.bottleneck_channels, fusion_init)

    def forward(self, x: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        feats = self.net.encode(x)
        feats[-1] = self.fusion(feats[-1], text)
        return self.net.decode(feats)


class LLMSegNet(Method):
    name = "llm_segnet"
    needs_unlabelled = True
    Params = LLMSegNetParams

    @classmethod
    def params_from(cls, raw: dict | None) -> LLMSegNetParams:
        p = super().params_from(raw)
        if p.unlabelled_loss not in ("usl", "cps"):
            raise ConfigError(f"config key 'llm_segnet.unlabelled_loss' must be 'usl' or 'cps', "
                              f"got '{p.unlabelled_loss}'")
        if p.predict_with not in ("mean", "a"):
            raise ConfigError(f"config key 'llm_segnet.predict_with' must be 'mean' or 'a', got '{p.predict_with}'")
        if not 0.0 < p.confidence <= 1.0:
            raise ConfigError(f"config key 'llm_segnet.confidence' must be in (0, 1], got {p.confidence}")
        if p.cutmix_beta <= 0:
            raise ConfigError(f"config key 'llm_segnet.cutmix_beta' must be > 0, got {p.cutmix_beta}")
        return p

    def __init__(self, cfg, device):
        super().__init__(cfg, device)
        p = self.params
        if p.use_text and cfg.model.name != "vnet":
            raise ConfigError(f"config key 'llm_segnet.use_text': text fusion needs model 'vnet' (it works on the "
                              f"bottleneck), not '{cfg.model.name}'; set llm_segnet.use_text=false for co-training "
                              f"only")
        self.knowledge_text = ""
        if p.use_text:
            from ..knowledge import KnowledgeError, task_embedding

            try:
                vector, self.knowledge_text = task_embedding(p.knowledge, p.text_encoder, p.embedding_cache or None)
            except KnowledgeError as exc:
                raise ConfigError(f"config key 'llm_segnet.knowledge': {exc}") from exc
            # A persistent buffer: the checkpoint keeps the embedding the networks were trained with.
            self.register_buffer("text_embedding", torch.as_tensor(vector, dtype=torch.float32))
            self.net_a = TextGuidedNet(self.build_network(), len(vector), p.fusion_init)
            self.net_b = TextGuidedNet(self.build_network(), len(vector), p.fusion_init)
        else:
            self.text_embedding = None
            self.net_a, self.net_b = self.build_network(), self.build_network()

    def run(self, net: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return net(x, self.text_embedding) if self.text_embedding is not None else net(x)

    def unlabelled_loss(self, logits: torch.Tensor, peer_logits: torch.Tensor) -> torch.Tensor:
        peer = torch.softmax(peer_logits.detach().float(), 1)
        if self.params.unlabelled_loss == "cps":
            return cross_pseudo_loss(logits.float(), peer)
        return unified_segmentation_loss(logits.float(), peer, self.params.confidence)

    def training_step(self, labelled: Batch, unlabelled: Batch | None, step: int) -> dict[str, torch.Tensor]:
        if unlabelled is None:
            raise ValueError("llm_segnet needs an unlabelled batch every step (train.unlabelled_batch_size >= 1)")
        p = self.params
        xl, y, xu = labelled.image, labelled.label, unlabelled.image
        n = xl.shape[0]
        box = cutmix_box(xu.shape[2:], p.cutmix_beta, xu.device)
        logits_a = self.run(self.net_a, torch.cat([xl, xu]))
        logits_b = self.run(self.net_b, torch.cat([xl, mix(xu, box)]))
        sup_a = dice_ce_loss(logits_a[:n], y)
        sup_b = dice_ce_loss(logits_b[:n], y)
        mixed_a = mix(logits_a[n:], box)  # A's raw predictions, brought into the CutMix space of B's input
        unsup_a = self.unlabelled_loss(mixed_a, logits_b[n:])
        unsup_b = self.unlabelled_loss(logits_b[n:], mixed_a)
        ramp_len = p.rampup * self.cfg.train.iterations
        w = p.unlabelled_weight * sigmoid_rampup(step, int(ramp_len))
        loss = sup_a + sup_b + w * (unsup_a + unsup_b)
        out = {"loss": loss, "sup_a": sup_a.detach(), "sup_b": sup_b.detach(), "unsup_a": unsup_a.detach(),
               "unsup_b": unsup_b.detach(), "unsup_weight": torch.tensor(w)}
        if self.text_embedding is not None:
            out["lambda_a"] = self.net_a.fusion.weight.detach()
            out["lambda_b"] = self.net_b.fusion.weight.detach()
        return out

    def predict_logits(self, x: torch.Tensor) -> torch.Tensor:
        logits_a = self.run(self.net_a, x)
        if self.params.predict_with == "a":
            return logits_a
        probs = 0.5 * (torch.softmax(logits_a.float(), 1) + torch.softmax(self.run(self.net_b, x).float(), 1))
        return torch.log(probs.clamp_min(1e-8))  # the predictor's softmax gives back the averaged probabilities

    def on_step(self, trainer, step: int) -> None:
        """Record the knowledge text used (provenance) once, at the start of a run."""
        if step == 0 and self.knowledge_text and trainer.is_main:
            from ..utils import atomic_write_text

            atomic_write_text(trainer.run_dir / "knowledge.txt", self.knowledge_text + "\n")
            trainer.log.write(event="knowledge", knowledge=self.params.knowledge, encoder=self.params.text_encoder,
                              dim=int(self.text_embedding.numel()))

    def parameter_groups(self) -> list[dict]:
        """The fusion weights lambda get no weight decay (decay would pull the text branch towards off)."""
        lambdas = [m.fusion.weight for m in (self.net_a, self.net_b) if isinstance(m, TextGuidedNet)]
        ids = {id(t) for t in lambdas}
        rest = [q for q in self.parameters() if q.requires_grad and id(q) not in ids]
        groups = [{"params": rest}]
        if lambdas:
            groups.append({"params": lambdas, "weight_decay": 0.0})
        return groups
