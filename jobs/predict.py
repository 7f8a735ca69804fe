"""Ray job entry point: `python -m jobs.predict --config CONFIG` (same as `freezeray predict CONFIG`)."""

import sys

from jobs.cli import main_for

if __name__ == "__main__":
    sys.exit(main_for("predict")())
