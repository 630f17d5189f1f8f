"""Work on files that runs in a worker process (``SemiSegLib.worker``): a trained model over a volume, and a trained
model over every labelled case of a dataset. Each job is a generator of :class:`~SemiSegLib.tasks.Progress`
returning a JSON-ready result. No Slicer and no Qt: the worker is a plain Python process."""
from __future__ import annotations

from pathlib import Path
from typing import Generator

import numpy as np

from .tasks import Progress


def save_image(image, path: str | Path) -> None:
    """An ``Image`` as an .npz (array, affine, channels) for a worker: quick, no image library needed."""
    np.savez(path, array=image.array, affine=image.affine, channels=image.channels)


def load_image(path: str | Path):
    from semiseg.io import Image

    with np.load(path) as data:
        return Image.from_affine(data["array"], data["affine"], channels=int(data["channels"]), path=str(path))


def predict_steps(run: str, image: str, out: str) -> Generator[Progress, None, dict]:
    """Class probabilities (K, *spatial, float16) of the run's model on the image saved at ``image`` (.npz),
    written to ``out`` (.npy)."""
    from semiseg.runs import load_predictor

    yield Progress(None, "loading the model")
    predictor = load_predictor(run)
    yield Progress(None, "running the model on the volume")
    probs = predictor.predict(load_image(image))
    np.save(out, probs.astype(np.float16))
    return {"classes": int(probs.shape[0]), "run": str(predictor.run_dir), "checkpoint": str(predictor.checkpoint)}


def evaluate_steps(dataset: str, run: str, max_cases: int | None = None) -> Generator[Progress, None, list[dict]]:
    """The run's model on every labelled case of a dataset folder, scored as ``semiseg predict`` + ``semiseg
    evaluate`` score it (``semiseg.evaluate.score_case``); ``segment`` and ``reference`` name the label."""
    from semiseg.data import dataset_labels, discover_cases
    from semiseg.evaluate import score_case
    from semiseg.runs import load_cases, load_predictor

    yield Progress(0.0, "loading the model")
    predictor = load_predictor(run)
    names = dataset_labels(dataset)
    cases = [c for c in discover_cases(dataset) if c.label][:max_cases]
    if not cases:
        raise ValueError(f"{dataset}: no labelled case to evaluate")
    rows = []
    for n, case in enumerate(cases):
        yield Progress(n / len(cases), f"case {case.id} ({n + 1} of {len(cases)})")
        (loaded,) = load_cases([case], predictor.config, with_label=True)
        rows += [{**r, "segment": r["label_name"], "reference": r["label_name"]}
                 for r in score_case(predictor, loaded, label_names=names)]
    return rows


JOBS = {"predict": predict_steps, "evaluate": evaluate_steps}
