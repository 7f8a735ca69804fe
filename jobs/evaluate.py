"""Ray job entry point: `python -m jobs.evaluate --config CONFIG` (same as `freezeray evaluate CONFIG`)."""

import sys

from jobs.cli import main_for

if __name__ == "__main__":
    sys.exit(main_for("evaluate")())
