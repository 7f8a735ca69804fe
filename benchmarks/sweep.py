"""Sweeps on cached features: a 16-trial ``pipeline.sweep`` (Ray Tune, ASHA, trials in
parallel on the cluster's CPUs) on the demo's features (scikit-learn's digits,
``efficientnet_lite0`` at 96 px), against the same 16 settings trained one after the
other with ``fit_head`` in local mode, side by side in one process. The backbone runs
once, for the featurization, which is reported separately.

    python -m benchmarks.sweep [--trials 16]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import Batches, Run, Tuning

from .common import RESULTS, save_json, start_ray, table

DATA = Path(__file__).parent / "data"


def demo_model() -> Any:
    """The demo's model: ImageNet ``efficientnet_lite0`` frozen to ``global_pool``, a new 10-class output."""
    import surgery
    from surgery.layers import Output

    base = surgery.zoo.load("efficientnet_lite0", weights="imagenet")
    return (surgery.TransferLearning(base).fine_tune_configuration(surgery.FineTuneConfiguration(seed=0))
            .set_feature_extractor("global_pool").remove_vertex_keep_connections("classifier")
            .add_layer("classifier", Output(10, loss="cross_entropy")).build())


def demo_features(work: Path) -> tuple[Any, Any, float]:
    """The demo's model and its train features (written under benchmarks/data, reused)."""
    import pipeline
    from jobs.demo import write_digits

    write_digits(str(DATA / "digits"))
    model = demo_model()
    t = time.perf_counter()
    features = pipeline.featurize(model, str(DATA / "digits" / "train"), str(DATA / "digits-features-96"), image_size=96)
    return model, features, time.perf_counter() - t


def run(trials: int = 16, seed: int = 0) -> dict[str, Any]:
    from ray import tune

    import pipeline

    start_ray()
    work = Path(tempfile.mkdtemp(prefix="fr-sweep-"))
    try:
        model, features, featurize_s = demo_features(work)
        space = {"lr": tune.loguniform(1e-4, 1e-1), "weight_decay": tune.choice([0.0, 1e-4, 1e-3]),
                 "dropout": tune.choice([0.0, 0.2])}
        t = time.perf_counter()
        result = pipeline.sweep(model, features, space, tuning=Tuning(num_samples=trials), batches=Batches(seed=seed),
                                run=Run(storage=str(work / "sweeps")))
        sweep_s = time.perf_counter() - t
        # the same settings, one fit_head after the other (no scheduler, no parallel trials)
        configs = result.table[[k for k in space]].to_dict("records")
        t = time.perf_counter()
        best_loss = np.inf
        for cfg in configs:
            m = surgery_with(model, cfg)
            r = pipeline.fit_head(m, features, batches=Batches(seed=seed), run=Run(storage=str(work / "runs")))
            best_loss = min(best_loss, r.metrics["val_loss"])
        serial_s = time.perf_counter() - t
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ended = result.table["ended_by"].value_counts().to_dict()
    rows = [{"system": f"pipeline.sweep, {trials} trials (Ray Tune, ASHA, 2 at a time)", "seconds": sweep_s,
             "best_val_loss": float(result.table["val_loss"].min()), "epochs": int(result.table["epochs"].sum())},
            {"system": f"{trials} x fit_head, one after the other (local mode)", "seconds": serial_s,
             "best_val_loss": float(best_loss)}]
    return {"settings": {"trials": trials, "space": {k: _describe(v) for k, v in space.items()}, "rows": features.rows},
            "rows": rows, "featurize_s": featurize_s, "ended_by": ended, "speed_up": serial_s / sweep_s,
            "best_config": result.best_config}


def _describe(domain: Any) -> str:
    """A Tune domain as text: ``choice([0.0, 0.2])``, ``LogUniform(0.0001, 0.1)``."""
    if hasattr(domain, "categories"):
        return f"choice({list(domain.categories)})"
    sampler = type(getattr(domain, "sampler", None)).__name__.removeprefix("_")
    return f"{sampler}({domain.lower}, {domain.upper})"


def surgery_with(model: Any, settings: dict[str, Any]) -> Any:
    import surgery

    return surgery.TransferLearning(model).fine_tune_configuration(surgery.FineTuneConfiguration(**settings)).build()


def report(result: dict[str, Any]) -> str:
    return "\n".join([
        table(result["rows"], ["system", "seconds", "best_val_loss", "epochs"]),
        f"sweep {result['rows'][0]['seconds']:.1f}s (goal <= 60 s on 2 cores), {result['speed_up']:.1f}x faster than "
        f"one fit_head after another; trials ended by {result['ended_by']}; featurized once in "
        f"{result['featurize_s']:.1f}s (0 s when cached)",
    ])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.sweep", description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=16)
    p.add_argument("--out", type=Path, default=RESULTS)
    a = p.parse_args(argv)
    result = run(a.trials)
    print(report(result))
    print(f"wrote {save_json('sweep', result, a.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
