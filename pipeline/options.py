"""The grouped settings of the training calls, in Ray's style: ``fit_head``, ``finetune``
and ``sweep`` take the data and a few of these objects, as Ray Train's ``TorchTrainer``
takes a ``ScalingConfig`` (here :class:`~pipeline.Resources`), a ``RunConfig`` (here
:class:`Run`) and a ``DataConfig`` (here :class:`Batches`), and Ray Tune's ``Tuner`` a
``TuneConfig`` (here :class:`Tuning`). When the epoch loop ends is
:class:`~surgery.training.Stopping`, the loop's own object.

Every field left out means what it meant as a keyword of version 2 (``Stopping()``: until
the validation loss stops improving; ``Batches()``: the default batch size, shuffled,
seeded by the fine-tune configuration; ``Run()``: a new run under ``~/ray_results``).
A config file's ``training:`` section keeps its flat keys (``epochs``, ``run_name``, ...);
:class:`jobs.config.TrainingSection` builds these objects from them, in one place.

Example:
    >>> pipeline.fit_head(model, "s3://b/features/train",
    ...                   stopping=Stopping(epochs=20), batches=Batches(batch_size=64, seed=1),
    ...                   resources=Resources(num_workers=2),
    ...                   run=Run(name="digits", storage="s3://b/runs", storage_options=opts, max_failures=2))
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from surgery.training.loop import Stopping

__all__ = ["Batches", "Run", "Stopping", "Tuning"]


def _positive(name: str, value: Any, *, none: bool = True) -> None:
    if value is None and none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive integer{' or None' if none else ''}, got {value!r}")


@dataclass(frozen=True)
class Batches:
    """How an epoch's training batches are drawn (Ray Train's ``DataConfig`` in small).

    Example:
        >>> Batches(batch_size=64)                         # 64 rows per worker per step
        >>> Batches(shuffle=False, seed=1)                 # rows in order; torch seeded with 1
        >>> Batches(augment=False, image_size=160)         # finetune: no augmentation, 160 px
    """

    # rows per worker per step; None: fit_head's default_batch_size of the training rows, finetune's 32
    batch_size: int | None = None
    shuffle: bool = True  # a fresh seeded permutation of the rows every epoch
    seed: int | None = None  # seeds torch and the permutations; None: the fine-tune configuration's seed, else 0
    # finetune only (images): True (None): torchvision's standard recipe (RandomResizedCrop and
    # RandomHorizontalFlip), a list of transforms.v2 objects or names, False: none
    augment: bool | Sequence[Any] | None = None
    image_size: int | None = None  # finetune only: another input size than the model's preprocessing

    def __post_init__(self) -> None:
        _positive("batch_size", self.batch_size)
        _positive("image_size", self.image_size)
        if not isinstance(self.shuffle, bool):
            raise ValueError(f"shuffle must be True or False, got {self.shuffle!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            raise ValueError(f"seed must be an integer or None, got {self.seed!r}")

    def for_features(self) -> "Batches":
        """This object, checked for training on features (which have no images to augment or resize)."""
        given = [name for name in ("augment", "image_size") if getattr(self, name) is not None]
        if given:
            raise ValueError(f"Batches({', '.join(f'{n}=...' for n in given)}) is for finetune (images); "
                             "fit_head and sweep train on features")
        return self


@dataclass(frozen=True)
class Run:
    """What a training run is called, where it is kept and how it survives (Ray Train's
    ``RunConfig`` and ``FailureConfig``).

    A run with an existing ``name`` and the same definition (model, data, fine-tune
    configuration, batches, validation; see :mod:`pipeline.runs`) resumes from its newest
    good checkpoint; with another definition it is refused (:class:`~pipeline.RunMismatch`)
    unless ``overwrite``.

    Example:
        >>> Run(name="digits", storage="s3://bucket/runs", storage_options={"key": ..., "secret": ...})
    """

    name: str | None = None  # run name under storage; None: a new name each call
    storage: str | None = None  # checkpoints (local or object storage); None: ~/ray_results
    # fsspec options for storage and every URI the call reads (features, validation, images)
    storage_options: dict[str, Any] | None = field(default=None, hash=False)
    max_failures: int = 0  # worker failures to survive (each restarts from the last checkpoint)
    overwrite: bool = False  # a run named name with another definition: delete it and start this one instead
    # called in the training process with {"event": "batch_end" | "epoch_end" | "resume", ...}
    callback: Callable[[dict[str, Any]], None] | None = field(default=None, hash=False, compare=False)

    def __post_init__(self) -> None:
        if self.name is not None and not isinstance(self.name, str):
            raise ValueError(f"name must be a string or None, got {self.name!r}")
        if not isinstance(self.max_failures, int) or isinstance(self.max_failures, bool) or self.max_failures < 0:
            raise ValueError(f"max_failures must be a non-negative integer, got {self.max_failures!r}")
        if self.callback is not None and not callable(self.callback):
            raise ValueError(f"callback must be callable, got {self.callback!r}")


@dataclass(frozen=True)
class Tuning:
    """How ``sweep`` searches (Ray Tune's ``TuneConfig``).

    Example:
        >>> Tuning(num_samples=16, metric="val_accuracy", mode="max")
    """

    num_samples: int = 1  # samples of the search space (grid searches multiply them)
    metric: str = "val_loss"  # what ranks the trials
    mode: str = "min"  # "min" or "max" of metric
    scheduler: str | None = "asha"  # "asha": stop trailing trials early; None: run every trial out
    max_concurrent_trials: int | None = None  # None: one per CPU (per GPU with use_gpu)
    use_gpu: bool = False  # one GPU per trial

    def __post_init__(self) -> None:
        _positive("num_samples", self.num_samples, none=False)
        _positive("max_concurrent_trials", self.max_concurrent_trials)
        if self.scheduler not in ("asha", None):
            raise ValueError(f"scheduler must be 'asha' or None, got {self.scheduler!r}")
