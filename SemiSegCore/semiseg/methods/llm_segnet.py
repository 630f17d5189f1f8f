"""LLM-SegNet (Kumari et al., arXiv 2407.05088), as reconstructed in research/seeds.md section 2.

Two networks are co-trained. Network A sees the raw batch; network B sees the same labelled images and a CutMix view
of the unlabelled ones. Both get Dice + cross-entropy on the labelled images. On the unlabelled images each network
is supervised by the other (the peer's softmax, without gradient) through the Unified Segmentation Loss, compared in
the CutMix space: A's raw predictions are mixed with the same box (mixing is voxel selection, so every voxel of A's
prediction is used once) and set against B's prediction on the mixed images, and vice versa. The USL averages its
NLL over the confident voxels and its MSE over the others (the normalisation of TraCoCo's peer losses). With
``peer_view: raw`` A's targets are B's prediction on the unmixed images instead (TraCoCo's loop), so each network
learns from its peer's view of the clean images.

Schedule (issue 13): the unlabelled loss is off for a supervised warm-up (``warmup``) and then ramps up; both
networks may also start from a supervised run of the same network (``train.init_from``: its ``net.*`` weights go
into both), so that the peers' pseudo-labels are worth learning from when the unlabelled loss starts.

Crops: unlabelled patches are random (there is no label to centre on). Labelled patches follow
train.foreground_crop by default (``labelled_crop: config``); ``labelled_crop: random`` crops them like the
unlabelled ones. Measured (issue 13; 4-feature V-Nets, 48x48x32 patches, 300 iterations, 8 labelled + 16 unlabelled
LA cases, foreground share of the prediction on 64 random crops of other cases, true 0.275): with the first
schedule (no warm-up, voxel-averaged USL, additive text) and half the labelled crops on foreground, 0.40 and 0.27
(seeds 0, 1); with the warm-up, per-part USL and FiLM, 0.27 and 0.30 (Dice 0.56, 0.61) with foreground-centred
labelled crops but 0.08 and 0.02 (Dice 0.32, 0.09; 0.00 after 600 iterations) with random ones: from scratch,
random labelled crops teach too little foreground before the unlabelled loss starts, and the USL then locks in
background. Random labelled crops only make sense from a converged supervised start (``train.init_from``).
Task knowledge: a fixed text about the structure (``Resources/knowledge/<name>.txt``) is encoded once by a frozen
text encoder into t (d,), kept in the checkpoint as a buffer, and fused at each network's bottleneck (the V-Net's last
encoder stage or the strided U-Net's bottom block) by FiLM on the channel-normalised features: F' = F + lambda * (gamma(t) * LN(F) + beta(t)), (gamma, beta) = Linear(t / |t|),
lambda a learnable scalar per network (``fusion: film``). Unlike the additive form F + lambda * Linear(t)
(``fusion: bias``: a learned per-channel constant), FiLM scales each image's own features, so another text changes
the output differently at every voxel. With a single task the text is still the same for every image: the text
sets (and initialises) a per-channel modulation of the image features; whether that helps is for the ablation
(``use_text: false``) to show.

Inference: the average of the two networks' softmax (``predict_with: mean``) or network A alone (``a``).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn as nn

from ..config import ConfigError
from ..data.sampling import Batch
from ..losses import cross_pseudo_loss, dice_ce_loss, sigmoid_rampup, unified_segmentation_loss
from ..mixing import cutmix_box, mix
from ..models.text_fusion import TextGuidedNet
from .base import Method


@dataclass
class LLMSegNetParams:
    use_text: bool = True
    """Fuse the task-knowledge embedding at the bottleneck (V-Net or strided U-Net). False: plain co-training."""
    knowledge: str = "left_atrium"
    """A name in Resources/knowledge (file stem) or a path to a text file."""
    text_encoder: str = "minilm"
    """'minilm' (bundled all-MiniLM-L6-v2) or a local transformers model folder."""
    embedding_cache: str = ""
    """Folder of the text-embedding cache; empty: $SEMISEG_CACHE/text_embeddings or ~/.cache/semiseg/..."""
    fusion: str = "film"
    """film: F + lambda (gamma(t) LN(F) + beta(t)); bias: F + lambda Linear(t) (the first version: a per-channel
    constant, kept for comparison)."""
    fusion_init: float = 0.1
    """Initial value of the learnable fusion weight lambda."""
    unlabelled_loss: str = "usl"
    """usl: Unified Segmentation loss; cps: cross pseudo-supervision (CE on the peer's argmax everywhere)."""
    confidence: float = 0.65
    """USL threshold tau on the peer's max class probability: NLL at or above it, MSE below."""
    unlabelled_weight: float = 1.0
    """Weight of the unlabelled loss after the ramp-up."""
    rampup: float = 0.4
    """Fraction of train.iterations over which the unlabelled weight rises (sigmoid ramp) to its full value,
    counted from the end of the warm-up."""
    warmup: float = 0.0
    """Supervised-only start: a fraction (< 1) of train.iterations or a number of iterations (>= 1). No unlabelled
    loss (and no unlabelled forward pass) before it."""
    labelled_crop: str = "config"
    """config: labelled patches follow train.foreground_crop; random: they are cropped like the unlabelled ones
    (train.foreground_crop is then not used). See the measurements in the module docstring."""
    peer_view: str = "mixed"
    """The view on which network B predicts network A's pseudo-labels. mixed: B's prediction on the CutMix view,
    brought back voxel by voxel (the first version); raw: B's prediction on the unmixed images, one more forward
    pass without gradient (TraCoCo's loop: each network learns from its peer's prediction on the clean batch; B
    always learns from A's prediction on the unmixed images, mixed)."""
    cutmix_beta: float = 4.0
    """Fraction of each mixed patch taken from the partner image ~ Beta(b, b) (a box with that volume)."""
    predict_with: str = "mean"
    """mean: average of the two networks' softmax; a: network A only."""


TEXT_MODELS = ("vnet", "strided_unet3d", "strided_unet2d")
"""Networks whose bottleneck the text fusion can reach (``models.bottleneck``)."""


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
        for key, allowed in (("fusion", ("film", "bias")), ("labelled_crop", ("random", "config")),
                             ("peer_view", ("mixed", "raw"))):
            if getattr(p, key) not in allowed:
                raise ConfigError(f"config key 'llm_segnet.{key}' must be one of {', '.join(allowed)}, "
                                  f"got '{getattr(p, key)}'")
        if p.warmup < 0 or p.rampup < 0:
            raise ConfigError(f"config keys 'llm_segnet.warmup' and 'llm_segnet.rampup' must be >= 0, got "
                              f"{p.warmup} and {p.rampup}")
        return p

    def __init__(self, cfg, device):
        super().__init__(cfg, device)
        p = self.params
        if p.use_text and cfg.model.name not in TEXT_MODELS:
            raise ConfigError(f"config key 'llm_segnet.use_text': text fusion needs a model with a known bottleneck "
                              f"({', '.join(TEXT_MODELS)}), not '{cfg.model.name}'; set llm_segnet.use_text=false "
                              f"for co-training only")
        self.knowledge_text = ""
        if p.use_text:
            from ..knowledge import KnowledgeError, task_embedding

            try:
                vector, self.knowledge_text = task_embedding(p.knowledge, p.text_encoder, p.embedding_cache or None)
            except KnowledgeError as exc:
                raise ConfigError(f"config key 'llm_segnet.knowledge': {exc}") from exc
            # A persistent buffer: the checkpoint keeps the embedding the networks were trained with.
            self.register_buffer("text_embedding", torch.as_tensor(vector, dtype=torch.float32))
            self.net_a = TextGuidedNet(self.build_network(), len(vector), p.fusion_init, p.fusion)
            self.net_b = TextGuidedNet(self.build_network(), len(vector), p.fusion_init, p.fusion)
        else:
            self.text_embedding = None
            self.net_a, self.net_b = self.build_network(), self.build_network()
        iters = cfg.train.iterations
        self.warmup_steps = int(round(p.warmup * iters)) if p.warmup < 1 else int(p.warmup)
        self.rampup_steps = int(round(p.rampup * iters))

    def unlabelled_weight(self, step: int) -> float:
        """0 during the warm-up, then the sigmoid ramp to ``unlabelled_weight`` over ``rampup``."""
        if step < self.warmup_steps:
            return 0.0
        return self.params.unlabelled_weight * sigmoid_rampup(step - self.warmup_steps, self.rampup_steps)

    def vnets(self) -> list[nn.Module]:
        """The two segmentation networks (inside their text fusion wrappers, if any)."""
        return [n.net if isinstance(n, TextGuidedNet) else n for n in (self.net_a, self.net_b)]

    def load_initial_weights(self, state: dict, source: str) -> int:
        """``train.init_from``: a supervised run's ``net.*`` weights (same model section) go into both networks (the
        text fusion starts fresh); any other state (e.g. another LLM-SegNet run) by matching names and shapes."""
        vnet = {k[len("net."):]: v for k, v in state.items() if k.startswith("net.")}
        if not vnet:
            return super().load_initial_weights(state, source)
        for net in self.vnets():
            own = net.state_dict()
            missing = sorted(k for k in own if k not in vnet or vnet[k].shape != own[k].shape)
            if missing:
                raise ValueError(f"{source}: the supervised network does not fit this model section "
                                 f"({self.cfg.model.name}, features {self.cfg.model.features}): {missing[:3]} ...")
            net.load_state_dict({k: vnet[k] for k in own})
        return 2 * len(vnet)

    def run(self, net: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return net(x, self.text_embedding) if self.text_embedding is not None else net(x)

    def unlabelled_loss(self, logits: torch.Tensor, peer_logits: torch.Tensor) -> torch.Tensor:
        peer = torch.softmax(peer_logits.detach().float(), 1)
        if self.params.unlabelled_loss == "cps":
            return cross_pseudo_loss(logits.float(), peer)
        return unified_segmentation_loss(logits.float(), peer, self.params.confidence)

    def training_step(self, batches: dict[str, Batch], step: int) -> dict[str, torch.Tensor]:
        labelled, unlabelled = batches["labelled"], batches.get("unlabelled")
        if unlabelled is None:
            raise ValueError("llm_segnet needs an unlabelled batch every step (train.unlabelled_batch_size >= 1)")
        p = self.params
        xl, y, xu = labelled.image, labelled.label, unlabelled.image
        n = xl.shape[0]
        w = self.unlabelled_weight(step)
        if step < self.warmup_steps:  # supervised warm-up: labelled images only
            sup_a = dice_ce_loss(self.run(self.net_a, xl), y)
            sup_b = dice_ce_loss(self.run(self.net_b, xl), y)
            zero = torch.zeros((), device=xl.device)
            out = {"loss": sup_a + sup_b, "sup_a": sup_a.detach(), "sup_b": sup_b.detach(), "unsup_a": zero,
                   "unsup_b": zero, "unsup_weight": torch.tensor(0.0)}
            if self.text_embedding is not None:
                out["lambda_a"] = self.net_a.fusion.weight.detach()
                out["lambda_b"] = self.net_b.fusion.weight.detach()
            return out
        box = cutmix_box(xu.shape[2:], p.cutmix_beta, xu.device)
        logits_a = self.run(self.net_a, torch.cat([xl, xu]))
        logits_b = self.run(self.net_b, torch.cat([xl, mix(xu, box)]))
        sup_a = dice_ce_loss(logits_a[:n], y)
        sup_b = dice_ce_loss(logits_b[:n], y)
        mixed_a = mix(logits_a[n:], box)  # A's raw predictions, brought into the CutMix space of B's input
        if p.peer_view == "raw":  # A learns from B's prediction on the images A saw
            with torch.no_grad():
                peer_raw = self.run(self.net_b, xu)
            unsup_a = self.unlabelled_loss(logits_a[n:], peer_raw)
        else:
            unsup_a = self.unlabelled_loss(mixed_a, logits_b[n:])
        unsup_b = self.unlabelled_loss(logits_b[n:], mixed_a)
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

    def labelled_stream(self, ctx):
        """Labelled crops follow train.foreground_crop unless llm_segnet.labelled_crop is 'random'."""
        stream = super().labelled_stream(ctx)
        return replace(stream, foreground_crop=0.0) if self.params.labelled_crop == "random" else stream

    def on_step(self, ctx, step: int) -> None:
        """At step 0: the labelled crop policy and the knowledge text used (provenance)."""
        if step == 0 and self.params.labelled_crop == "random" and self.cfg.train.foreground_crop:
            ctx.log.write(event="llm_segnet_crops", labelled_crop="random",
                          ignored={"train.foreground_crop": self.cfg.train.foreground_crop})
        if step == 0 and self.knowledge_text and ctx.is_main:
            from ..utils import atomic_write_text

            atomic_write_text(ctx.run_dir / "knowledge.txt", self.knowledge_text + "\n")
            ctx.log.write(event="knowledge", knowledge=self.params.knowledge, encoder=self.params.text_encoder,
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
