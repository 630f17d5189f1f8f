"""LLM-SegNet: the unlabelled losses against hand-computed values, CutMix, the text fusion, config errors, and short
real training runs on LA 2018 (tiny V-Nets)."""
import json
import math

import numpy as np
import pytest
import torch

from semiseg.config import ConfigError, config_from_dict
from semiseg.data.cases import discover_cases, load_case
from semiseg.data.sampling import PatchSampler
from semiseg.losses import cross_pseudo_loss, unified_segmentation_loss
from semiseg.methods import build_method, check_params
from semiseg.methods.context import TrainingContext
from semiseg.mixing import cutmix_box, mix
from semiseg.models.text_fusion import TextFiLM, TextFusion
from semiseg.runs import load_predictor
from semiseg.train import train

# Two voxels, two classes. Own logits give p = (0.25, 0.75) and (0.5, 0.5); the peer says q = (0.1, 0.9)
# (confident at tau 0.65, class 1) and (0.6, 0.4) (not confident).
LOGITS = torch.tensor([[[0.0, 0.0], [math.log(3.0), 0.0]]])  # (B=1, K=2, 2 voxels)
PEER = torch.tensor([[[0.1, 0.6], [0.9, 0.4]]])


def test_unified_segmentation_loss_by_hand():
    nll = -math.log(0.75)  # confident voxel: -log p[argmax q]
    mse = ((0.5 - 0.6) ** 2 + (0.5 - 0.4) ** 2) / 2  # other voxel: mean squared error over classes
    # issue 13 (b): the NLL is averaged over the confident voxels, the MSE over the others (one voxel each here);
    # the first version averaged every voxel's term over all voxels, (nll + mse) / 2 (reduction="voxel")
    assert unified_segmentation_loss(LOGITS, PEER, 0.65).item() == pytest.approx(nll + mse, abs=1e-6)
    assert unified_segmentation_loss(LOGITS, PEER, 0.65, "voxel").item() == pytest.approx((nll + mse) / 2, abs=1e-6)
    mse0 = ((0.25 - 0.1) ** 2 + (0.75 - 0.9) ** 2) / 2  # tau above both: MSE everywhere, no confident voxel
    assert unified_segmentation_loss(LOGITS, PEER, 0.95).item() == pytest.approx((mse0 + mse) / 2, abs=1e-6)
    # a 4-voxel case: 1 confident, 3 not; the parts keep their scale whatever the share of confident voxels
    logits = torch.zeros(1, 2, 4)
    peer = torch.tensor([[[0.1, 0.6, 0.6, 0.6], [0.9, 0.4, 0.4, 0.4]]])
    expected = -math.log(0.5) + 0.01  # NLL of p = 0.5 on the confident voxel + MSE 0.1^2 on each other voxel
    assert unified_segmentation_loss(logits, peer, 0.65).item() == pytest.approx(expected, abs=1e-6)


def test_cross_pseudo_loss_by_hand():
    expected = (-math.log(0.75) - math.log(0.5)) / 2  # CE against the peer's argmax (1, 0) on every voxel
    assert cross_pseudo_loss(LOGITS, PEER).item() == pytest.approx(expected, abs=1e-6)


def test_cutmix_uses_every_voxel_once():
    torch.manual_seed(0)
    x = torch.arange(3 * 2 * 8 * 8 * 6, dtype=torch.float32).reshape(3, 2, 8, 8, 6)
    box = cutmix_box((8, 8, 6), beta=4.0)
    assert box.shape == (1, 1, 8, 8, 6) and 0 < box.mean() < 1 and set(box.unique().tolist()) == {0.0, 1.0}
    mixed = mix(x, box)
    assert torch.equal(mixed.flatten().sort().values, x.flatten().sort().values)  # a permutation of the voxels
    inside = box[0, 0].bool()
    assert torch.equal(mixed[0, :, inside], x[2, :, inside]) and torch.equal(mixed[0, :, ~inside], x[0, :, ~inside])


def raw_config(la_dir, cache, **params):
    return {"name": "tiny_llm", "method": "llm_segnet",
            "data": {"root": str(la_dir), "labelled": 2, "val": 1, "max_cases": 5},
            "model": {"name": "vnet", "features": 4},
            "train": {"iterations": 3, "patch_size": [32, 32, 32], "batch_size": 2, "unlabelled_batch_size": 2,
                      "val_every": 3, "checkpoint_every": 3, "optimizer": "adam", "lr": 0.003},
            "infer": {"patch_size": [224, 160, 96], "overlap": 0.0},
            "llm_segnet": {"embedding_cache": str(cache), **params}}


@pytest.fixture(scope="session")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("text_embeddings")


def test_config_errors_name_the_key(la_dir, cache):
    with pytest.raises(ConfigError, match="llm_segnet.unlabelled_loss"):
        check_params(config_from_dict(raw_config(la_dir, cache, unlabelled_loss="kl")))
    with pytest.raises(ConfigError, match="unknown config key 'llm_segnet.tau'.*confidence"):
        check_params(config_from_dict(raw_config(la_dir, cache, tau=0.5)))
    cfg = config_from_dict(raw_config(la_dir, cache, knowledge="no_such_text"))
    with pytest.raises(ConfigError, match="llm_segnet.knowledge.*left_atrium"):
        build_method(cfg, torch.device("cpu"))
    raw = raw_config(la_dir, cache)
    raw["model"]["name"] = "unet3d"
    with pytest.raises(ConfigError, match="llm_segnet.use_text"):
        build_method(config_from_dict(raw), torch.device("cpu"))


def test_text_fusion_on_the_strided_unet(la_dir, cache):
    """The CPU benchmark's network: the text is fused at the strided U-Net's bottom block (128 channels at 1/8 for
    16 features), it changes the prediction, and a supervised strided run's weights start both networks."""
    raw = raw_config(la_dir, cache)
    raw["model"] = {"name": "strided_unet3d", "features": 4}
    cfg = config_from_dict(raw)
    method = build_method(cfg, torch.device("cpu")).eval()
    assert method.net_a.fusion.channels == 32
    sup_raw = {k: v for k, v in raw.items() if k != "llm_segnet"}
    supervised = build_method(config_from_dict({**sup_raw, "method": "supervised"}), torch.device("cpu"))
    assert method.load_initial_weights(supervised.state_dict(), "sup.pt") == 2 * len(supervised.net.state_dict())
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        before = method.predict_logits(x)
        method.text_embedding.copy_(-method.text_embedding)
        assert not torch.equal(before, method.predict_logits(x))


def test_text_reaches_the_prediction_and_both_nets_learn(la_dir, cache):
    torch.manual_seed(0)
    cfg = config_from_dict(raw_config(la_dir, cache))
    method = build_method(cfg, torch.device("cpu"))
    assert method.text_embedding.shape == (384,)
    cases = [load_case(c, "none", 2) for c in discover_cases(la_dir)[:3]]
    lab = PatchSampler(cases[:2], (32, 32, 32), 1, seed=0, foreground_prob=1.0).next_batch()
    unl = PatchSampler(cases[2:], (32, 32, 32), 2, seed=1).next_batch()
    unl.label = None
    opt = torch.optim.Adam(method.parameters(), lr=0.003)
    first = None
    for step in range(8):  # past the ramp-up: the unlabelled terms count fully
        out = method.training_step({"labelled": lab, "unlabelled": unl}, step=100)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        first = first or {k: float(v.detach()) for k, v in out.items()}
    assert float(out["sup_a"]) < first["sup_a"] and float(out["sup_b"]) < first["sup_b"]
    assert float(out["lambda_a"]) != pytest.approx(0.1) and float(out["lambda_b"]) != pytest.approx(0.1)
    method.eval()
    with torch.no_grad():
        x = unl.image[:1]
        before = method.predict_logits(x)
        method.text_embedding.copy_(-method.text_embedding)  # another text changes the prediction (a little:
        assert not torch.equal(before, method.predict_logits(x))  # lambda * Linear(t) starts small)
        method.text_embedding.copy_(-method.text_embedding)
        pa = torch.softmax(method.run(method.net_a, x), 1)
        pb = torch.softmax(method.run(method.net_b, x), 1)
        torch.testing.assert_close(torch.softmax(method.predict_logits(x), 1), (pa + pb) / 2)


def test_trains_end_to_end_and_the_run_predicts(la_dir, cache, tmp_path):
    cfg = config_from_dict(raw_config(la_dir, cache))
    result = train(cfg, tmp_path / "run", quiet=True)
    assert 0 <= result["summary"]["overall"]["dice"]["mean"] <= 1
    log = [json.loads(line) for line in open(tmp_path / "run" / "log.jsonl")]
    assert any(r["event"] == "knowledge" and r["dim"] == 384 for r in log)
    train_rec = [r for r in log if r["event"] == "train"][-1]
    assert {"sup_a", "sup_b", "unsup_a", "unsup_b", "lambda_a", "lambda_b"} <= set(train_rec)
    assert "left atrium" in (tmp_path / "run" / "knowledge.txt").read_text()
    state = torch.load(tmp_path / "run" / "checkpoints" / "best.pt", weights_only=False)["method"]
    assert "text_embedding" in state  # the checkpoint keeps the text it was trained with
    pred = load_predictor(tmp_path / "run", device="cpu")
    case = load_case(discover_cases(la_dir)[0], "none", 2)
    probs = pred.predict_array(case.image)
    assert probs.shape == (2,) + case.image.shape[1:]
    np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-4)


def _not_a_bias(delta: torch.Tensor) -> float:
    """Share of a bottleneck change (B, C, *spatial) that no per-channel constant explains: |delta - its spatial
    mean per channel| / |delta| (0 for a bias)."""
    flat = delta.flatten(2)
    return float((flat - flat.mean(-1, keepdim=True)).norm() / flat.norm().clamp_min(1e-12))


def test_text_branch_acts_by_more_than_a_bias(la_dir):
    """Issue 13 (c): two different texts change the fused bottleneck of a real LA patch differently at each voxel
    (FiLM on the channel-normalised features), not by a per-channel constant as the additive form did; the change
    is a sizeable share of the bottleneck at the start (near identity, but not negligible) and reaches the logits."""
    from semiseg.models import build_model

    torch.manual_seed(0)
    case = load_case(discover_cases(la_dir)[0], "none", 2)
    x = PatchSampler([case], (64, 64, 48), 2, seed=0, foreground_prob=1.0).next_batch().image
    net = build_model("vnet", 1, 2, features=4).train()  # batch statistics: a bottleneck of realistic scale
    with torch.no_grad():
        feat = net.encode(x)[-1]  # (2, 64, 4, 4, 3)
    t1, t2 = torch.nn.functional.normalize(torch.randn(2, 384), dim=1)
    film, bias = TextFiLM(384, feat.shape[1], 0.1), TextFusion(384, feat.shape[1], 0.1)
    with torch.no_grad():
        d_film = film(feat, t1) - film(feat, t2)
        d_bias = bias(feat, t1) - bias(feat, t2)
        start = (film(feat, t1) - feat).norm() / feat.norm()
    assert _not_a_bias(d_bias) < 1e-4  # the first version: a constant per channel
    # FiLM: the change varies over the grid about as much as the bottleneck itself does (measured 0.69 vs 0.83)
    assert _not_a_bias(d_film) > 0.5 * _not_a_bias(feat)
    assert 0.05 < float(start) < 0.5  # the fused term starts small against the bottleneck (measured 0.20; the
    # additive form started at 0.005), but not negligible
    # through a whole text-guided V-Net: the logits move, and gradients reach the text projection and lambda
    from semiseg.models.text_fusion import TextGuidedNet

    guided = TextGuidedNet(net, 384, 0.1)
    out1 = guided(x, t1)
    with torch.no_grad():
        out2 = guided(x, t2)
    assert float((out1.detach() - out2).norm() / out1.detach().norm()) > 1e-3
    out1.logsumexp(1).mean().backward()
    assert guided.fusion.proj.weight.grad.abs().sum() > 0 and guided.fusion.weight.grad.abs() > 0


def test_warm_up_warm_start_and_crop_policy(la_dir, cache, tmp_path):
    """Issue 13 (a): no unlabelled loss before the warm-up ends, then the ramp from there; both networks start from
    a supervised run's weights (train.init_from); the trainer's labelled patches are cropped like the unlabelled ones
    (with labelled_crop: random)."""
    from types import SimpleNamespace

    sup_raw = {k: v for k, v in raw_config(la_dir, cache).items() if k != "llm_segnet"}
    sup_cfg = config_from_dict({**sup_raw, "method": "supervised"})
    supervised = build_method(sup_cfg, torch.device("cpu"))
    cfg = config_from_dict(raw_config(la_dir, cache, warmup=0.5, rampup=0.25, labelled_crop="random"))
    cfg.train.iterations = 100
    method = build_method(cfg, torch.device("cpu"))
    assert [method.unlabelled_weight(s) for s in (0, 49)] == [0.0, 0.0]
    assert 0 < method.unlabelled_weight(50) < method.unlabelled_weight(60) < method.unlabelled_weight(75) == 1.0
    cases = [load_case(c, "none", 2) for c in discover_cases(la_dir)[:3]]
    sampler = PatchSampler(cases[:2], (32, 32, 32), 1, seed=0, foreground_prob=0.5)
    events = []
    ctx = TrainingContext(cfg, labelled=cases[:2], run_dir=tmp_path,
                          log=SimpleNamespace(write=lambda **r: events.append(r)))
    default = build_method(config_from_dict(raw_config(la_dir, cache)), torch.device("cpu"))
    default.on_step(ctx, 0)  # by default labelled crops follow train.foreground_crop
    assert default.params.labelled_crop == "config" and default.streams(ctx)["labelled"].foreground_crop == 0.5
    events.clear()
    method.on_step(ctx, 0)
    assert method.streams(ctx)["labelled"].foreground_crop == 0.0
    assert {e["event"] for e in events} >= {"llm_segnet_crops", "knowledge"}
    assert method.load_initial_weights(supervised.state_dict(), "sup.pt") == 2 * len(supervised.net.state_dict())
    ref = supervised.net.state_dict()
    for net in method.vnets():
        for k, v in net.state_dict().items():
            torch.testing.assert_close(v, ref[k])
    lab = sampler.next_batch()
    unl = PatchSampler(cases[2:], (32, 32, 32), 1, seed=1).next_batch()
    out = method.training_step({"labelled": lab, "unlabelled": unl}, step=10)  # warm-up: supervised terms only
    assert float(out["unsup_weight"]) == 0.0 and float(out["loss"].detach()) == pytest.approx(
        float(out["sup_a"] + out["sup_b"]), rel=1e-6)
    assert float(method.training_step({"labelled": lab, "unlabelled": unl}, step=80)["unsup_weight"]) == 1.0
    with pytest.raises(ConfigError, match="llm_segnet.labelled_crop"):
        check_params(config_from_dict(raw_config(la_dir, cache, labelled_crop="foreground")))


def test_peer_view_raw_takes_a_targets_from_b_on_the_unmixed_images(la_dir, cache):
    """peer_view: raw (TraCoCo's loop): network A learns from B's prediction on the images A saw, not from B's
    prediction on the CutMix view; B still learns from A's prediction mixed; A's term trains A."""
    from semiseg.losses import dice_ce_loss

    cases = [load_case(c, "none", 2) for c in discover_cases(la_dir)[:3]]
    lab = PatchSampler(cases[:2], (32, 32, 32), 1, seed=0, foreground_prob=1.0).next_batch()
    unl = PatchSampler(cases[2:], (32, 32, 32), 2, seed=1).next_batch()
    xl, xu, n = lab.image, unl.image, lab.image.shape[0]
    losses = {}
    for view in ("mixed", "raw"):
        raw = raw_config(la_dir, cache, use_text=False, peer_view=view)
        raw["model"]["norm"] = "instance"  # per-image outputs: a patch's logits do not depend on the batch beside it
        torch.manual_seed(0)
        method = build_method(config_from_dict(raw), torch.device("cpu"))
        torch.manual_seed(1)
        out = method.training_step({"labelled": lab, "unlabelled": unl}, step=100)
        torch.manual_seed(1)
        box = cutmix_box(xu.shape[2:], method.params.cutmix_beta)  # the box the step drew
        with torch.no_grad():
            a, b_raw = method.net_a(xu), method.net_b(xu)
            b_mixed = method.net_b(mix(xu, box))
        peer_of_a = torch.softmax(b_raw if view == "raw" else b_mixed, 1)
        own_a = a if view == "raw" else mix(a, box)
        tau = method.params.confidence
        torch.testing.assert_close(out["unsup_a"], unified_segmentation_loss(own_a, peer_of_a, tau))
        torch.testing.assert_close(out["unsup_b"], unified_segmentation_loss(b_mixed, torch.softmax(mix(a, box), 1),
                                                                             tau))
        losses[view] = float(out["unsup_a"])
        out["loss"].backward()  # A's gradient is its supervised term's plus the unlabelled term's
        total = [p.grad.clone() for p in method.net_a.parameters()]
        method.zero_grad()
        dice_ce_loss(method.net_a(torch.cat([xl, xu]))[:n], lab.label).backward()
        assert any(not torch.allclose(t, p.grad) for t, p in zip(total, method.net_a.parameters()))
    assert losses["raw"] != pytest.approx(losses["mixed"])
    with pytest.raises(ConfigError, match="llm_segnet.peer_view"):
        check_params(config_from_dict(raw_config(la_dir, cache, peer_view="clean")))
