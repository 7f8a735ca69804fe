"""``python -m benchmarks [NAME ...]``: run the benchmarks (all by default) with their
defaults, printing each table and writing benchmarks/results/<name>.json."""

import importlib
import sys

NAMES = ("featurize", "driver", "rows", "nodes", "cache", "head", "stream", "sweep", "staged", "demo", "scale", "storage")


def main(argv: list[str]) -> int:
    names = argv or list(NAMES)
    unknown = [n for n in names if n not in NAMES]
    if unknown:
        print(f"unknown benchmark {unknown[0]!r}; valid: {', '.join(NAMES)}", file=sys.stderr)
        return 2
    for name in names:
        print(f"== {name}")
        importlib.import_module(f"benchmarks.{name}").main([])
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
