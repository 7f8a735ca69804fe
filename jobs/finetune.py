"""Ray job entry point: `python -m jobs.finetune --config CONFIG` (same as `freezeray finetune CONFIG`)."""

import sys

from jobs.cli import main_for

if __name__ == "__main__":
    sys.exit(main_for("finetune")())
