"""The ``freezeray`` command: ``run | featurize | fit | finetune | evaluate | predict``
take a YAML config (also as ``python -m jobs.<step> --config CONFIG``), ``summary``
prints a model's vertices, ``demo`` runs the README's main job. Each connects to the
cluster in ``RAY_ADDRESS`` or starts a local Ray. The CLI is the only place that prints."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import Callable

__all__ = ["main", "main_for", "STEPS"]

STEPS = ("run", "featurize", "fit", "finetune", "evaluate", "predict")

_HELP = {
    "run": "the whole run: featurize, fit the head (or fine-tune), evaluate, save, predict, report",
    "featurize": "featurize the train/validation/test images at the frozen boundary (cached, resumable)",
    "fit": "fit the head on the cached features with Ray Train, then save the model",
    "finetune": "train the whole model (frozen layers stay frozen) from images, then save it",
    "evaluate": "evaluate the saved model (outputs.model) on data.test",
    "predict": "predict data.predict with the saved model into outputs.predictions",
}


def _setup_logging(verbose: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s", "%H:%M:%S"))
    for name in ("surgery", "pipeline", "jobs"):
        logger = logging.getLogger(name)
        logger.setLevel(logging.DEBUG if verbose else logging.INFO)
        logger.addHandler(handler)
        logger.propagate = False


def _load(path: str, base_dir: str = ""):
    from .config import ConfigError, load_config

    try:
        return load_config(path, base_dir)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2)


def _how(fset) -> str:
    return "reused the cached features" if fset.reused else f"computed, {fset.manifest.get('images_per_s')} images/s"


def _print_outcome(outcome, started: float) -> None:
    ev = outcome.evaluation
    if ev is not None:
        print(f"accuracy {ev.accuracy:.4f} on {ev.rows} test images ({ev.errors} unreadable)")
    if outcome.features:
        parts = [f"{split} {f.rows} rows ({_how(f)})" for split, f in outcome.features.items()]
        print("features: " + "; ".join(parts))
    if outcome.fit is not None:
        print(f"training: {len(outcome.fit.history)} epochs, run {outcome.fit.run}")
    if outcome.predictions is not None:
        print(f"predictions: {outcome.predictions.rows} rows -> {outcome.predictions.output}")
    if outcome.model_uri:
        print(f"model:  {outcome.model_uri}")
    if outcome.report_uri:
        print(f"report: {outcome.report_uri}/report.md")
    steps = ", ".join(f"{k} {v:.1f}s" for k, v in outcome.timings.items())
    print(f"time: {steps} (total {time.perf_counter() - started:.0f}s)")


def _step(name: str, args: argparse.Namespace) -> int:
    import surgery

    from . import steps

    cfg = _load(args.config)
    started = time.perf_counter()
    if name == "run":
        steps.connect(args.verbose)
        _print_outcome(steps.run_all(cfg), started)
        return 0
    if name in ("evaluate", "predict"):
        if cfg.outputs.model is None:
            print(f"error: {cfg.source}: outputs.model names no saved model to {name} with", file=sys.stderr)
            return 2
        model = surgery.load(steps.resolve(cfg, cfg.outputs.model), cfg.data.storage_options or None)
    else:
        model = steps.build_model(cfg)
    steps.connect(args.verbose)
    if name == "featurize":
        for split, fset in steps.featurize_step(cfg, model).items():
            print(f"{split}: {fset.rows} rows, {fset.errors} errors -> {fset.uri} ({_how(fset)})")
    elif name in ("fit", "finetune"):
        result = steps.fit_step(cfg, model) if name == "fit" else steps.finetune_step(cfg, model)
        last = result.history[-1] if result.history else {}
        print(f"{len(result.history)} epochs; last: " + ", ".join(f"{k} {v:.4f}" for k, v in last.items() if isinstance(v, float)))
        if cfg.outputs.model is not None:
            surgery.save(result.model, steps.resolve(cfg, cfg.outputs.model), cfg.data.storage_options or None)
            print(f"model: {steps.resolve(cfg, cfg.outputs.model)}")
    elif name == "evaluate":
        result = steps.evaluate_step(cfg, model)
        print(result.table())
    elif name == "predict":
        result = steps.predict_step(cfg, model)
        print(f"{result.rows} predictions, {result.errors} unreadable -> {result.output}")
    print(f"time: {time.perf_counter() - started:.0f}s")
    return 0


def _summary(args: argparse.Namespace) -> int:
    import surgery

    if "/" in args.model or args.model.startswith(".") or "://" in args.model:
        model = surgery.load(args.model)
    else:
        model = surgery.zoo.load(args.model, weights=args.weights)
    print(surgery.summary(model))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(args.workdir, per_class=args.per_class, epochs=args.epochs, verbose=args.verbose)


def _parser(prog: str = "freezeray") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Transfer learning at dataset scale: DL4J-style model surgery on PyTorch graphs, "
                    "featurization with Ray Data, head training with Ray Train.",
        epilog="Set RAY_ADDRESS to use a running cluster; otherwise a local Ray is started.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in STEPS:
        p = sub.add_parser(name, help=_HELP[name], description=f"{_HELP[name]}. Driven by a YAML config "
                           "(see jobs/configs/ for examples); the config is validated before Ray starts.")
        p.add_argument("config", nargs="?", help="the run's YAML config")
        p.add_argument("--config", dest="config_opt", metavar="CONFIG", help="same as the positional CONFIG")
        p.add_argument("-v", "--verbose", action="store_true", help="debug logs and Ray worker output")
        p.set_defaults(fn=lambda a, _n=name: _step(_n, a))
    p = sub.add_parser("summary", help="print the vertices of a zoo model or a saved model",
                       description="Print every vertex (name, op, inputs, output shape, parameters, frozen) and totals.")
    p.add_argument("model", help="a zoo name (e.g. vgg16, efficientnet_lite0, resnet50) or a saved model folder/URI")
    p.add_argument("--weights", default=None, help="zoo weights: imagenet, a path or URI (default: none, no download)")
    p.set_defaults(fn=_summary, verbose=False)
    p = sub.add_parser("demo", help="the main job on the embedded default: digits, efficientnet_lite0, local Ray",
                       description="Write scikit-learn's handwritten digits as PNG files, then featurize them with "
                                   "efficientnet_lite0 (bundled ImageNet weights), fit a new 10-class head with 2 Ray "
                                   "Train workers, evaluate, save the model and write a report. No downloads.")
    p.add_argument("--workdir", default="freezeray-out", help="folder for data, features, runs, model and report")
    p.add_argument("--per-class", type=int, default=None, help="use at most this many digits per class (quick runs)")
    p.add_argument("--epochs", type=int, default=None, help="override the config's epochs")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logs and Ray worker output")
    p.set_defaults(fn=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command in STEPS:
        args.config = args.config or args.config_opt
        if not args.config:
            print(f"error: freezeray {args.command} needs a CONFIG", file=sys.stderr)
            return 2
    _setup_logging(getattr(args, "verbose", False))
    return args.fn(args)


def main_for(step: str) -> Callable[[list[str] | None], int]:
    """``python -m jobs.<step> --config CONFIG`` is ``freezeray <step> CONFIG``."""
    def run(argv: list[str] | None = None) -> int:
        return main([step, *(sys.argv[1:] if argv is None else argv)])

    return run


if __name__ == "__main__":
    sys.exit(main())
