"""Ray job entry point: `python -m jobs.run --config CONFIG` (same as `freezeray run CONFIG`)."""

import sys

from jobs.cli import main_for

if __name__ == "__main__":
    sys.exit(main_for("run")())
