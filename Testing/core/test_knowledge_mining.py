"""Knowledge mining from SAM: gate, masked pseudo-label loss, ramp, config errors, checkpointed pseudo-labels and a
short real run on Kvasir-SEG with LiteMedSAM (mining, provenance files, resume without re-mining)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from semiseg.config import ConfigError, load_config
from semiseg.data.sampling import Batch
from semiseg.methods import check_params
from semiseg.methods.knowledge_mining import IGNORE, KnowledgeMining, foreground_dice, gate

REPO = Path(__file__).resolve().parents[2]
DATA = REPO.parent / "shared" / "data"
KVASIR = DATA / "kvasir-seg"
CONFIG = REPO / "Resources" / "configs" / "kvasir_km.yaml"


def tiny_cfg(*extra):
    return load_config(CONFIG, [f"data.root={KVASIR}", "model.features=4", "train.patch_size=[64,64]",
                                "train.batch_size=2", "train.unlabelled_batch_size=2", *extra])


def test_gate_hand_computed():
    sam = np.zeros((2, 10, 10), np.uint8)  # a "volume" of two slices along axis 0
    model = np.zeros_like(sam)
    sam[0, 2:6, 2:6] = 1  # 16 px
    model[0, 2:6, 2:4] = 1  # 8 px inside: Dice = 2*8 / 24 = 0.6667
    sam[1, 0:2, 0:2] = 1
    model[1, 0:2, 0:2] = 1  # identical: Dice 1
    slices = [{"index": 0, "prompts": [{"label": 1, "iou": 0.9}]},
              {"index": 1, "prompts": [{"label": 1, "iou": 0.7}]}]
    out, decisions = gate(sam, model, slices, axis=0, min_iou=0.8, min_agreement=0.5)
    assert [d["accepted"] for d in decisions] == [True, False]  # slice 1 fails on predicted IoU
    assert decisions[0]["agreement"] == pytest.approx(2 / 3, abs=1e-4)
    assert (out[0] == sam[0]).all() and (out[1] == IGNORE).all()
    out, decisions = gate(sam, model, slices, axis=0, min_iou=0.5, min_agreement=0.7)
    assert [d["accepted"] for d in decisions] == [False, True]  # slice 0 fails on agreement
    # IGNORE pixels are left out of the pseudo-label Dice: only slice 1 counts, where it is perfect
    assert foreground_dice(out, model, 2) == pytest.approx(1.0)


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="knowledge_mining.schedule"):
        check_params(tiny_cfg("knowledge_mining.schedule=sometimes"))
    with pytest.raises(ConfigError, match="knowledge_mining.min_iou"):
        check_params(tiny_cfg("knowledge_mining.min_iou=1.5"))
    with pytest.raises(ConfigError, match="knowledge_mining.sam_grid"):
        check_params(tiny_cfg("knowledge_mining.sam_grid=native"))
    with pytest.raises(ConfigError, match="knowledge_mining.warmpu.*warmup"):
        check_params(tiny_cfg("knowledge_mining.warmpu=3"))
    cfg = load_config(REPO / "Resources" / "configs" / "la2018_supervised.yaml", ["method=knowledge_mining"])
    with pytest.raises(ConfigError, match="model.name"):
        KnowledgeMining(cfg, torch.device("cpu"))


def test_ramp_and_masked_pseudo_loss():
    torch.manual_seed(0)
    m = KnowledgeMining(tiny_cfg("knowledge_mining.weight=2.0", "knowledge_mining.rampup=10"), torch.device("cpu"))
    assert m.pseudo_weight(50) == 0.0  # no mining round yet
    m.first_round_step = 20
    assert m.pseudo_weight(25) == pytest.approx(2.0 * math.exp(-5 * 0.5 ** 2))
    assert m.pseudo_weight(40) == pytest.approx(2.0)

    x = torch.randn(2, 3, 64, 64)
    lab = Batch(x[:1], torch.zeros(1, 64, 64, dtype=torch.long), ["a"])
    pl_label = torch.randint(0, 2, (1, 64, 64))
    ignored = pl_label.clone()
    ignored[:, :32] = IGNORE
    m.eval()  # fixed batch-norm statistics: the two losses below see the same logits
    out = m.training_step({"labelled": lab, "pseudo": Batch(x[1:], ignored, ["b"])}, 40)
    assert set(out) >= {"loss", "sup", "pseudo", "pseudo_weight"}
    # the masked loss equals Dice+CE computed by hand on the valid half only
    from semiseg.losses import dice_ce_loss

    logits = m.net(x[1:])
    valid = torch.zeros(1, 64, 64)
    valid[:, 32:] = 1
    expected = dice_ce_loss(logits, torch.where(valid.bool(), pl_label, 0), weight=valid)
    assert out["pseudo"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert out["loss"].item() == pytest.approx(out["sup"].item() + 2.0 * expected.item(), rel=1e-5)


def test_pseudolabels_survive_the_checkpoint():
    cfg = tiny_cfg()
    a = KnowledgeMining(cfg, torch.device("cpu"))
    a.pseudo = {"x": np.eye(5, dtype=np.uint8) * IGNORE, "y": np.ones((3, 4, 2), np.uint8)}
    a.round, a.first_round_step, a.next_round_step = 2, 7, 12
    b = KnowledgeMining(cfg, torch.device("cpu"))
    b.load_state_dict(a.state_dict())
    assert (b.round, b.first_round_step, b.next_round_step) == (2, 7, 12)
    assert set(b.pseudo) == {"x", "y"} and all((b.pseudo[k] == a.pseudo[k]).all() for k in a.pseudo)


@pytest.mark.skipif(not KVASIR.exists(), reason="needs ../shared/data/kvasir-seg")
def test_real_run_mines_saves_and_resumes(tmp_path):
    from semiseg.train import train

    # the U-Net++ trains on a 128 px grid; SAM segments the stored 256 px images (sam_grid: source)
    over = ["data.max_cases=12", "data.labelled=3", "data.unlabelled=3", "data.val=2", "train.val_every=100",
            "data.target_spacing=2.0", "train.checkpoint_every=1", "infer.patch_size=[128,128]",
            "knowledge_mining.warmup=2",
            "knowledge_mining.rampup=1", "knowledge_mining.min_iou=0.0", "knowledge_mining.min_agreement=0.0",
            "knowledge_mining.min_area=1", "knowledge_mining.threshold=0.3",
            f"knowledge_mining.embedding_cache={tmp_path / 'embeddings'}"]
    run = tmp_path / "run"
    train(tiny_cfg("train.iterations=3", *over), run, quiet=True, evaluate_val=False)
    events = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    mining = [e for e in events if e["event"] == "mining"]
    assert len(mining) == 1 and mining[0]["step"] == 2 and mining[0]["cases"] == 3
    assert mining[0]["model_dice"] is not None  # scored against the hidden references
    assert mining[0]["encoded"] == mining[0]["prompted"] > 0  # each prompted image encoded once (jitter reuses it)
    assert len(list((tmp_path / "embeddings").glob("*.pt"))) == mining[0]["encoded"]
    state = torch.load(run / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)
    restored = KnowledgeMining(tiny_cfg(*over), torch.device("cpu"))
    restored.load_state_dict(state["method"])
    assert len(restored.pseudo) == mining[0]["accepted"]
    for cid, label in restored.pseudo.items():  # the run directory holds the same masks, with provenance
        prov = json.loads((run / "pseudo_labels" / f"{cid}.json").read_text())
        assert prov["backend"] == "litemedsam" and prov["round"] == 1 and prov["accepted"]
        assert prov["gate"]["decisions"][0]["iou"] > 0
        from semiseg.data.resample import resample_label
        from semiseg.io import read_label

        written = read_label(run / "pseudo_labels" / f"{cid}.png").array  # on the image's own 256 px grid
        assert label.shape == (128, 128) and written.shape == (256, 256)
        assert (resample_label(written, label.shape) == label).all()
        blocks = written.reshape(128, 2, 128, 2).transpose(0, 2, 1, 3).reshape(128, 128, 4)
        assert (blocks.min(-1) != blocks.max(-1)).any()  # SAM's edges are finer than the training grid
    # resume to 5 iterations: no second round (one_time), the checkpointed pseudo-labels keep training
    train(tiny_cfg("train.iterations=5", *over), run, quiet=True, evaluate_val=False)
    events = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events].count("mining") == 1
    assert any(e["event"] == "resumed" for e in events)
    last = [e for e in events if e["event"] == "train"][-1]
    if restored.pseudo:
        assert last["step"] == 5 and "pseudo" in last
    # another run mining the same images (another seed or setting) reads SAM's embeddings from the shared folder
    again = tmp_path / "again"
    train(tiny_cfg("train.iterations=3", *over), again, quiet=True, evaluate_val=False)
    rerun = [json.loads(line) for line in (again / "log.jsonl").read_text().splitlines()]
    rerun = [e for e in rerun if e["event"] == "mining"]
    assert rerun[0]["encoded"] == 0 and rerun[0]["accepted"] == mining[0]["accepted"]


@pytest.mark.parametrize("sam_grid", ["source", "working"])
def test_sam_sees_the_chosen_grid(sam_grid):
    """With data.target_spacing, SAM gets the stored image (and the U-Net++'s probabilities resampled to it) or the
    training grid's image, as ``knowledge_mining.sam_grid`` says."""
    from semiseg.data.cases import discover_cases, load_case

    cfg = tiny_cfg("data.target_spacing=2.0", f"knowledge_mining.sam_grid={sam_grid}")
    source = discover_cases(KVASIR)[0]
    case = load_case(source, "rgb", 2, with_label=False, target_spacing=2.0)
    prob = np.zeros((2, 128, 128), np.float32)
    prob[1, 40:80, 30:90] = 1.0
    prob[0] = 1.0 - prob[1]
    image, sam_prob = KnowledgeMining(cfg, torch.device("cpu"))._sam_inputs(case, source, prob)
    size = 256 if sam_grid == "source" else 128
    assert image.array.shape == (size, size, 3) and sam_prob.shape == (2, size, size)
    assert np.allclose(sam_prob.sum(0), 1.0, atol=1e-5)
    box = np.argwhere(sam_prob[1] > 0.5)
    assert box.min(0).tolist() == [40 * size // 128, 30 * size // 128]


def test_gate_with_stability():
    sam = np.zeros((2, 10, 10), np.uint8)
    sam[:, 2:6, 2:6] = 1
    slices = [{"index": 0, "prompts": [{"label": 1, "iou": 0.9}]}, {"index": 1, "prompts": [{"label": 1, "iou": 0.9}]}]
    stability = {(0, 1): 0.95, (1, 1): 0.6}
    out, decisions = gate(sam, sam, slices, axis=0, min_iou=0.5, min_agreement=0.5, stability=stability,
                          min_stability=0.8)
    assert [d["accepted"] for d in decisions] == [True, False]  # slice 1's mask falls apart under jitter
    assert [d["stability"] for d in decisions] == [0.95, 0.6]
    assert (out[1] == IGNORE).all() and (out[0] == sam[0]).all()


@pytest.mark.skipif(not KVASIR.exists(), reason="needs ../shared/data/kvasir-seg")
def test_prompt_stability_on_a_real_polyp():
    from semiseg.io import read_image, read_label
    from semiseg.sam import SamEngine, build_backend, prompt_stability, pseudolabel_from_mask

    image = read_image(KVASIR / "images" / sorted(p.name for p in (KVASIR / "images").iterdir())[0])
    ref = read_label(KVASIR / "masks" / (Path(image.path).stem + ".jpg")).array
    engine = SamEngine(build_backend("litemedsam", device="cpu"))
    result = pseudolabel_from_mask(engine, image, ref)
    mask, slices = result.label.array, result.provenance["slices"]
    still = prompt_stability(engine, image, mask, slices, jitter=0.0, n=2)
    assert still == {(0, 1): pytest.approx(1.0)}  # unmoved boxes give the same mask
    small = prompt_stability(engine, image, mask, slices, jitter=0.05, n=4)[(0, 1)]
    large = prompt_stability(engine, image, mask, slices, jitter=0.6, n=4)[(0, 1)]
    assert 0.0 <= large < small <= 1.0  # the further the box moves, the more the mask changes


@pytest.mark.skipif(not KVASIR.exists(), reason="needs ../shared/data/kvasir-seg")
def test_mining_starts_from_the_given_checkpoint(tmp_path):
    """train.init_from: knowledge mining begins with the supervised run's network, not a fresh one."""
    from semiseg.config import config_from_dict
    from semiseg.train import train
    from semiseg.train.trainer import Trainer

    over = ["data.max_cases=10", "data.labelled=3", "data.unlabelled=2", "data.val=1", "train.iterations=2",
            "train.val_every=2", "knowledge_mining.warmup=0"]
    sup_cfg = tiny_cfg(*over).to_dict()
    sup_cfg.pop("knowledge_mining")
    sup_cfg["method"] = "supervised"
    train(config_from_dict(sup_cfg), tmp_path / "sup", quiet=True, evaluate_val=False)
    best = torch.load(tmp_path / "sup" / "checkpoints" / "best.pt", map_location="cpu", weights_only=False)
    km = Trainer(tiny_cfg(*over, f"train.init_from={tmp_path / 'sup'}"), tmp_path / "km", quiet=True)
    fresh = {k: v.clone() for k, v in km.method.net.state_dict().items()}
    assert km.try_resume() is False  # nothing to resume: the weights come from init_from instead
    for name, value in km.method.net.state_dict().items():
        torch.testing.assert_close(value, best["method"][f"net.{name}"])
    assert any(not torch.equal(fresh[k], v) for k, v in km.method.net.state_dict().items())
    assert km.method.next_round_step == 0  # warmup 0: the first step mines with the trained network
