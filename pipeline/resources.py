"""``Resources``: the Ray resources of a pipeline step, in one object (as Ray Train's
``ScalingConfig`` groups them), the same in the API and in a config's ``resources:``."""

from __future__ import annotations

from pydantic import Field

from freezeray.schema import Schema

__all__ = ["Resources"]


class Resources(Schema):
    """How a step uses the cluster; every field left out is chosen by the step.

    Example:
        >>> pipeline.featurize(model, src, out, resources=Resources(num_workers=4, use_gpu=True))
        >>> pipeline.fit_head(model, features, resources=Resources(num_workers=2, cpus_per_worker=2))
    """

    # featurize/evaluate/predict: model actors (None: one per GPU, or one per node on CPU
    # clusters); fit_head/finetune: Ray Train workers (0: local mode; None: automatic)
    num_workers: int | None = Field(default=None, ge=0)
    use_gpu: bool | None = None  # None: featurize/evaluate/predict use GPUs when the cluster has them, training does not
    # CPUs Ray reserves per actor or worker; None: featurize: what decoding leaves; training: 1
    cpus_per_worker: float | None = Field(default=None, gt=0)
    gpus_per_worker: float | None = Field(default=None, ge=0)  # None: 1 with a GPU
    threads_per_worker: int | None = Field(default=None, gt=0)  # torch threads per CPU actor; None: the node's CPUs shared by its actors

    def for_training(self) -> tuple[int | None, bool, float]:
        """``(num_workers, use_gpu, cpus_per_worker)`` as the training calls read them: no
        GPU unless asked for, one CPU per worker unless given."""
        return self.num_workers, bool(self.use_gpu), float(self.cpus_per_worker or 1.0)
