"""The Slicer module's dataset evaluation (the worker's ``evaluate`` job) scores a trained run exactly as the report
after training does (``semiseg.report.evaluate_cases``): the same rows for the same cases, with the configured
clean-up (largest component) applied in both."""
import csv
import json
import math

import numpy as np

from conftest import LA, la_cases


def test_slicer_dataset_evaluation_gives_the_rows_of_the_report(tmp_path):
    la_cases(2)  # skips without data
    from semiseg.config import config_from_dict
    from semiseg.data import dataset_labels, discover_cases
    from semiseg.evaluate import largest_component
    from semiseg.metrics import summarise
    from semiseg.report import evaluate_cases
    from semiseg.runs import load_cases, load_predictor
    from semiseg.train import train
    from SemiSegLib.batch import evaluate_steps
    from SemiSegLib.tasks import run_task

    cfg = config_from_dict({"name": "tiny", "data": {"root": str(LA), "labelled": 2, "val": 1, "max_cases": 4},
                            "model": {"name": "vnet", "features": 4},
                            "train": {"iterations": 10, "patch_size": [32, 32, 32], "batch_size": 2, "val_every": 10,
                                      "checkpoint_every": 10, "device": "cpu"},
                            "infer": {"patch_size": [96, 96, 96], "overlap": 0.0, "largest_component": True}})
    run = tmp_path / "run"
    train(cfg, run, quiet=True, evaluate_val=False)

    slicer_rows = run_task(evaluate_steps(str(LA), str(run), max_cases=2))

    predictor = load_predictor(run, device="cpu")
    cases = load_cases([c for c in discover_cases(LA) if c.label][:2], predictor.config, with_label=True)
    summary = evaluate_cases(predictor, cases, tmp_path / "report", label_names=dataset_labels(LA), quiet=True)

    # the clean-up is in play: the barely trained model predicts scattered foreground that it removes
    raw = [predictor.predict_case(c).argmax(0).astype(np.uint8) for c in cases]
    assert any((largest_component(r) != r).any() for r in raw)

    with open(tmp_path / "report" / "metrics.csv") as f:
        report_rows = list(csv.DictReader(f))
    assert [(r["case"], r["label_name"]) for r in slicer_rows] == [(r["case"], r["label_name"]) for r in report_rows]
    assert {r["case"] for r in slicer_rows} == {c.id for c in cases}
    for mine, theirs in zip(slicer_rows, report_rows):
        assert mine["segment"] == mine["reference"] == "left_atrium"
        for metric in ("dice", "jaccard", "hd95", "asd", "assd"):
            value = float(theirs[metric])  # the CSV keeps 6 significant digits
            assert (math.isnan(mine[metric]) and math.isnan(value)) or math.isclose(mine[metric], value, rel_tol=1e-5)
    # ... and to the last digit: the summaries of the two sets of rows are the same
    assert json.dumps(summarise(slicer_rows)) == json.dumps({k: summary[k] for k in ("per_label", "overall")})
