"""Reading a run directory back (``semiseg.runs``), and the direction of the imports: the config and the predictor
never import the methods."""
import json
import re
import subprocess
import sys

import pytest

from semiseg.config import config_from_dict, save_config
from semiseg.errors import RunDirError
from semiseg.runs import find_checkpoint, load_predictor, read_manifest


IMPORTS = """
import json, sys
import semiseg.config
cfg = semiseg.config.load_config(sys.argv[1], ["train.patch_size=[16,16,16]", "infer.largest_component=true"])
torch_after_config = "torch" in sys.modules
import numpy as np, torch
import semiseg.evaluate, semiseg.infer
from semiseg.io import Image
# a whole prediction (resampling, sliding window, clean-up) with a real, untrained network
predictor = semiseg.infer.Predictor(torch.nn.Conv3d(1, 2, 1), cfg, torch.device("cpu"))
predictor.segment(Image(np.random.default_rng(0).random((20, 18, 16)).astype(np.float32), (1.0, 1.0, 1.0)))
methods = sorted(m for m in sys.modules if m == "semiseg.methods" or m.startswith("semiseg.methods."))
print(json.dumps({"torch_after_config": torch_after_config, "methods": methods}))
"""


def test_config_and_infer_do_not_import_the_methods(repo_dir):
    """Methods and runs import config and infer, never the reverse (not even inside a function): loading a config
    imports no torch, and predicting an image with a network imports no method."""
    config = repo_dir / "Resources" / "configs" / "la2018_supervised.yaml"
    done = subprocess.run([sys.executable, "-c", IMPORTS, str(config)], capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(repo_dir / "SemiSegCore"), "PATH": ""})
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1]) == {"torch_after_config": False, "methods": []}


def test_a_folder_that_is_not_a_trained_run_is_named(tmp_path):
    with pytest.raises(RunDirError, match=re.escape(f"{tmp_path}: not a run directory (no config.yaml")):
        load_predictor(tmp_path, device="cpu")
    save_config(config_from_dict({}), tmp_path / "config.yaml")
    with pytest.raises(RunDirError, match=re.escape(f"no checkpoint (best.pt or last.pt) under {tmp_path}")):
        load_predictor(tmp_path, device="cpu")
    with pytest.raises(RunDirError, match=re.escape(f"no checkpoint (last.pt) under {tmp_path}")):
        find_checkpoint(tmp_path, "last")
    with pytest.raises(RunDirError, match=re.escape(f"{tmp_path}: no manifest.json")):
        read_manifest(tmp_path)


def test_train_checks_the_method_section_before_making_the_run_directory(tmp_path):
    from semiseg.config import ConfigError
    from semiseg.train import train

    cfg = config_from_dict({"method": "sam_mix", "sam_mix": {"lora_rnk": 4}})
    with pytest.raises(ConfigError, match="sam_mix.lora_rnk.*lora_rank"):
        train(cfg, tmp_path / "run", quiet=True)
    assert not (tmp_path / "run").exists()
