"""SAM-Mix: focal and Dice + BCE losses by hand, closed-form Grad-CAM against autograd, CAM boxes, LoRA adapters
(identity at start, save/load on their own), config errors, and short real runs on ACDC slices with LiteMedSAM
(the loss falls on a repeated slice; checkpoints hold no base SAM weights and reload to the same prediction)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from semiseg.config import ConfigError, load_config
from semiseg.losses import binary_focal_loss, dice_bce_loss
from semiseg.methods import check_params
from semiseg.methods.sam_mix import NEGATIVE_LOGIT, box_from_cam, one_run, volume_presence
from semiseg.models.slice_classifier import SliceClassifier
from semiseg.models.lora import LoRALinear, add_lora, load_lora, lora_state_dict, save_lora

REPO = Path(__file__).resolve().parents[2]
ACDC = REPO.parent / "shared" / "data" / "acdc"
CONFIG = REPO / "Resources" / "configs" / "acdc_sammix.yaml"


def tiny_cfg(*extra):
    return load_config(CONFIG, [f"data.root={ACDC}", "data.max_cases=3", "data.labelled=1", "data.val=1",
                                "model.features=4", "sam_mix.image_level_from=labelled", "sam_mix.cls_batch=2",
                                "sam_mix.seg_batch=1", "train.val_every=1000", "train.checkpoint_every=1000",
                                *extra])


def test_losses_hand_computed():
    # p = 0.5 for a positive: alpha (1 - 0.5)^2 ln 2
    assert binary_focal_loss(torch.zeros(1), torch.ones(1), 0.5, 2.0).item() == pytest.approx(0.5 * 0.25 * math.log(2))
    # gamma 0, alpha 0.25: a negative with logit ln 3 (p = 0.75): 0.75 * -ln(0.25)
    got = binary_focal_loss(torch.tensor([math.log(3)]), torch.zeros(1), 0.25, 0.0).item()
    assert got == pytest.approx(0.75 * math.log(4))
    # all-zero logits on a 2x2 mask with one foreground pixel: BCE ln 2, Dice (2 * 0.5) / (2 + 1) = 1/3
    target = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    assert dice_bce_loss(torch.zeros(1, 2, 2), target).item() == pytest.approx(math.log(2) + 2 / 3, abs=1e-4)


def test_closed_form_grad_cam_matches_autograd():
    torch.manual_seed(0)
    head = SliceClassifier(8, 2, hidden=16).eval()
    emb = torch.randn(3, 8, 5, 5, requires_grad=True)
    cams = head.activation_maps(emb.detach())
    for k in range(2):
        grad, = torch.autograd.grad(head(emb)[:, k].sum(), emb)
        w = grad.mean((2, 3), keepdim=True)
        ref = torch.relu((w * emb).sum(1))
        lo, hi = ref.flatten(1).min(1).values[:, None, None], ref.flatten(1).max(1).values[:, None, None]
        torch.testing.assert_close(cams[:, k], ((ref - lo) / (hi - lo).clamp_min(1e-12)).detach(), atol=1e-5,
                                   rtol=1e-4)


def test_score_pooling_scores_every_position_and_maps_where_it_scored():
    torch.manual_seed(0)
    head = SliceClassifier(3, 1, hidden=2, pooling="scores").eval()
    with torch.no_grad():  # score = 2 * channel 0 - 1 at every position (ReLU passes a positive channel 0)
        head.fc1.weight.zero_(), head.fc1.bias.zero_(), head.fc1.weight[0, 0].fill_(1.0)
        head.fc2.weight.zero_(), head.fc2.weight[0, 0].fill_(2.0), head.fc2.bias.fill_(-1.0)
    emb = torch.rand(2, 3, 4, 5)
    emb[0, 0, 1, 2] = 3.0  # one strong position in the first slice
    score = 2 * emb[:, 0] - 1
    expected = torch.log(torch.exp(score).flatten(1).mean(1, keepdim=True))
    torch.testing.assert_close(head(emb), expected)
    maps = head.activation_maps(emb)[:, 0]
    relu = torch.relu(score)
    lo, hi = relu.flatten(1).min(1).values[:, None, None], relu.flatten(1).max(1).values[:, None, None]
    torch.testing.assert_close(maps, (relu - lo) / (hi - lo))
    assert maps[0].argmax().item() == 1 * 5 + 2
    # a head that averages first would not see the strong position: its logit differs
    mean_first = SliceClassifier(3, 1, hidden=2, pooling="features").eval()
    mean_first.load_state_dict(head.state_dict())
    assert not torch.allclose(mean_first(emb), head(emb))
    with pytest.raises(ValueError, match="pooling"):
        SliceClassifier(3, 1, pooling="max")


def test_volume_presence_uses_the_volume_s_own_range():
    # slices without the structure sit at 0.6 in this volume, with it at 0.8-0.9; slice 4 is a dip inside the run
    prob = np.array([0.6, 0.6, 0.6, 0.85, 0.7, 0.9, 0.8, 0.6, 0.6, 0.6])[:, None]
    assert volume_presence(prob, 0.5, None, -1)[:, 0].all()  # the fixed threshold finds every slice
    # relative 0.5: lo 0.6, hi 0.855 (10th / 90th percentiles), threshold 0.7275: slices 3, 5, 6; the gap of 1 joined
    assert volume_presence(prob, 0.5, 0.5, 1)[:, 0].nonzero()[0].tolist() == [3, 4, 5, 6]
    assert volume_presence(prob, 0.5, 0.5, -1)[:, 0].nonzero()[0].tolist() == [3, 5, 6]
    # a volume where no slice passes the fixed threshold has no structure, whatever its range
    assert not volume_presence(prob - 0.45, 0.5, 0.5, 1).any()


def test_a_finished_run_may_be_rescored_with_other_presence_rules(tmp_path):
    """Presence rules act only at inference, so a run resumes (and is evaluated again) with other values; a key that
    changes training (the box threshold also makes training prompts) still refuses to resume."""
    from semiseg.config import save_config
    from semiseg.errors import RunDirError
    from semiseg.train.rundir import prepare_run_dir

    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.pt").write_bytes(b"")
    save_config(tiny_cfg(), tmp_path / "config.yaml")
    changed = prepare_run_dir(tiny_cfg("sam_mix.presence_relative=0.4", "sam_mix.cls_threshold=0.6"), tmp_path)
    assert changed == ["sam_mix.cls_threshold", "sam_mix.presence_relative"]
    assert "presence_relative: 0.4" in (tmp_path / "config.yaml").read_text()
    with pytest.raises(RunDirError, match="sam_mix.cam_threshold"):
        prepare_run_dir(tiny_cfg("sam_mix.presence_relative=0.4", "sam_mix.cls_threshold=0.6",
                                 "sam_mix.cam_threshold=0.3"), tmp_path)


def test_box_from_cam():
    cam = np.zeros((16, 16), np.float32)
    cam[2:5, 3:9] = 1.0  # largest component: rows 2..4, columns 3..8
    cam[12, 12] = 0.9  # a smaller blob is ignored
    box = box_from_cam(cam, 0.4, scale=4.0, limit=(64, 60))
    assert box.tolist() == [12.0, 8.0, 35.0, 19.0]  # (x0, y0, x1, y1) scaled 4x, last pixel included
    assert box_from_cam(np.zeros((16, 16)), 0.4, 4.0, (64, 60)).tolist() == [15.0, 16.0, 45.0, 48.0]


def test_one_run_joins_short_gaps_and_keeps_the_largest_run():
    found = np.array([1, 0, 0, 0, 1, 1, 0, 1, 1, 0, 0, 1, 1, 1, 0, 0, 0, 0, 1], bool)
    # gap 2: slices 4-13 become one run (gaps of 1 and 2 filled); 0 and 18 stand apart (gaps of 3 and 4)
    assert one_run(found, 2).nonzero()[0].tolist() == list(range(4, 14))
    # gap 1: the runs are 4-8 (four found) and 11-13 (three found): the first wins
    assert one_run(found, 1).nonzero()[0].tolist() == list(range(4, 9))
    # gap 0: no gap is filled, the largest run of found slices is 11-13
    assert one_run(found, 0).nonzero()[0].tolist() == [11, 12, 13]
    assert one_run(found, 10).nonzero()[0].tolist() == list(range(0, 19))
    assert not one_run(np.zeros(5, bool), 2).any()


def test_lora_identity_at_start_and_save_load(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential()
    net.add_module("attn", nn.Module())
    net.attn.qkv, net.attn.proj, net.attn.other = nn.Linear(6, 18), nn.Linear(6, 6), nn.Linear(6, 6)
    x = torch.randn(4, 6)
    before = net.attn.qkv(x)
    assert add_lora(net, rank=2, targets=["qkv", "proj"]) == ["attn.qkv", "attn.proj"]
    assert isinstance(net.attn.qkv, LoRALinear) and not isinstance(net.attn.other, LoRALinear)
    torch.testing.assert_close(net.attn.qkv(x), before)  # B = 0: the base layer's output
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert trainable == {"attn.qkv.lora_a", "attn.qkv.lora_b", "attn.proj.lora_a", "attn.proj.lora_b",
                         "attn.other.weight", "attn.other.bias"}
    with torch.no_grad():
        net.attn.qkv.lora_b.fill_(0.1)
    changed = net.attn.qkv(x)
    save_lora(net, tmp_path / "a.pt", base="x")
    assert set(torch.load(tmp_path / "a.pt")["lora"]) == set(lora_state_dict(net))
    fresh = nn.Sequential()
    fresh.add_module("attn", nn.Module())
    fresh.attn.qkv, fresh.attn.proj, fresh.attn.other = net.attn.qkv.base, net.attn.proj.base, net.attn.other
    add_lora(fresh, rank=2, targets=["qkv", "proj"])
    assert load_lora(fresh, tmp_path / "a.pt") == {"base": "x"}
    torch.testing.assert_close(fresh.attn.qkv(x), changed)
    wrong = nn.Sequential(nn.Linear(6, 6))
    with pytest.raises(ValueError, match="no linear layer"):
        add_lora(wrong, targets=["qkv"])


def test_config_errors_name_the_key():
    for override, key in (("sam_mix.variant=resnet", "sam_mix.variant"),
                          ("sam_mix.cam_threshold=1.5", "sam_mix.cam_threshold"),
                          ("sam_mix.lora_rnk=4", "sam_mix.lora_rnk.*lora_rank"),
                          ("sam_mix.cls_lr_scale=0", "sam_mix.cls_lr_scale"),
                          ("sam_mix.presence_gap=-2", "sam_mix.presence_gap"),
                          ("sam_mix.presence_relative=1.5", "sam_mix.presence_relative"),
                          ("sam_mix.cls_pooling=max", "sam_mix.cls_pooling"),
                          ("sam_mix.box_source=unet", "sam_mix.box_source")):
        with pytest.raises(ConfigError, match=key):
            check_params(tiny_cfg(override))
    with pytest.raises(ConfigError, match="sam_mix.box_source.*labelled slices.*frozen_sam"):
        check_params(tiny_cfg("sam_mix.box_source=mask_head", "sam_mix.variant=frozen_sam"))


@pytest.mark.parametrize("box_source", ["cam", "mask_head"])
def test_frozen_encoder_run_learns_and_reloads(tmp_path, box_source):
    """Frozen encoder (cached embeddings): a few real steps on one labelled slice lower its loss (reference box,
    measured before and after); the classifier (and the box head) learn at ``cls_lr_scale`` times the decoder's
    rate; the checkpoint holds the decoder, classifier and box head but no encoder weights and reloads to the same
    prediction."""
    from semiseg.runs import load_predictor
    from semiseg.train.trainer import Trainer

    cfg = tiny_cfg("sam_mix.lora_rank=0", "sam_mix.labelled_slices=1", "sam_mix.train_prompt=gt",
                   "sam_mix.box_jitter=0.0", "sam_mix.cls_batch=1", "train.lr=0.0003", "train.iterations=5",
                   f"sam_mix.box_source={box_source}")
    trainer = Trainer(cfg, tmp_path / "run", quiet=True)
    method = trainer.method
    method.on_step(trainer.context, 0)
    assert trainer.samplers == {}  # SAM-Mix draws from its slice sets, not from trainer streams
    assert len(method.seg_items) == 1 and len(method.cls_items) == trainer.labelled[0].image.shape[1]
    item = method.seg_items[0]

    def seg_loss() -> float:
        with torch.no_grad():
            return float(method._seg_loss(method.embed(item.pixels[None]), [item], item.label[None]))

    before = seg_loss()
    for step in range(5):
        method.on_step(trainer.context, step)
        parts = trainer.train_step()
        trainer.step += 1
    assert seg_loss() < before
    assert ("box" in parts) == (box_source == "mask_head")
    lr_of = {id(q): g["lr"] for g in trainer.optimizer.param_groups for q in g["params"]}
    decoder_lr = lr_of[id(next(method.sam.mask_decoder.parameters()))]
    assert lr_of[id(method.classifier.fc1.weight)] == pytest.approx(method.params.cls_lr_scale * decoder_lr)
    assert method.params.cls_lr_scale == 10.0 and decoder_lr > 0
    trainer.save("best.pt")
    state = torch.load(tmp_path / "run" / "checkpoints" / "best.pt", weights_only=False)["method"]
    assert not any(k.startswith("sam.image_encoder") for k in state)
    assert any(k.startswith("sam.mask_decoder") for k in state) and "classifier.fc1.weight" in state
    assert ("box_head.out.weight" in state) == (box_source == "mask_head")
    if box_source == "mask_head":
        assert lr_of[id(method.box_head.out.weight)] == pytest.approx(method.params.cls_lr_scale * decoder_lr)
    case = trainer.val[0]
    method.eval()
    ours = trainer.predictor().predict_array(case.image[:, 4:5])  # one slice
    again = load_predictor(tmp_path / "run", device="cpu").predict_array(case.image[:, 4:5])
    np.testing.assert_allclose(ours, again, atol=1e-5)
    assert ours.shape == (4, 1) + case.image.shape[2:]


def test_box_head_boxes_find_the_structure_it_learned(tmp_path):
    """``box_source: mask_head``: trained (its own loss only) on one real labelled slice, the box head's probability
    map gives a box that overlaps the slice's reference box, and the thresholded map is what a dense prompt gets."""
    from semiseg.methods.sam_mix import box_from_mask
    from semiseg.train.trainer import Trainer

    cfg = tiny_cfg("sam_mix.lora_rank=0", "sam_mix.labelled_slices=1", "sam_mix.box_source=mask_head")
    method = Trainer(cfg, tmp_path / "run", quiet=True).method
    item = method.seg_items[0]
    emb = method.embed(item.pixels[None])
    torch.manual_seed(0)
    opt = torch.optim.Adam(method.box_head.parameters(), 1e-3)
    for _ in range(80):
        loss = method._box_head_loss(emb, item.label[None])
        opt.zero_grad()
        loss.backward()
        opt.step()
    method.eval()
    boxes, maps = method.own_boxes(emb, [item.size])
    label = item.label.numpy()
    for k in range(method.k):
        if not (label == k + 1).any():
            continue
        a, b = boxes[0, k], box_from_mask(label == k + 1)
        inter = np.prod(np.clip(np.minimum(a[2:], b[2:]) - np.maximum(a[:2], b[:2]) + 1, 0, None))
        iou = inter / (np.prod(a[2:] - a[:2] + 1) + np.prod(b[2:] - b[:2] + 1) - inter)
        assert iou > 0.5, (k, a, b)
    assert set(np.unique(maps.numpy())) <= {0.0, 1.0} and maps.sum() > 0


def test_lora_step_trains_adapters_only_in_encoder(tmp_path):
    """One real step with LoRA on LiteMedSAM: adapters and decoder move, base encoder weights do not; the adapters
    save and load apart from the base checkpoint; inference on a slice gives no foreground where absent."""
    from semiseg.models.lora import load_lora
    from semiseg.train.trainer import Trainer

    cfg = tiny_cfg("sam_mix.labelled_slices=2", "sam_mix.cls_batch=1", "train.iterations=1", "train.lr=0.01")
    trainer = Trainer(cfg, tmp_path / "run", quiet=True)
    m = trainer.method
    base = m.sam.image_encoder.layers[1].blocks[0].attn.qkv.base.weight.clone()
    decoder = next(m.sam.mask_decoder.parameters()).clone()
    m.on_step(trainer.context, 0)
    trainer.train_step()
    lora = lora_state_dict(m)
    assert len(lora) == 2 * 20  # qkv and proj of the 10 attention blocks of LiteMedSAM's TinyViT
    assert any(v.abs().sum() > 0 for k, v in lora.items() if k.endswith("lora_b"))
    torch.testing.assert_close(m.sam.image_encoder.layers[1].blocks[0].attn.qkv.base.weight, base)
    assert not torch.equal(next(m.sam.mask_decoder.parameters()), decoder)
    m.save_adapters(tmp_path / "lora.pt")
    fresh = type(m)(cfg, torch.device("cpu"))
    meta = load_lora(fresh, tmp_path / "lora.pt")
    assert meta["base"]["model"] == "lite_medsam"
    for k, v in lora_state_dict(fresh).items():
        torch.testing.assert_close(v, lora[k])
    # a blank slice: the classifier's verdict decides, and absent structures get the fixed negative logit
    m.eval()
    with torch.no_grad():
        m.classifier.fc2.bias.fill_(-50.0)
        logits = m.predict_logits(torch.zeros(1, 1, 40, 30))
    assert logits.shape == (1, 4, 40, 30)
    torch.testing.assert_close(logits[:, 1:], torch.full_like(logits[:, 1:], NEGATIVE_LOGIT))


LA = REPO.parent / "shared" / "data" / "la2018"
LA_CONFIG = REPO / "Resources" / "configs" / "la2018_sammix.yaml"


def _bn_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: b.detach().clone() for n, b in module.named_buffers() if "running_" in n or "num_batches" in n}


def test_frozen_encoder_stays_in_eval_mode_and_predict_matches_in_run_validation(tmp_path):
    """Issue 13: ``method.train()`` must not put LiteMedSAM's frozen TinyViT encoder (27 BatchNorm layers) in train
    mode, a training step must leave its running statistics alone, and a reloaded run (``semiseg predict``) must
    predict what in-run validation predicts, on a real LA 2018 axial slice. Frozen encoder with cached embeddings
    (the benchmark setting); the cache is cleared before reloading so that it cannot hide a difference."""
    from semiseg.infer import Predictor
    from semiseg.methods import sam_mix
    from semiseg.runs import load_predictor
    from semiseg.train.trainer import Trainer

    cfg = load_config(LA_CONFIG, [f"data.root={LA}", "data.max_cases=3", "data.labelled=1", "data.val=1",
                                  "sam_mix.image_level_from=labelled", "sam_mix.labelled_slices=2",
                                  "sam_mix.lora_rank=0", "sam_mix.cls_batch=2", "sam_mix.seg_batch=1",
                                  "train.iterations=2", "train.val_every=1000", "train.checkpoint_every=1000",
                                  "train.lr=0.001"])
    trainer = Trainer(cfg, tmp_path / "run", quiet=True)
    m = trainer.method
    encoder = m.sam.image_encoder
    norms = [b for b in encoder.modules() if isinstance(b, nn.modules.batchnorm._BatchNorm)]
    assert len(norms) == 27
    stats = _bn_state(encoder)
    m.train()  # what Trainer.fit and Trainer.validate do
    assert m.training and m.classifier.training and m.sam.mask_decoder.training
    assert not any(b.training for b in norms) and not m.sam.prompt_encoder.training
    sam_mix._EMBEDDINGS.clear()  # embeddings are computed now, by the training steps
    for step in range(2):
        m.on_step(trainer.context, step)
        trainer.train_step()
        trainer.step += 1
    assert not any(b.training for b in norms)
    for name, value in _bn_state(encoder).items():
        torch.testing.assert_close(value, stats[name], rtol=0, atol=0)
    trainer.save("best.pt")
    case = trainer.val[0]
    k = int(np.argmax((case.label > 0).sum((0, 1))))  # the axial slice with most atrium
    sl = case.image[..., k:k + 1]
    m.eval()  # in-run validation: Trainer.validate's predictor
    ours = trainer.predictor().predict_array(sl)
    seen = []  # a slice larger than SAM's input reaches the network whole, as in training, not in 256 windows

    def recording(x):
        seen.append(tuple(x.shape[-2:]))
        return m.predict_logits(x)
    big = np.pad(sl, [(0, 0), (0, 300 - sl.shape[1]), (0, 300 - sl.shape[2]), (0, 0)], mode="edge")
    Predictor(recording, cfg, m.device, whole_image=m.whole_image_inference).predict_array(big)
    assert seen == [(300, 300)]
    sam_mix._EMBEDDINGS.clear()
    again = load_predictor(tmp_path / "run", device="cpu").predict_array(sl)
    assert ours.shape == (2,) + sl.shape[1:]
    np.testing.assert_allclose(again, ours, atol=1e-4)


def test_decode_path_is_the_engines():
    """SAM-Mix and the SAM engine share one implementation: on a real LA 2018 axial slice (183 x 140, so resized
    and padded into LiteMedSAM's 256 frame) and a box around the atrium, SAM-Mix's embedding and untrained decoder
    give exactly the mask ``SamEngine.segment`` gives for the same uint8 slice and box."""
    from semiseg.io import Image, read_image, read_label
    from semiseg.methods.sam_mix import SamMix
    from semiseg.sam import Prompt, SamEngine
    from semiseg.sam.backends import crop_to_slice, resized_size
    from semiseg.sam.prompts import prompts_from_mask

    case = sorted((LA / "imagesTr").glob("*.nii.gz"))[0]
    image, label = read_image(case).array, read_label(LA / "labelsTr" / case.name).array
    k = int(np.argmax((label > 0).sum((0, 1))))
    m = SamMix(tiny_cfg("sam_mix.lora_rank=0"), torch.device("cpu")).eval()
    pixels = m.to_uint8(torch.from_numpy(np.ascontiguousarray(image[..., k]))[None, None].float())
    h, w = pixels.shape[-2:]
    size = resized_size(h, w, m.input_size)
    assert size == (256, 196)
    box = prompts_from_mask(label[..., k])[0].box
    with torch.no_grad():
        scale = torch.tensor([size[1] / w, size[0] / h] * 2)
        logits = m.decode(m.embed(pixels), torch.tensor([box]) * scale, None)
        ours = crop_to_slice(logits[None], (h, w), size)[0, 0].numpy() > 0
    engine = SamEngine(m.backend).segment(Image(pixels[0, 0].numpy(), (1.0, 1.0)), [Prompt(box=box)])
    theirs = engine.label.array > 0
    assert theirs.sum() > 100 and np.array_equal(ours, theirs)


def test_prompt_sources_score_the_model_and_reference_prompts(tmp_path):
    """prompt_sources: its 'model' source is exactly what the predictor segments, and reference boxes given to the
    released decoder segment ACDC far better than the CAM boxes of an untrained classifier."""
    from dataclasses import replace

    from semiseg.evaluate import labels_from
    from semiseg.methods.sam_mix import prompt_sources
    from semiseg.metrics import dice_score
    from semiseg.train.trainer import Trainer

    cfg = tiny_cfg("sam_mix.variant=frozen_sam", "sam_mix.lora_rank=0")
    trainer = Trainer(cfg, tmp_path / "run", quiet=True)
    full = trainer.val[0]
    mid = full.image.shape[1] // 2
    case = replace(full, image=full.image[:, mid - 1:mid + 2], label=full.label[mid - 1:mid + 2])
    [row] = prompt_sources(trainer.method, [case])
    pred = labels_from(trainer.predictor().predict_array(case.image), cfg)
    structures = [k for k in (1, 2, 3) if (case.label == k).any()]
    assert row["model"] == pytest.approx(np.mean([dice_score(pred == k, case.label == k) for k in structures]))
    assert row["true_boxes"] > 0.4 and row["true_boxes"] > row["model"] + 0.2  # measured 0.53 against 0.0
