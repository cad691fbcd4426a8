"""The hard-task (HT) meta-batch of Sun et al. (CVPR 2019) for learn2learn ``Taskset``s.

Each meta-batch holds ``k`` normal tasks, then ``k'`` hard tasks built from the
classes the model got most wrong in those ``k`` tasks (Algorithm 2 of the paper):

* :class:`ClassAccuracyTracker` records, after each normal task, every class's
  query accuracy and the task's *failure class* (its lowest-accuracy class, ties
  broken by the lowest logit margin), and keeps a decaying history of failures
  across meta-batches;
* :class:`HardTaskTransform` is a task transform that replaces ``NWays`` in a
  ``Taskset`` and builds N-way tasks from failure classes only, as soon as N of
  them are known: this meta-batch's, then the most-failed of the history;
* :class:`HardTaskMetaBatch` draws the meta-batches from a normal and a hard
  ``Taskset`` and hands every task over with its data-set classes and indices:
  one at a time from ``sample()``, in place of a learn2learn loop's
  ``tasksets.train.sample()``, or a meta-batch at a time; :func:`record_task`
  records a normal task's query results from inside ``fast_adapt``.

A meta-batch of ``k`` normal and ``k'`` hard tasks holds only ``k`` fresh tasks.

The tracker's state lives in the main process. Hard tasks must therefore be built
there: :class:`HardTaskMetaBatch` draws every task description itself (no
``DataLoader``), and :class:`HardTaskTransform` raises when it runs in a
``DataLoader`` worker, whose copy of the tracker never sees new failures. A hard
``Taskset`` may be read through a ``DataLoader`` with ``num_workers=0``.
learn2learn caches task descriptions when ``num_tasks > 0``: ``HardTaskMetaBatch``
bypasses that cache, and a hard task loaded from it after the tracker changed
raises instead of silently repeating old failure classes.

Example::

    tracker = ClassAccuracyTracker(md, seed=0)
    hard = Taskset(md, [HardTaskTransform(md, n=5, tracker=tracker, seed=0),
                        KShots(md, k=16, seed=0), LoadData(md), RemapLabels(md, seed=0)])
    for meta_batch in itertools.islice(HardTaskMetaBatch(normal, hard, k=2, seed=0), 1000):
        for task in meta_batch:  # 2 normal tasks, then 2 hard tasks drawn after they are recorded
            ...  # adapt on the support set, compute query logits, meta-update
            if not task.hard:
                tracker.record(task.classes, query_logits, query_labels, indices=task.indices)
"""

from mtl_plugin.hard_tasks.meta_batch import HardTaskMetaBatch, MetaBatch, SampledTask, record_task
from mtl_plugin.hard_tasks.tracker import ClassAccuracyTracker, TaskAccuracy, task_classes
from mtl_plugin.hard_tasks.transform import HardTaskTransform

__all__ = [
    "ClassAccuracyTracker",
    "HardTaskMetaBatch",
    "HardTaskTransform",
    "MetaBatch",
    "SampledTask",
    "TaskAccuracy",
    "record_task",
    "task_classes",
]
