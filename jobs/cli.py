"""The ``freezeray`` command: ``run | featurize | fit | sweep | finetune | evaluate |
predict | check CONFIG`` (also ``python -m jobs.<step> --config CONFIG``), ``init IMAGES``
writes a config for a folder of images, ``summary`` prints a model's vertices, ``demo``
runs the README's main job. Each connects to the cluster in ``RAY_ADDRESS`` or starts a
local Ray, after checking the whole config. The CLI is the only place that prints: a
progress bar per stage (plain lines when not a terminal), then a short result.

Every expected failure prints one ``error:`` line (and the problems, for a config) and
exits with its code (see :data:`EXIT_CODES`); the traceback only with ``--debug`` or
``FREEZERAY_DEBUG=1``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import traceback
from typing import Any, Callable

__all__ = ["main", "main_for", "STEPS", "EXIT_CODES"]

STEPS = ("run", "featurize", "fit", "sweep", "finetune", "evaluate", "predict")

EXIT_CODES = {
    0: "success",
    1: "an unexpected error (a bug: rerun with --debug and report the traceback)",
    2: "the config, the command line or an input is invalid (every problem is listed)",
    3: "data or storage: a missing or unreadable file, folder or feature set, or storage that stayed unavailable",
    4: "the output is busy: another job holds its lease (or took it over)",
    5: "the output holds something else: features or predictions with another fingerprint",
    6: "out of memory in a Ray worker or actor (lower the batch size)",
    130: "interrupted",
}

_HELP = {
    "run": "the whole run: featurize, fit the head (or sweep heads, or fine-tune), evaluate, save, predict, report",
    "featurize": "featurize the train/validation/test images at the frozen boundary (cached, resumable)",
    "fit": "fit the head on the cached features, then save the model",
    "sweep": "try many heads on the cached features with Ray Tune (training.sweep), then save the best",
    "finetune": "train the whole model (frozen layers stay frozen) from images, then save it",
    "evaluate": "evaluate the saved model (outputs.model) on data.test",
    "predict": "predict data.predict with the saved model into outputs.predictions",
}


class _Failure(Exception):
    """An expected failure, with its exit code and the lines to print."""

    def __init__(self, code: int, message: str, details: list[str] | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.details = code, message, details or []


def _setup_logging(verbose: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s", "%H:%M:%S"))
    for name in ("surgery", "pipeline", "jobs"):
        logger = logging.getLogger(name)
        logger.setLevel(logging.DEBUG if verbose else logging.WARNING)
        logger.handlers[:] = [handler]
        logger.propagate = False


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and its causes (Ray's task errors carry the original as ``cause``)."""
    seen: list[BaseException] = []
    stack: list[BaseException | None] = [exc]
    while stack:
        e = stack.pop(0)
        if e is None or any(e is s for s in seen):
            continue
        seen.append(e)
        stack += [getattr(e, "cause", None), e.__cause__, e.__context__]
    return seen


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def classify(exc: BaseException) -> _Failure | None:
    """The exit code and message of an expected failure; None for anything else."""
    from jobs.check import CheckFailed
    from jobs.config import ConfigError

    chain = _chain(exc)
    names = {type(e).__name__ for e in chain}
    for e in chain:
        if isinstance(e, _Failure):
            return e
        if isinstance(e, (ConfigError, CheckFailed)):
            return _Failure(2, f"{getattr(e, 'source', '') or 'the config'}: {len(e.problems)} problem"
                               f"{'s' if len(e.problems) != 1 else ''}", list(e.problems))
    text = " ".join(_first_line(e) for e in chain)
    if names & {"OutOfMemoryError", "OutOfMemoryException"} or "out of memory" in text.lower() \
            or "can't allocate memory" in text:
        return _Failure(6, f"out of memory: {_first_line(chain[-1])}",
                        ["hint: lower the batch size (featurize.batch_size, training.batch_size) or give each "
                         "worker more memory"])
    for e in chain:
        kind = type(e).__name__
        if kind in ("LeaseHeld", "LeaseLost"):
            return _Failure(4, _first_line(e))
        if kind == "StorageUnavailable":
            return _Failure(3, _first_line(e))
        if kind == "FeatureMismatch":
            return _Failure(5, _first_line(e))
        if isinstance(e, FileExistsError):
            return _Failure(5, _first_line(e))
        if isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)) \
                or kind == "CheckpointError":
            return _Failure(3, _first_line(e))
    for e in chain:
        kind = type(e).__name__
        if kind in ("WeightsError", "VertexError", "ShapeError", "SchemaError") or isinstance(e, (ValueError, TypeError)):
            return _Failure(2, _first_line(e))
    return None


def _load(path: str, base_dir: str = "") -> Any:
    from .config import load_config

    return load_config(path, base_dir)


def _connect(verbose: bool) -> None:
    import ray.data  # noqa: F401  (configures Ray Data's loggers, which quiet_ray then tunes)

    from . import steps
    from .progress import quiet_ray

    quiet_ray(verbose)
    steps.connect(verbose)


def _step(name: str, args: argparse.Namespace) -> int:
    import surgery

    from . import steps
    from .check import check_config
    from .outcome import outcome_lines
    from .progress import Reporter

    cfg = _load(args.config)
    check_config(cfg, step=name)  # the whole config, before Ray starts
    started = time.perf_counter()
    report = Reporter()
    if name == "run":
        _connect(args.verbose)
        outcome = steps.run_all(cfg, report)
        report.close()
        print("\n".join(outcome_lines(outcome, time.perf_counter() - started)))
        return 0
    if name in ("evaluate", "predict"):
        model = surgery.load(steps.resolve(cfg, cfg.outputs.model), cfg.data.storage_options or None)
    else:
        model = steps.build_model(cfg)
    _connect(args.verbose)
    if name == "featurize":
        for split, fset in steps.featurize_step(cfg, model, report).items():
            print(f"{split}: {fset.rows} rows, {fset.errors} errors -> {fset.uri}"
                  f"{' (reused)' if fset.reused else ''}")
    elif name in ("fit", "finetune", "sweep"):
        if name == "sweep":
            result = steps.sweep_step(cfg, model)
            print(result.table.head(10).to_string(index=False))
            trained = result.best_model
        else:
            result = steps.fit_step(cfg, model, progress=report) if name == "fit" else steps.finetune_step(cfg, model, report)
            best = result.metrics
            print(f"{len(result.stages)} stages, " * bool(result.stages) + f"{len(result.history)} epochs; best epoch "
                  f"{result.best_epoch}{' of the last stage' * bool(result.stages)}: "
                  + ", ".join(f"{k} {v:.4f}" for k, v in best.items() if isinstance(v, float) and k != "seconds"))
            trained = result.model
        if cfg.outputs.model is not None:
            surgery.save(trained, steps.resolve(cfg, cfg.outputs.model), cfg.data.storage_options or None)
            print(f"model: {steps.resolve(cfg, cfg.outputs.model)}")
    elif name == "evaluate":
        print(steps.evaluate_step(cfg, model).table())
    elif name == "predict":
        result = steps.predict_step(cfg, model)
        print(f"{result.rows} predictions, {result.errors} unreadable -> {result.output}")
    report.close()
    print(f"time: {time.perf_counter() - started:.0f}s")
    return 0


def _check(args: argparse.Namespace) -> int:
    from .check import check_config

    cfg = _load(args.config)
    checked = check_config(cfg, step="run")
    print(f"{cfg.source}: ok ({', '.join(checked)})")
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
    from .demo import demo_config
    from .outcome import outcome_lines
    from .progress import Reporter
    from .steps import run_all

    started = time.perf_counter()
    cfg, counts, where = demo_config(args.workdir, per_class=args.per_class, epochs=args.epochs)
    print(f"digits: {counts['train']} train and {counts['test']} test PNGs in {where}")
    _connect(args.verbose)
    report = Reporter()
    outcome = run_all(cfg, report)
    report.close()
    print("\n".join(outcome_lines(outcome, time.perf_counter() - started)))
    return 0


def _init(args: argparse.Namespace) -> int:
    from .init import init_config

    written, lines = init_config(args.images, model=args.model, output=args.output, force=args.force)
    print("\n".join(lines))
    print(f"wrote {written}; run it with: freezeray run {written}")
    return 0


def _parser(prog: str = "freezeray") -> argparse.ArgumentParser:
    codes = "; ".join(f"{code} {what}" for code, what in EXIT_CODES.items())
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Transfer learning at dataset scale: DL4J-style model surgery on PyTorch graphs, "
                    "featurization with Ray Data, head training with Ray Train, sweeps with Ray Tune.",
        epilog=f"Set RAY_ADDRESS to use a running cluster; otherwise a local Ray is started. Exit codes: {codes}.",
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", help="debug logs, Ray's own logs and worker output")
    common.add_argument("--debug", action="store_true", help="print the traceback of a failure (or FREEZERAY_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in STEPS:
        p = sub.add_parser(name, parents=[common], help=_HELP[name],
                           description=f"{_HELP[name]}. Driven by a YAML config (see jobs/configs/ for examples); the "
                                       "whole config is checked before Ray starts (see `freezeray check`).")
        p.add_argument("config", nargs="?", help="the run's YAML config")
        p.add_argument("--config", dest="config_opt", metavar="CONFIG", help="same as the positional CONFIG")
        if name == "run":
            p.add_argument("--images", metavar="DIR", help="no config: write one for this image folder (as "
                           "`freezeray init DIR`) and run it")
            p.add_argument("--model", default="efficientnet_lite0", help="with --images: the zoo model (default "
                           "efficientnet_lite0)")
        p.set_defaults(fn=lambda a, _n=name: _step(_n, a))
    p = sub.add_parser("check", parents=[common], help="check a whole config without running it",
                       description="Check a config the way every command does before Ray starts: the schema, the "
                                   "model name and weights, every surgery op replayed on the model's graph (without "
                                   "its weights), the data URIs (exist, readable, classes found) and the outputs "
                                   "(writable, no committed output with another fingerprint). Prints every problem.")
    p.add_argument("config", help="the run's YAML config")
    p.set_defaults(fn=_check)
    p = sub.add_parser("init", parents=[common], help="write a config for a folder (or manifest) of images",
                       description="Inspect an image folder (class sub-folders) or a path,label manifest: classes, "
                                   "counts, image sizes, unreadable files. Then write a commented YAML config that "
                                   "`freezeray run` accepts as it is: the model's preprocessing, featurize then a new "
                                   "head, a held-out test split when there is no test folder.")
    p.add_argument("images", help="an image folder (<class>/<image>, or train/ and test/ of those) or a manifest")
    p.add_argument("--model", default="efficientnet_lite0", help="a zoo model (default efficientnet_lite0)")
    p.add_argument("--output", default="run.yaml", help="the config to write (default run.yaml)")
    p.add_argument("--force", action="store_true", help="overwrite an existing config")
    p.set_defaults(fn=_init)
    p = sub.add_parser("summary", parents=[common], help="print the vertices of a zoo model or a saved model",
                       description="Print every vertex (name, op, inputs, output shape, parameters, frozen) and totals.")
    p.add_argument("model", help="a zoo name (e.g. vgg16, efficientnet_lite0, resnet50) or a saved model folder/URI")
    p.add_argument("--weights", default=None, help="zoo weights: imagenet, a path or URI (default: none, no download)")
    p.set_defaults(fn=_summary)
    p = sub.add_parser("demo", parents=[common],
                       help="the main job on the embedded default: digits, efficientnet_lite0, local Ray",
                       description="Write scikit-learn's handwritten digits as PNG files, then featurize them with "
                                   "efficientnet_lite0 (bundled ImageNet weights), fit a new 10-class head in Ray "
                                   "Train's local mode with early stopping, evaluate, save the model and write a "
                                   "report. No downloads.")
    p.add_argument("--workdir", default="freezeray-out", help="folder for data, features, runs, model and report")
    p.add_argument("--per-class", type=int, default=None, help="use at most this many digits per class (quick runs)")
    p.add_argument("--epochs", type=int, default=None, help="exactly this many epochs (default: early stopping)")
    p.set_defaults(fn=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    debug = getattr(args, "debug", False) or os.environ.get("FREEZERAY_DEBUG", "") not in ("", "0")
    if args.command in STEPS:
        args.config = args.config or args.config_opt
        if args.command == "run" and getattr(args, "images", None):
            if args.config:
                print("error: give a CONFIG or --images, not both", file=sys.stderr)
                return 2
            args.config = os.path.join(os.path.abspath(args.images), "freezeray.yaml")
            args.fn = lambda a: _init_and_run(a)
        elif not args.config:
            print(f"error: freezeray {args.command} needs a CONFIG", file=sys.stderr)
            return 2
    _setup_logging(getattr(args, "verbose", False))
    try:
        return args.fn(args)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except SystemExit:
        raise
    except BaseException as exc:  # every failure ends here: one line, the traceback only when asked
        failure = classify(exc)
        if debug:
            traceback.print_exc(file=sys.stderr)
        if failure is None:
            print(f"error: unexpected {type(exc).__name__}: {_first_line(exc)}"
                  + ("" if debug else " (rerun with --debug for the traceback)"), file=sys.stderr)
            return 1
        print(f"error: {failure.message}", file=sys.stderr)
        for line in failure.details:
            print(f"  {line}", file=sys.stderr)
        return failure.code


def _init_and_run(args: argparse.Namespace) -> int:
    from .init import init_config

    written, lines = init_config(args.images, model=args.model, output=args.config, force=True)
    print("\n".join(lines))
    print(f"wrote {written}")
    args.config = written
    return _step("run", args)


def main_for(step: str) -> Callable[[list[str] | None], int]:
    """``python -m jobs.<step> --config CONFIG`` is ``freezeray <step> CONFIG``."""
    def run(argv: list[str] | None = None) -> int:
        return main([step, *(sys.argv[1:] if argv is None else argv)])

    return run


if __name__ == "__main__":
    sys.exit(main())
