"""`semiseg plan` on real data: the spacing, patch and network rules, and a measured speed."""
import numpy as np

from semiseg.config import load_config
from semiseg.models import size_multiple
from semiseg.plan import make_plan, plan_patch, plan_spacing, plan_strides


def test_spacing_rule_coarsens_fine_axes_only():
    target, _ = plan_spacing(np.array([0.625, 0.625, 0.625]), np.array([188, 142, 88]), 96)
    assert target == [1.25, 1.25, 1.25]
    target, _ = plan_spacing(np.array([10.0, 1.0, 1.0]), np.array([10, 256, 216]), 96)
    assert target == [10.0, 4.0, 4.0]  # ACDC-like: the 10 mm slice axis is left alone
    assert plan_spacing(np.array([1.0, 1.0]), np.array([90, 80]), 128)[0] is None
    assert plan_patch((94, 71, 44), "strided_unet3d", [64, 64, 48]) == [64, 64, 40]
    assert plan_patch((9, 200), "unetpp2d", [128, 128]) == [16, 128]


def test_plan_for_la_measures_a_real_step(repo_dir, la_dir):
    cfg = load_config(repo_dir / "Resources" / "configs" / "la2018_supervised.yaml",
                      [f"data.root={la_dir}", "model.features=4", "train.batch_size=1", "train.threads=1"])
    plan = make_plan(cfg, budget_minutes=1.0, device="cpu")
    assert plan.target_spacing == [1.25, 1.25, 1.25] and plan.model == "strided_unet3d"
    assert all(p % m == 0 for p, m in zip(plan.patch_size, size_multiple(plan.model, plan.strides)))
    assert plan.seconds_per_iteration > 0 and plan.iterations >= 100
    assert "--set data.target_spacing=[1.25,1.25,1.25]" in plan.text()


def test_pictures_on_a_cpu_give_way_to_iterations(repo_dir, kvasir_dir):
    """Kvasir's 256 px pictures: 128 px when the budget buys enough iterations there, coarser (down to 64 px) when
    it does not; a target spacing the config sets is kept."""
    cfg = load_config(repo_dir / "Resources" / "configs" / "kvasir_cpu.yaml",
                      [f"data.root={kvasir_dir}", "data.target_spacing=null", "model.features=4",
                       "train.batch_size=1", "train.threads=1"])
    roomy = make_plan(cfg, budget_minutes=10_000, device="cpu")
    assert roomy.target_spacing == [2.0, 2.0] and roomy.patch_size == [128, 128]
    tight = make_plan(cfg, budget_minutes=0.1, device="cpu")  # not even 64 px buys 5,000 iterations in 6 s
    assert tight.target_spacing == [4.0, 4.0] and tight.patch_size == [64, 64] and tight.working_shape == (64, 64)
    assert "at 128 px the budget buys" in tight.text() and "64 px buys" in tight.text()
    cfg.data.target_spacing = 2.0
    assert make_plan(cfg, budget_minutes=0.1, device="cpu").patch_size == [128, 128]


def test_strides_keep_a_coarse_axis_until_the_others_catch_up(repo_dir, acdc_dir):
    assert plan_strides([10.0, 2.0, 2.0], "strided_unet3d") == [[1, 2, 2], [1, 2, 2], [2, 2, 2]]
    assert plan_strides([1.25, 1.25, 1.25], "strided_unet3d") is None  # 2 everywhere: the default
    assert plan_strides([10.0, 2.0, 2.0], "unet3d") is None
    # with the patch, the depth too: halve while an axis keeps >= 4 voxels (LA's 40-voxel axis stops at 5)
    assert plan_strides([1.25] * 3, "strided_unet3d", [64, 64, 40]) == [[2, 2, 2]] * 3 + [[2, 2, 1]]
    assert plan_strides([10.0, 2.0, 2.0], "strided_unet3d", [16, 64, 64]) == [[1, 2, 2], [1, 2, 2], [2, 2, 2],
                                                                              [2, 2, 2]]
    assert plan_strides([1.25] * 3, "strided_unet3d", [32, 32, 32]) is None  # 4 voxels after 3 levels: the default
    cfg = load_config(repo_dir / "Resources" / "configs" / "acdc_supervised.yaml",
                      [f"data.root={acdc_dir}", "data.target_spacing=[10,2,2]", "model.features=4",
                       "train.batch_size=1", "train.threads=1"])
    plan = make_plan(cfg, budget_minutes=1.0, device="cpu")
    assert plan.model == "strided_unet3d" and plan.strides[:2] == [[1, 2, 2], [1, 2, 2]]
    assert plan.strides == plan_strides([10.0, 2.0, 2.0], "strided_unet3d", plan.patch_size)
    assert "--set " + f"model.strides={plan.strides}".replace(" ", "") in plan.text()
    load_config(repo_dir / "Resources" / "configs" / "acdc_supervised.yaml", plan.overrides())  # a valid config
