"""Ray job entry point: `python -m jobs.fit --config CONFIG` (same as `freezeray fit CONFIG`)."""

import sys

from jobs.cli import main_for

if __name__ == "__main__":
    sys.exit(main_for("fit")())
