"""The ``freezeray`` command: ``run | featurize | fit | sweep | finetune | evaluate |
predict | check CONFIG`` (also ``python -m jobs.<step> --config CONFIG``), ``init IMAGES``
writes a config for a folder of images, ``summary`` prints a model's vertices, ``demo``
runs the README's main job. Each connects to the cluster in ``RAY_ADDRESS`` or starts a
local Ray, after checking the whole config. The CLI is the only place that prints: a
progress bar per stage (plain lines when not a terminal), then a short result.

Every expected failure prints one ``error:`` line (and the problems, for a config) and
exits with its code (see :data:`EXIT_CODES`); the traceback only with ``--debug`` or
``FREEZERAY_DEBUG=1``. Ray's own logs stay quiet unless ``--verbose`` or
``FREEZERAY_VERBOSE=1``. ``--debug`` and ``--verbose`` go before or after the command.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import traceback
from typing import Any, Callable

from freezeray.errors import DataUnavailable, FreezerayError, InvalidInput, OutputConflict

from .errors import CliError

__all__ = ["main", "main_for", "classify", "version", "STEPS", "EXIT_CODES"]

STEPS = ("run", "featurize", "fit", "sweep", "finetune", "evaluate", "predict")

EXIT_CODES = {
    0: "success",
    1: "an unexpected error (a bug: rerun with --debug and report the traceback)",
    2: "the config, the command line or an input is invalid (every problem is listed), or a run name is taken by a "
       "run with another definition",
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


# what a pipeline error's hint says in Python terms, and what a CLI user does instead (a
# stopgap until the pipeline's errors name their option as data, not in their text)
_CLI_TERMS = (
    ("pass overwrite=True", "rerun with --overwrite (featurize.overwrite: true)"),
    ("pass allow_outside=True", "set data.allow_outside: true"),
    ("pass allow_empty=True", "set data.allow_empty: true"),
    ("pass boundary='<vertex>'", "set featurize.boundary"),
    ("pass weights=", "set model.weights to "),
)


def cli_terms(text: str) -> str:
    """``text`` with the pipeline's Python-syntax hints put in the CLI's terms."""
    for api, cli in _CLI_TERMS:
        text = text.replace(api, cli)
    return text


def version() -> str:
    """The installed freezeray's version."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("freezeray")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree that is not installed
        return "unknown (not installed)"


def _setup_logging(verbose: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s", "%H:%M:%S"))
    for name in ("freezeray", "surgery", "pipeline", "jobs"):
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
    return cli_terms(text.splitlines()[0]) if text else type(exc).__name__


def classify(exc: BaseException) -> CliError | None:
    """The exit code and message of an expected failure; None for anything else. By class
    (:mod:`freezeray.errors`), over the error and its causes: a config or check failure
    with its problem list, a run name taken, out of memory, then data, storage and output
    errors, then invalid input."""
    from jobs.check import CheckFailed
    from jobs.config import ConfigError
    from pipeline.runs import RunMismatch

    chain = _chain(exc)
    names = {type(e).__name__ for e in chain}
    for e in chain:
        if isinstance(e, CliError):
            return e
        if isinstance(e, RunMismatch):
            hint = f"set {e.config_path} to another name, or rerun with --overwrite (training.overwrite: true) to start it again"
            return CliError(e.exit_code, f"{e.config_path}: {e.describe(hint)}")
        if isinstance(e, (ConfigError, CheckFailed)):
            return CliError(2, f"{getattr(e, 'source', '') or 'the config'}: {len(e.problems)} problem"
                               f"{'s' if len(e.problems) != 1 else ''}", list(e.problems))
    text = " ".join(_first_line(e) for e in chain)
    if names & {"OutOfMemoryError", "OutOfMemoryException"} or "out of memory" in text.lower() \
            or "can't allocate memory" in text:
        return CliError(6, f"out of memory: {_first_line(chain[-1])}",
                        ["hint: lower the batch size (featurize.batch_size, training.batch_size) or give each "
                         "worker more memory"])
    for e in chain:  # data, storage and outputs first: their codes say more than a ValueError below them
        if isinstance(e, FreezerayError) and not isinstance(e, InvalidInput):
            return CliError(e.exit_code, _first_line(e))
        if isinstance(e, FileExistsError):
            return CliError(OutputConflict.exit_code, _first_line(e))
        if isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
            return CliError(DataUnavailable.exit_code, _first_line(e))
    for e in chain:
        if isinstance(e, (InvalidInput, ValueError, TypeError)):
            return CliError(InvalidInput.exit_code, _first_line(e))
    return None


def _load(path: str, base_dir: str = "") -> Any:
    from .config import load_config

    return load_config(path, base_dir)


def _connect(args: argparse.Namespace) -> None:
    from . import steps

    steps.connect()  # quiet unless --verbose (main sets it for the command) or FREEZERAY_VERBOSE=1


def _step(name: str, args: argparse.Namespace) -> int:
    import surgery

    from . import steps
    from .check import check_config
    from .outcome import SHOWN_ERRORS, ErrorGroup, error_line, feature_errors, outcome_lines
    from .progress import Reporter

    cfg = _load(args.config)
    if getattr(args, "overwrite", False):  # --overwrite: featurize.overwrite and training.overwrite
        cfg = cfg.with_(featurize=cfg.featurize.model_copy(update={"overwrite": True}),
                        training=cfg.training.model_copy(update={"overwrite": True}))
    check_config(cfg, step=name)  # the whole config, before Ray starts
    started = time.perf_counter()
    report = Reporter()
    if name != "run":
        steps.mark_outputs(cfg, name)
    if name == "run":
        _connect(args)
        outcome = steps.run_all(cfg, report)
        report.close()
        print("\n".join(outcome_lines(outcome, time.perf_counter() - started)))
        return 0
    if name in ("evaluate", "predict"):
        model = surgery.load(steps.resolve(cfg, cfg.outputs.model), cfg.data.storage_options or None)
    else:
        model = steps.build_model(cfg)
    _connect(args)
    if name == "featurize":
        for split, fset in steps.featurize_step(cfg, model, report).items():
            print(f"{split}: {fset.rows} rows, {fset.errors} unreadable -> {fset.uri}"
                  f"{' (reused)' if fset.reused else ''}")
            if fset.errors:
                print(error_line(feature_errors(fset, split, SHOWN_ERRORS)))
    elif name in ("fit", "finetune", "sweep"):
        if name == "sweep":
            result = steps.sweep_step(cfg, model)
            print(result.table.head(10).to_string(index=False))
            if result.reused:
                print(f"reused the finished sweep {cfg.training.run_name!r} (same name and definition): no trial ran")
            trained = result.best_model
        else:
            result = steps.fit_step(cfg, model, progress=report) if name == "fit" else steps.finetune_step(cfg, model, report)
            best = result.metrics
            print(f"{len(result.stages)} stages, " * bool(result.stages) + f"{len(result.history)} epochs; best epoch "
                  f"{result.best_epoch}{' of the last stage' * bool(result.stages)}: "
                  + ", ".join(f"{k} {v:.4f}" for k, v in best.items() if isinstance(v, float) and k != "seconds")
                  + f"{' (run ' + repr(result.run) + ' resumed: same name and definition)' if result.resumed else ''}")
            trained = result.model
        if cfg.outputs.model is not None:
            surgery.save(trained, steps.resolve(cfg, cfg.outputs.model), cfg.data.storage_options or None)
            print(f"model: {steps.resolve(cfg, cfg.outputs.model)}")
    elif name == "evaluate":
        ev = steps.evaluate_step(cfg, model)
        print(ev.table())
        if ev.errors:
            rows = [(r["path"], r["reason"]) for r in ev.error_examples]
            print(error_line(ErrorGroup("test", ev.errors, rows, ev.errors_uri)))
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
    cfg, counts, where = demo_config(args.workdir, task=args.task, per_class=args.per_class, epochs=args.epochs)
    print(f"{args.task}: {counts['train']} train and {counts['test']} test images in {where}")
    _connect(args)
    report = Reporter()
    outcome = run_all(cfg, report)
    report.close()
    print("\n".join(outcome_lines(outcome, time.perf_counter() - started)))
    return 0


def _init(args: argparse.Namespace) -> int:
    from .init import init_config

    written, lines = init_config(args.images, model=args.model, output=args.output, force=args.force,
                                 splits=args.splits)
    print("\n".join(lines))
    print(f"wrote {written}; run it with: freezeray run {written}")
    return 0


def _parser(prog: str = "freezeray") -> argparse.ArgumentParser:
    codes = "; ".join(f"{code} {what}" for code, what in EXIT_CODES.items())
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Transfer learning at dataset scale: DL4J-style model surgery on PyTorch graphs, "
                    "featurization with Ray Data, head training with Ray Train, sweeps with Ray Tune.",
        epilog=f"Set RAY_ADDRESS to use a running cluster; otherwise a local Ray is started. Ray's own logs stay quiet "
               f"unless --verbose (or FREEZERAY_VERBOSE=1). Exit codes: {codes}.",
    )
    parser.add_argument("--version", action="version", version=f"freezeray {version()}")
    flags = (("-v", "--verbose"), "debug logs, Ray's own logs and progress, and worker output (or FREEZERAY_VERBOSE=1)"), \
        (("--debug",), "print the traceback of a failure (or FREEZERAY_DEBUG=1)")
    for names, text in flags:  # before the command ...
        parser.add_argument(*names, action="store_true", help=text)
    common = argparse.ArgumentParser(add_help=False)
    for names, text in flags:  # ... or after it (SUPPRESS: not given here keeps what was given before)
        common.add_argument(*names, action="store_true", default=argparse.SUPPRESS, help=text)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in STEPS:
        p = sub.add_parser(name, parents=[common], help=_HELP[name],
                           description=f"{_HELP[name]}. Driven by a YAML config (see jobs/configs/ for examples); the "
                                       "whole config is checked before Ray starts (see `freezeray check`).")
        p.add_argument("config", nargs="?", help="the run's YAML config")
        p.add_argument("--config", dest="config_opt", metavar="CONFIG", help="same as the positional CONFIG")
        if name in ("run", "featurize", "fit", "sweep", "finetune"):
            p.add_argument("--overwrite", action="store_true",
                           help="replace what another definition left in the outputs: features of another model, "
                                "preprocessing or images (featurize.overwrite), a run of training.run_name trained "
                                "otherwise (training.overwrite)")
        if name == "run":
            p.add_argument("--images", metavar="DIR", help="no config: write one for this image folder (as "
                           "`freezeray init DIR`) and run it; the config and every output go beside DIR "
                           "(DIR.yaml and DIR-out/), never inside it")
            p.add_argument("--model", default="efficientnet_lite0", help="with --images: the zoo model (default "
                           "efficientnet_lite0)")
            p.add_argument("--output", metavar="CONFIG", help="with --images: the config to write instead of DIR.yaml "
                           "(its outputs go beside it, in <name>-out/)")
            p.add_argument("--force", action="store_true", help="with --images: replace a config you edited")
        p.set_defaults(fn=lambda a, _n=name: _step(_n, a))
    p = sub.add_parser("check", parents=[common], help="check a whole config without running it",
                       description="Check a config the way every command does before Ray starts: the schema, the "
                                   "model name and weights, every surgery op replayed on the model's graph (without "
                                   "its weights), the data URIs (exist, readable, classes found) and the outputs "
                                   "(writable, outside the image folders, no committed output with another "
                                   "fingerprint). Prints every problem.")
    p.add_argument("config", help="the run's YAML config")
    p.set_defaults(fn=_check)
    p = sub.add_parser("init", parents=[common], help="write a config for a folder (or manifest) of images",
                       description="Inspect an image folder (class sub-folders) or a path,label manifest: classes, "
                                   "counts, image sizes, unreadable files (a sample decoded in full). Then write a "
                                   "commented YAML config that `freezeray run` accepts as it is: the model's "
                                   "preprocessing, featurize then a new head, a held-out test split when there is no "
                                   "test folder. Nothing is written into the image folder.")
    p.add_argument("images", help="an image folder (<class>/<image>, or train/ and test/ of those) or a manifest")
    p.add_argument("--model", default="efficientnet_lite0", help="a zoo model (default efficientnet_lite0)")
    p.add_argument("--output", default="run.yaml", help="the config to write (default run.yaml); outputs go beside "
                   "it, in <name>-out/")
    p.add_argument("--splits", metavar="DIR", default=None, help="folder for the train/test split manifests (default: "
                   "<name>-out/splits beside the config; the image folder is never written unless named here)")
    p.add_argument("--force", action="store_true", help="replace an existing config, even one you edited or one "
                   "init did not write")
    p.set_defaults(fn=_init)
    p = sub.add_parser("summary", parents=[common], help="print the vertices of a zoo model or a saved model",
                       description="Print every vertex (name, op, inputs, output shape, parameters, frozen) and totals.")
    p.add_argument("model", help="a zoo name (e.g. vgg16, efficientnet_lite0, resnet50) or a saved model folder/URI")
    p.add_argument("--weights", default=None, help="zoo weights: imagenet, a path or URI (default: none, no download)")
    p.set_defaults(fn=_summary)
    p = sub.add_parser("demo", parents=[common],
                       help="the main job on the embedded default: surfaces, efficientnet_lite0, local Ray",
                       description="Write the demo's images (surfaces: patches of ten pictures that ship in "
                                   "scikit-image, test patches from parts of each picture training never sees), then "
                                   "featurize them with efficientnet_lite0 (bundled ImageNet weights), fit a new "
                                   "10-class head in Ray Train's local mode with early stopping, evaluate, compare "
                                   "with two baselines (a linear model on pixels, the same head on a random "
                                   "backbone), save the model and write a report. No downloads.")
    p.add_argument("--task", choices=("surfaces", "digits"), default="surfaces",
                   help="surfaces (default; jobs/configs/surfaces.yaml) or scikit-learn's digits (digits.yaml)")
    p.add_argument("--workdir", default="freezeray-out", help="folder for data, features, runs, model and report")
    p.add_argument("--per-class", type=int, default=None, help="a smaller version (quick runs): this many images "
                   "a class (surfaces: training patches, and half as many test ones; digits: split 75/25)")
    p.add_argument("--epochs", type=int, default=None, help="exactly this many epochs (default: early stopping)")
    p.set_defaults(fn=_demo)
    return parser


def images_config(images: str, output: str | None = None) -> str:
    """Where ``freezeray run --images DIR`` writes its config: ``output``, else ``DIR.yaml``
    beside ``DIR`` (its outputs then go to ``DIR-out/``, beside it too)."""
    if output:
        return os.path.abspath(output)
    if "://" in images:
        raise CliError(2, f"--images {images}: give --output CONFIG (a local path) for a folder in object storage")
    return os.path.abspath(images.rstrip("/")) + ".yaml"


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    debug = getattr(args, "debug", False) or os.environ.get("FREEZERAY_DEBUG", "") not in ("", "0")
    if args.command in STEPS:
        args.config = args.config or args.config_opt
        if args.command == "run" and getattr(args, "images", None):
            if args.config:
                print("error: give a CONFIG or --images, not both", file=sys.stderr)
                return 2
            args.fn = lambda a: _init_and_run(a)
        elif not args.config:
            print(f"error: freezeray {args.command} needs a CONFIG", file=sys.stderr)
            return 2
        elif getattr(args, "output", None) or getattr(args, "force", False):
            print("error: --output and --force go with --images (a CONFIG is run as it is)", file=sys.stderr)
            return 2
    verbose = getattr(args, "verbose", False)
    _setup_logging(verbose)
    if verbose:  # for this command; the library's own setting afterwards
        from pipeline.runtime import set_verbose

        set_verbose(True)
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
        print(f"error: {cli_terms(failure.message)}", file=sys.stderr)
        for line in failure.details:
            print(f"  {cli_terms(line)}", file=sys.stderr)
        return failure.code
    finally:
        if verbose:
            from pipeline.runtime import set_verbose

            set_verbose(None)


def _init_and_run(args: argparse.Namespace) -> int:
    """``run --images DIR``: (re)write the config beside DIR, then run it. A config init
    wrote before and nobody edited is written again (the same, for the same images, so
    the run reuses its features); an edited one is refused without --force."""
    from .init import init_config

    config = images_config(args.images, args.output)
    written, lines = init_config(args.images, model=args.model, output=config, force=args.force, rerun=True)
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
