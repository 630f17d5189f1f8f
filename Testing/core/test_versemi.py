"""VerSemi: its losses and masks against hand-computed values, the dynamic head against explicit per-sample
convolutions, config errors, and a real two-dataset (LA 2018 + ACDC) training through both stages with resume and
per-task evaluation on each dataset's own grid."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from semiseg.config import ConfigError, config_from_dict
from semiseg.losses import pooled_dice_loss
from semiseg.methods import check_params
from semiseg.methods.versemi import VerSemi, evaluate_run
from semiseg.mixing import cube_masks
from semiseg.models.task_head import TaskPromptedHead

REPO = Path(__file__).resolve().parents[2]
DATA = REPO.parent / "shared" / "data"
needs_data = pytest.mark.skipif(not (DATA / "la2018").is_dir() or not (DATA / "acdc").is_dir(),
                                reason="real data not found at ../shared/data")


def test_dice_loss_hand_computed():
    p = torch.tensor([1.0, 0.5, 0.0, 0.25])
    g = torch.tensor([1.0, 1.0, 0.0, 0.0])
    # inter = 1.5, sum p^2 = 1 + 0.25 + 0.0625 = 1.3125, sum g^2 = 2
    expected = 1 - (3.0 + 1e-5) / (3.3125 + 1e-5)
    assert pooled_dice_loss(p, g).item() == pytest.approx(expected, rel=1e-6)
    assert pooled_dice_loss(torch.zeros(5), torch.zeros(5)).item() == pytest.approx(0.0)  # both empty: no loss


def test_cube_masks_zero_one_box_per_sample():
    g = torch.Generator().manual_seed(0)
    m = cube_masks(3, (16, 30, 12), 2 / 3, generator=g)
    assert m.shape == (3, 16, 30, 12)
    for i in range(3):
        zeros = torch.nonzero(m[i] == 0)
        assert len(zeros) == 10 * 20 * 8  # floor(2/3 * side) per axis
        extent = (zeros.max(0).values - zeros.min(0).values + 1).tolist()
        assert extent == [10, 20, 8]  # one contiguous box
    r = cube_masks(50, (20, 20, 20), (0.3, 0.6), generator=g)
    sides = [round(float((1 - r[i]).sum()) ** (1 / 3)) for i in range(50)]
    assert min(sides) >= 6 and max(sides) <= 12 and len(set(sides)) > 1


def test_task_head_is_a_per_sample_dynamic_convolution():
    torch.manual_seed(0)
    head = TaskPromptedHead(decoder_channels=3, bottleneck_channels=5, num_tasks=3, width=4, layers=2, norm="none")
    assert head.num_parameters_per_sample == (4 * 4 + 4) + (2 * 4 + 2)
    feats, bott = torch.randn(2, 3, 4, 4, 4), torch.randn(2, 5, 2, 2, 2)
    task = torch.tensor([0, 2])
    out = head(feats, bott, task)
    assert out.shape == (2, 2, 4, 4, 4)
    (w1, b1), (w2, b2) = head.dynamic_parameters(bott, task)
    x = head.pre(feats)
    for i in range(2):  # the same as two ordinary 1x1x1 convolutions with this sample's generated weights
        y = F.relu(F.conv3d(x[i:i + 1], w1[i][..., None, None, None], b1[i]))
        y = F.conv3d(y, w2[i][..., None, None, None], b2[i])
        torch.testing.assert_close(out[i:i + 1], y, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(head(feats, bott, torch.tensor([1, 2]))[0], out[0])  # the prompt matters
    with pytest.raises(ValueError, match="task ids"):
        head(feats, bott, torch.tensor([0, 3]))


def _raw(tmp_path: Path | None = None) -> dict:
    raw = yaml.safe_load((REPO / "Resources/configs/versemi_la_acdc.yaml").read_text())
    raw["data"].update(root=str(DATA / "la2018"), max_cases=5, labelled=2, val=1, unlabelled=2, target_spacing=1.25)
    raw["versemi"]["datasets"][1].update(root=str(DATA / "acdc"), max_cases=6, labelled=2, val=1, unlabelled=2,
                                         patch_size=[16, 32, 32], target_spacing=[10, 2, 2])
    raw["model"]["features"] = 4
    raw["train"].update(iterations=4, patch_size=[16, 32, 32], batch_size=1, unlabelled_batch_size=1, val_every=4,
                        checkpoint_every=2, augment=True)
    raw["infer"].update(patch_size=[32, 96, 96], overlap=0.0)
    raw["versemi"]["unlabelled_start"] = 2
    return raw


@pytest.mark.parametrize("edit, key", [
    (lambda r: r["versemi"]["datasets"][0].update(labelled=3), "versemi.datasets[0].labelled"),
    (lambda r: r["versemi"]["datasets"][1]["tasks"].update(myocardium=0), "versemi.datasets[1].tasks.myocardium"),
    (lambda r: r["versemi"]["datasets"][1].pop("root"), "versemi.datasets[1].root"),
    (lambda r: r["versemi"]["datasets"][1].update(spacing=1), "versemi.datasets[1].spacing"),
    (lambda r: r["versemi"].update(cube_ratio_range=[0.6, 0.3]), "versemi.cube_ratio_range"),
    (lambda r: r["versemi"].update(mix_weight=-0.5), "versemi.mix_weight"),
    (lambda r: r["versemi"]["datasets"][0].update(strides=[[1, 2, 2]] * 3), "versemi.datasets[0].strides"),
])
def test_config_errors_name_the_key(edit, key):
    raw = _raw()
    edit(raw)
    with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("]", r"\]")):
        check_params(config_from_dict(raw))


def test_backbone_must_give_decoder_features_and_a_bottleneck():
    raw = _raw()
    raw["model"]["name"] = "unet3d"
    with pytest.raises(ConfigError, match="model.name.*vnet or strided_unet3d"):
        VerSemi(config_from_dict(raw), torch.device("cpu"))
    raw["model"]["name"] = "strided_unet3d"
    raw["versemi"]["full_res_skip"] = True
    with pytest.raises(ConfigError, match="versemi.full_res_skip"):
        VerSemi(config_from_dict(raw), torch.device("cpu"))
    raw["versemi"]["full_res_skip"] = False
    raw["versemi"]["datasets"][1]["strides"] = [[1, 2, 2], [2, 2, 3]]
    with pytest.raises(ConfigError, match=r"versemi.datasets\[1\].strides' must be 1 to 6 levels"):
        VerSemi(config_from_dict(raw), torch.device("cpu"))
    raw["versemi"]["datasets"][1]["strides"] = [[1, 2, 2], [2, 2, 2]]  # valid strides, but not the network's depth
    with pytest.raises(ConfigError, match=r"versemi.datasets\[1\].strides': 2 levels, but the network has 3"):
        VerSemi(config_from_dict(raw), torch.device("cpu"))


def test_strided_unet_backbone_gives_full_resolution_features_and_its_bottom_block():
    """The CPU network as VerSemi's backbone: the head reads the U-Net's last up-convolution (full resolution, as
    wide as the head) and the output of its bottom block from the same pass, and the head's loss reaches the first
    (strided) convolution."""
    raw = _raw()
    raw["model"].update(name="strided_unet3d", features=4)
    vs = VerSemi(config_from_dict(raw), torch.device("cpu"))
    torch.manual_seed(0)
    x = torch.randn(2, 1, 16, 32, 32)
    decoded, bottom = vs.features(x, 0)
    assert vs._bottleneck is None  # nothing kept between passes
    assert decoded.shape == (2, vs.params.head_width, 16, 32, 32) and bottom.shape == (2, 32, 2, 4, 4)
    torch.testing.assert_close(decoded, vs.net(x))
    level, inner = vs.net.model, x
    for _ in range(3):  # MONAI's UNet nests each level as Sequential(down, SkipConnection(next level), up)
        inner = level[0](inner)
        level = level[1].submodule
    torch.testing.assert_close(bottom, level(inner))
    logits = vs.head(decoded, bottom, torch.tensor([0, 2]))
    assert logits.shape == (2, 2, 16, 32, 32)
    logits[:, 1].mean().backward()
    assert vs.net.model[0].conv.weight.grad.abs().sum() > 0
    raw["versemi"]["datasets"][1]["strides"] = [[1, 2, 2], [1, 2, 2], [2, 2, 2]]  # ACDC keeps its slices longer
    vs = VerSemi(config_from_dict(raw), torch.device("cpu"))
    with torch.no_grad():
        (la, la_bottom), (acdc, acdc_bottom), (again, _) = vs.features(x, 0), vs.features(x, 1), vs.features(x, 0)
    assert la_bottom.shape == (2, 32, 2, 4, 4) and acdc_bottom.shape == (2, 32, 8, 4, 4)
    assert acdc.shape == la.shape and not torch.allclose(acdc, la)
    torch.testing.assert_close(again, la)  # LA's patches get their own strides back


@needs_data
def test_strided_unet_backbone_trains_both_stages_and_predicts_after_reload(tmp_path):
    """A real LA + ACDC run on the CPU network through stage 2; `semiseg predict --run` (a reload from the
    checkpoint, the hook registered again) gives what the trained method gives."""
    from semiseg.io import read_image
    from semiseg.runs import load_method, load_predictor
    from semiseg.train.trainer import Trainer

    raw = _raw()
    raw["model"].update(name="strided_unet3d", features=4)
    raw["train"].update(iterations=2, val_every=2, checkpoint_every=2)
    raw["versemi"]["unlabelled_start"] = 1
    raw["versemi"]["datasets"][1]["strides"] = [[1, 2, 2], [1, 2, 2], [2, 2, 2]]
    trainer = Trainer(config_from_dict(raw), tmp_path / "run", quiet=True)
    result = trainer.fit()
    assert result["step"] == 2 and not result["stopped"]
    logged = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert {"unl", "cube"} <= set([r for r in logged if r["event"] == "train"][-1])  # stage 2 ran
    image = read_image(trainer.manifest.val[0].image)
    trainer.method.eval()
    in_run = trainer.method.predictor("la2018").predict(image)
    reloaded = load_predictor(tmp_path / "run", which="last", device="cpu").predict(image)
    assert in_run.shape == (2, *image.spatial_shape)
    np.testing.assert_allclose(reloaded, in_run, atol=1e-5)
    acdc = trainer.method.data[1]  # its own strides, after LA's prediction and after a reload
    heart = read_image(acdc.manifest.val[0].image)
    reloaded = load_method(tmp_path / "run", which="last", device="cpu")[0].predictor("acdc").predict(heart)
    np.testing.assert_allclose(reloaded, trainer.method.predictor("acdc").predict(heart), atol=1e-5)


@needs_data
def test_two_datasets_both_stages_resume_and_per_task_evaluation(tmp_path):
    from semiseg.data.resample import working_shape
    from semiseg.io import read_image
    from semiseg.runs import load_predictor
    from semiseg.train.trainer import Trainer

    cfg = config_from_dict(_raw())
    run = tmp_path / "run"
    first = Trainer(cfg, run, quiet=True)
    vs: VerSemi = first.method
    stop_after = vs.on_step

    def stop_at_2(ctx, step):  # the same as a SIGTERM after step 2
        stop_after(ctx, step)
        first.stop_requested = step >= 1

    vs.on_step = stop_at_2
    # stage 1 losses on a real batch from both datasets
    vs.setup(first.context)
    stage1 = vs.training_step({}, 0)
    assert set(stage1) == {"loss", "sup", "chaos", "spec"} and torch.isfinite(stage1["loss"])
    stopped = first.fit()  # (the trainer's result also names the signal since its fault handling landed)
    assert stopped["stopped"] is True and stopped["step"] == 2
    saved = {d.name: d.sampler.state_dict() for d in vs.data}

    second = Trainer(cfg, run, quiet=True)
    assert second.try_resume() and second.step == 2
    second.method.setup(second.context)
    for d in second.method.data:  # every dataset's sampler continues where it stopped
        assert d.sampler.state_dict() == saved[d.name]
    assert [c.id for c in second.method.data[1].train_cases] == [c.id for c in vs.data[1].train_cases]
    result = second.fit()
    assert result["step"] == 4 and not result["stopped"]
    stage2 = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    last = [r for r in stage2 if r["event"] == "train"][-1]
    assert last["step"] == 4 and {"unl", "cube"} <= set(last)  # stage 2 ran

    # the trainer's reports and `semiseg predict --run` read the predictions as validation does: LA's clean-up
    # (versemi.datasets[0].largest_component) although infer.largest_component is false
    assert not cfg.infer.largest_component
    assert second.predictor().config.infer.largest_component is True
    assert load_predictor(run, which="last", device="cpu").config.infer.largest_component is True

    summary = evaluate_run(run, which="last")
    assert set(summary["per_label"]) == {"left_atrium", "right_ventricle", "myocardium", "left_ventricle"}
    assert (run / "tasks" / "acdc" / "metrics.csv").exists() and (run / "tasks" / "la2018" / "summary.json").exists()

    acdc = second.method.data[1]
    image = read_image(acdc.manifest.val[0].image)
    # each dataset has its own working grid (LA data.target_spacing, ACDC its own), in training as in predict
    la_image = read_image(second.manifest.val[0].image)
    la_grid = second.method.predictor("la2018").prepare(la_image).shape[1:]
    assert la_grid == second.method.data[0].val_cases[0].image.shape[1:] != la_image.spatial_shape
    acdc_grid = second.method.predictor("acdc").prepare(image).shape[1:]
    assert acdc_grid == acdc.val_cases[0].image.shape[1:] == working_shape(image.spatial_shape, image.spacing,
                                                                            [10, 2, 2])
    seg = second.method.predictor("acdc").segment(image)
    assert seg.spatial_shape == image.spatial_shape and seg.spacing == image.spacing
    assert set(np.unique(seg.array)) <= {0, 1, 2, 3}
    one = second.method.predictor("acdc", task="myocardium").segment(image)
    assert set(np.unique(one.array)) <= {0, 1}


def test_head_pools_what_differs_between_samples():
    """Issue 13: with instance norm before the pooled controller input, two bottlenecks that differ by a per-channel
    scale and shift give the controller the same vector; the released head's batch norm (and DoDNet's group norm)
    keeps them apart."""
    torch.manual_seed(0)
    b1 = torch.randn(1, 32, 3, 3, 2)
    b2 = (torch.rand(1, 32, 1, 1, 1) + 0.5) * b1 + torch.randn(1, 32, 1, 1, 1)  # another scale, shift per channel
    pooled = {}
    for norm in ("instance", "batch", "group"):
        head = TaskPromptedHead(decoder_channels=4, bottleneck_channels=32, num_tasks=2, norm="none", pool_norm=norm)
        with torch.no_grad():
            p = head.pool(torch.cat([b1, b2])).flatten(1)
        pooled[norm] = float((p[0] - p[1]).norm() / p.norm())
    assert pooled["instance"] < 1e-4
    assert pooled["batch"] > 0.1 and pooled["group"] > 0.1


@needs_data
def test_stage2_draws_unlabelled_batches_with_a_patch_per_dataset(tmp_path):
    """Issue 13: stage 2 starts at versemi.unlabelled_start and then draws an unlabelled batch from every dataset
    each step, whose patches reach the loss; each dataset samples its own patch shape (LA 32^3,
    ACDC 16 x 32 x 32), mixed across shapes; the network is the released one (no full-resolution stage)."""
    from semiseg.train.trainer import Trainer

    raw = _raw()
    raw["train"].update(patch_size=[32, 32, 32], iterations=4)
    raw["versemi"]["unlabelled_start"] = 0.5
    cfg = config_from_dict(raw)
    trainer = Trainer(cfg, tmp_path / "run", quiet=True)
    vs: VerSemi = trainer.method
    assert vs.stage2_from == 2 and isinstance(vs.net.dec1, torch.nn.Identity)
    vs.setup(trainer.context)
    assert trainer.samplers == {}  # every dataset keeps its own samplers: no trainer batch drawn and discarded
    assert [d.sampler.patch for d in vs.data] == [(32, 32, 32), (16, 32, 32)]
    drawn = {d.name: [] for d in vs.data}
    for d in vs.data:
        assert d.unlabelled_sampler is not None and d.unlabelled_sampler.patch == d.sampler.patch
        draw = d.unlabelled_sampler.next_batch

        def counted(draw=draw, name=d.name):
            batch = draw()
            drawn[name].append(tuple(batch.image.shape))
            return batch

        d.unlabelled_sampler.next_batch = counted
    out = vs.training_step({}, 1)  # stage 1: labelled only
    assert "unl" not in out and all(not v for v in drawn.values())
    out = vs.training_step({}, 2)  # stage 2
    assert drawn == {"la2018": [(1, 1, 32, 32, 32)], "acdc": [(1, 1, 16, 32, 32)]}
    assert {"unl", "cube"} <= set(out) and float(out["unlabelled_patches"]) == 2 and "spec" not in out
    assert torch.isfinite(out["loss"]) and out["loss"].requires_grad
    vs.params.task_mix_in_stage2 = True  # stage 1's task-specific loss on labelled mixes kept in stage 2
    out = vs.training_step({}, 3)
    parts = ("sup", "chaos", "unl", "cube", "spec")
    assert out["loss"].item() == pytest.approx(sum(out[k].item() for k in parts), rel=1e-5)
    vs.params.mix_weight = 0.25  # the labelled CutMix losses weighted, in both stages
    out = vs.training_step({}, 3)
    expected = out["sup"] + out["unl"] + out["cube"] + 0.25 * (out["chaos"] + out["spec"])
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    out = vs.training_step({}, 1)
    assert out["loss"].item() == pytest.approx((out["sup"] + 0.25 * (out["chaos"] + out["spec"])).item(), rel=1e-5)
    vs.params.mix_weight = 0.0  # no labelled mixes at all
    assert set(vs.training_step({}, 1)) == {"loss", "sup"} and "chaos" not in vs.training_step({}, 3)
    with torch.no_grad():  # L_sup: one mean over the 4 tasks, or with balance_datasets LA's 1 and ACDC's 3 weigh alike
        images, labels, owner = vs._draw("sampler")
        requests = [(i, t.id) for i in range(len(images)) for t in vs.tasks_of(owner[i])]
        logits = vs._prompts(images, requests, owner)

        def task_loss(task):
            sel = [k for k, (_, t) in enumerate(requests) if t == task.id]
            return vs._pooled_loss([logits[k] for k in sel], [labels[requests[k][0]] == task.value for k in sel],
                                   [task.id] * len(sel), ce=True).item()

        la, acdc = task_loss(vs.tasks[0]), [task_loss(t) for t in vs.tasks[1:]]
        assert len(acdc) == 3 and float(vs._supervised(images, labels, owner)) == pytest.approx((la + sum(acdc)) / 4)
        vs.params.balance_datasets = True
        assert float(vs._supervised(images, labels, owner)) == pytest.approx((la + sum(acdc) / 3) / 2)
    vs.params.same_dataset_mix = True  # CutMix pairs within a dataset only
    owner = [0, 1, 0, 1, 1, 0, 0, 1]
    for _ in range(5):
        a, b = vs._pairs(owner)
        assert len(a) == len(b) == 4 and len(set(a + b)) == 8 and [owner[i] for i in a] == [owner[i] for i in b]
    raw["versemi"]["same_dataset_mix"] = True  # here each dataset has one patch per step: nothing to pair
    with pytest.raises(ConfigError, match="versemi.same_dataset_mix.*la2018, acdc"):
        Trainer(config_from_dict(raw), tmp_path / "run2", quiet=True)
    with torch.no_grad():  # the validation window of each dataset follows its patch
        assert vs.predictor("acdc").patch_size == [16, 32, 32]
