"""Seeded N-way K-shot evaluation: mean accuracy ± 1.96·std/√n over the same tasks for everyone.

Any predictor with the signature of :meth:`FewShotMethod.predict`
(``predict(support_x, support_y, query_x, ways) -> query logits``) can be
evaluated. The tasks depend only on ``config.seed``: every method and every
checkpoint evaluated with the same config sees the very same tasks.

Example::

    from mtl_plugin.evaluation import EvaluationConfig, evaluate
    result = evaluate(learner.predict, benchmark.test, EvaluationConfig(shots=1, seed=0))
    print(result)  # "61.20 ± 1.80 % (600 tasks)"
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from mtl_plugin.checks import check_seed
from mtl_plugin.errors import UsageError
from mtl_plugin.prototypes import class_prototypes, embed, prototype_logits
from mtl_plugin.tasks import build_taskset, split_support_query
from mtl_plugin.utils import distributed
from mtl_plugin.utils.progress import progress_bar

Predictor = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]

__all__ = ["EvaluationConfig", "EvaluationResult", "Predictor", "evaluate", "nearest_centroid"]


@dataclass
class EvaluationConfig:
    """The test protocol of MAML, Closer Look, RFS and MTL: 600 5-way tasks, 15 queries per class.

    Raises:
        UsageError: ``ways`` < 2, or ``shots``, ``queries`` or ``tasks`` < 1, or a ``seed`` outside
            0..:data:`~mtl_plugin.checks.MAX_SEED`.

    Example::

        config = EvaluationConfig(ways=5, shots=5, tasks=600, seed=0)
    """

    ways: int = 5
    shots: int = 1
    queries: int = 15
    tasks: int = 600
    seed: int = 0

    def __post_init__(self):
        # Caught here, not in the task sampler: shots=0 would score a head fitted on nothing and a
        # negative shots would silently slice off queries as support.
        minimums = {"ways": 2, "shots": 1, "queries": 1, "tasks": 1}
        for name, minimum in minimums.items():
            if getattr(self, name) < minimum:
                raise UsageError(f"{name}={getattr(self, name)}: a task needs {minimum} or more")
        check_seed(self.seed)


# Mean accuracies (in %) closer than this are equal: far above float rounding, far below the
# smallest difference of two results on the same tasks (EvaluationResult.beats).
_TIE = 1e-9


@dataclass
class EvaluationResult:
    """Per-task accuracies (in %) and their mean with the 95% confidence interval.

    Example::

        result = evaluate(predict, benchmark.test, EvaluationConfig())
        print(f"{result.mean:.2f} ± {result.ci95:.2f}")
    """

    accuracies: list[float]

    @property
    def mean(self) -> float:
        return sum(self.accuracies) / len(self.accuracies)

    @property
    def std(self) -> float:
        # Population std (numpy's default), as the reference implementations report it.
        mean = self.mean
        return math.sqrt(sum((a - mean) ** 2 for a in self.accuracies) / len(self.accuracies))

    @property
    def ci95(self) -> float:
        return 1.96 * self.std / math.sqrt(len(self.accuracies))

    def beats(self, accuracy: float) -> bool:
        """Whether this mean accuracy is above ``accuracy`` by more than float rounding.

        Two results on the same tasks differ by a multiple of 100 / (tasks x queries) points,
        about 2e-3 for 600 tasks of 75 queries; sums of the same per-task accuracies taken in
        another order differ by ~1e-12. A margin between the two makes an exact tie keep the
        earlier checkpoint, as a strict ``>`` on exact numbers would.

        Args:
            accuracy: the best mean accuracy so far, in %, or ``-inf``.

        Returns:
            True if this result is the better one.
        """
        return self.mean > accuracy + _TIE

    @classmethod
    def mean_of(cls, results: list[EvaluationResult]) -> EvaluationResult:
        """The per-task mean of several models' results on the same tasks.

        The CI of the mean still counts the sampling of tasks only: averaging models narrows the
        spread between training runs, which no single run's CI shows.

        Args:
            results: one result per model, all on the same tasks in the same order.

        Returns:
            A result whose accuracy on each task is the models' mean there; one result is
            returned as it is.

        Raises:
            ValueError: no result, or results over different numbers of tasks.

        Example::

            fits = [evaluate(model.predict, benchmark.val, config) for model in models]
            print(EvaluationResult.mean_of(fits))
        """
        if not results or len({len(r.accuracies) for r in results}) != 1:
            counts = [len(r.accuracies) for r in results]
            raise ValueError(f"results over {counts} tasks: give one or more results on the same tasks")
        if len(results) == 1:
            return results[0]
        return cls([sum(task) / len(results) for task in zip(*(r.accuracies for r in results))])

    def as_dict(self) -> dict:
        """Mean, CI and task count, ready for JSON or a results table."""
        return {"accuracy": self.mean, "ci95": self.ci95, "std": self.std, "tasks": len(self.accuracies)}

    def __str__(self) -> str:
        if len(self.accuracies) == 1:
            # "± 0.00" would claim a certainty that one task cannot give.
            return f"{self.mean:.2f} % (1 task: no confidence interval)"
        return f"{self.mean:.2f} ± {self.ci95:.2f} % ({len(self.accuracies)} tasks)"


def evaluate(
    predict: Predictor,
    dataset,
    config: EvaluationConfig | None = None,
    progress: bool = True,
    description: str = "evaluate",
) -> EvaluationResult:
    """Accuracy of ``predict`` on ``config.tasks`` seeded tasks drawn from ``dataset``.

    Under ``torchrun`` (an initialised process group) call it on every rank: the tasks are
    sharded across the ranks and their accuracies gathered, so every rank returns the very
    result one process computes on the same seeded tasks.

    Args:
        predict: ``(support_x, support_y, query_x, ways) -> query logits`` (or predicted labels).
        dataset: a ``MetaDataset`` (or any indexable data set of ``(image, label)``).
        config: ways, shots, queries, number of tasks and seed; ``None``: 600 5-way 1-shot tasks.
        progress: show a progress bar.
        description: the bar's label.

    Returns:
        The per-task accuracies, their mean and 95% confidence interval.

    Raises:
        ValueError: ``dataset`` has fewer than ``ways`` classes or a class with fewer than
            ``shots + queries`` images.

    Example::

        result = evaluate(method.predict, benchmark.test, EvaluationConfig(shots=5))
        print(result.as_dict())
    """
    config = config or EvaluationConfig()
    tasks = build_taskset(dataset, config.ways, config.shots, config.queries, config.tasks, config.seed)
    ranks, me = distributed.world_size(), distributed.rank()
    accuracies = []
    bar = progress_bar(range(config.tasks), desc=description, disable=not progress or me != 0, leave=False)
    with torch.no_grad():
        for i in bar:
            # Every rank draws every task's description (the draws of task i depend on the tasks
            # before it) and loads and scores only its own share.
            task_description = tasks.sample_task_description()
            if i % ranks != me:
                continue
            data, labels = tasks.get_task(task_description)
            (support_x, support_y), (query_x, query_y) = split_support_query(data, labels, config.shots)
            logits = predict(support_x, support_y, query_x, config.ways)
            # From the count, in float64: equal shares of correct queries give equal accuracies, so
            # the means of two checkpoints that score alike tie exactly (float32 shares did not).
            correct = (logits.argmax(dim=1).cpu() == query_y).sum().item()
            accuracies.append((i, 100.0 * correct / len(query_y)))
            bar.set_postfix(acc=f"{sum(a for _, a in accuracies) / len(accuracies):.2f}")
    return EvaluationResult([accuracy for _, accuracy in sorted(distributed.all_gather(accuracies))])


def nearest_centroid(encoder: nn.Module) -> Predictor:
    """A predictor that classifies queries by the nearest class mean of frozen features.

    Used to validate pretraining without fitting anything per task.

    Args:
        encoder: the feature extractor, run without gradients.

    Returns:
        ``predict(support_x, support_y, query_x, ways) -> logits`` (negative squared distances).

    Example::

        result = evaluate(nearest_centroid(backbone), benchmark.val, EvaluationConfig(tasks=100))
    """

    def predict(support_x, support_y, query_x, ways):
        prototypes = class_prototypes(embed(encoder, support_x), support_y, ways)
        return prototype_logits(embed(encoder, query_x), prototypes)

    return predict
