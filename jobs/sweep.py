"""Ray job entry point: `python -m jobs.sweep --config CONFIG` (same as `freezeray sweep CONFIG`)."""

import sys

from jobs.cli import main_for

if __name__ == "__main__":
    sys.exit(main_for("sweep")())
