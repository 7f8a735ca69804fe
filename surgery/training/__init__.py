"""Training without Ray: the fine-tune configuration (:mod:`.config`, DL4J's
``FineTuneConfiguration``), the objective of a model's outputs (:mod:`.objective`), the
epoch loop with early stopping and mixed precision (:mod:`.loop`) and the training
augmentation (:mod:`.augment`). ``pipeline`` runs the loop in Ray Train workers; the
loop's names are here as well (``surgery.training.run_epochs``)."""

from .loop import (
    DEFAULT_MAX_EPOCHS,
    DEFAULT_PATIENCE,
    StepResult,
    Stopping,
    TrainState,
    cpu_bf16,
    precision,
    run_epochs,
    score_batches,
    tensor_batches,
    train_step,
)

__all__ = ["Stopping", "TrainState", "StepResult", "train_step", "score_batches", "run_epochs", "tensor_batches",
           "precision", "cpu_bf16", "DEFAULT_PATIENCE", "DEFAULT_MAX_EPOCHS"]
