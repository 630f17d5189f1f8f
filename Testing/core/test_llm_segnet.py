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
from semiseg.infer import load_predictor
from semiseg.methods import build_method
from semiseg.methods.llm_segnet import cross_pseudo_loss, cutmix_box, mix, unified_segmentation_loss
from semiseg.train import train

# Two voxels, two classes. Own logits give p = (0.25, 0.75) and (0.5, 0.5); the peer says q = (0.1, 0.9)
# (confident at tau 0.65, class 1) and (0.6, 0.4) (not confident).
LOGITS = torch.tensor([[[0.0, 0.0], [math.log(3.0), 0.0]]])  # (B=1, K=2, 2 voxels)
PEER = torch.tensor([[[0.1, 0.6], [0.9, 0.4]]])


def test_unified_segmentation_loss_by_hand():
    nll = -math.log(0.75)  # confident voxel: -log p[argmax q]
    mse = ((0.5 - 0.6) ** 2 + (0.5 - 0.4) ** 2) / 2  # other voxel: mean squared error over classes
    assert unified_segmentation_loss(LOGITS, PEER, 0.65).item() == pytest.approx((nll + mse) / 2, abs=1e-6)
    mse0 = ((0.25 - 0.1) ** 2 + (0.75 - 0.9) ** 2) / 2  # tau above both: MSE everywhere
    assert unified_segmentation_loss(LOGITS, PEER, 0.95).item() == pytest.approx((mse0 + mse) / 2, abs=1e-6)


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
        config_from_dict(raw_config(la_dir, cache, unlabelled_loss="kl"))
    with pytest.raises(ConfigError, match="unknown config key 'llm_segnet.tau'.*confidence"):
        config_from_dict(raw_config(la_dir, cache, tau=0.5))
    cfg = config_from_dict(raw_config(la_dir, cache, knowledge="no_such_text"))
    with pytest.raises(ConfigError, match="llm_segnet.knowledge.*left_atrium"):
        build_method(cfg, torch.device("cpu"))
    raw = raw_config(la_dir, cache)
    raw["model"]["name"] = "unet3d"
    with pytest.raises(ConfigError, match="llm_segnet.use_text"):
        build_method(config_from_dict(raw), torch.device("cpu"))


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
    for step in range(8):
        out = method.training_step(lab, unl, step=100)  # past the ramp-up: the unlabelled terms count fully
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
