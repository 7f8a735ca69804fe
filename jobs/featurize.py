"""Ray job entry point: `python -m jobs.featurize --config CONFIG` (same as `freezeray featurize CONFIG`)."""

import sys

from jobs.cli import main_for

if __name__ == "__main__":
    sys.exit(main_for("featurize")())
