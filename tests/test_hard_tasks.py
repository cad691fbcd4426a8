import itertools
from dataclasses import replace

import learn2learn as l2l
import pytest
import torch
from learn2learn.data.transforms import LoadData
from torch.utils.data import DataLoader, Dataset

from mtl_plugin.hard_tasks import (
    ClassAccuracyTracker,
    HardTaskMetaBatch,
    HardTaskTransform,
    record_task,
    task_classes,
)
from mtl_plugin.tasks import KShots, NWays, RemapLabels, build_taskset, split_support_query

SHOTS, QUERIES = 1, 3


class IndexDataset(Dataset):
    """Sample i is ``(tensor([i]), i % num_classes)``: a loaded task tells which images it holds."""

    def __init__(self, num_classes, per_class):
        self.num_classes = num_classes
        self.size = num_classes * per_class

    def __len__(self):
        return self.size

    def __getitem__(self, i):
        return torch.tensor([float(i)]), i % self.num_classes


def make_dataset(num_classes=10, per_class=20):
    return l2l.data.MetaDataset(IndexDataset(num_classes, per_class))


def hard_taskset(md, tracker, n=5, mode="resample", num_tasks=-1, seed=0):
    transforms = [
        HardTaskTransform(md, n=n, tracker=tracker, mode=mode, seed=seed),
        KShots(md, k=SHOTS + QUERIES, seed=seed),
        LoadData(md),
        RemapLabels(md, seed=seed),
    ]
    return l2l.data.Taskset(md, transforms, num_tasks=num_tasks)


def stub_logits(task, weak_class):
    """Query logits of a model that is always right except on ``weak_class``, which it always gets wrong."""
    _, (_, yq) = split_support_query(task.data, task.labels, SHOTS)
    predictions = yq.clone()
    weak = [j for j, label in enumerate(task.classes) if label == weak_class]
    if weak:
        predictions[yq == weak[0]] = (weak[0] + 1) % len(task.classes)
    return torch.nn.functional.one_hot(predictions, len(task.classes)).float(), yq


def graded_logits(task, skill):
    """Query logits of a model that knows class c with margin ``skill[c]`` (wrong where it is negative)."""
    _, (_, yq) = split_support_query(task.data, task.labels, SHOTS)
    margins = torch.tensor([skill[task.classes[y]] for y in yq.tolist()])
    logits = torch.zeros(len(yq), len(task.classes))
    logits[torch.arange(len(yq)), yq] = margins
    return logits, yq


def run(md, k, k_hard, meta_batches, weak_class=3, mode="resample", history_decay=None, seed=0):
    tracker = ClassAccuracyTracker(md, seed=seed, history_decay=history_decay)
    normal = build_taskset(md, ways=5, shots=SHOTS, queries=QUERIES, seed=seed)
    sampler = HardTaskMetaBatch(normal, hard_taskset(md, tracker, mode=mode, seed=seed), k=k, k_hard=k_hard, seed=seed)
    seen = []
    for meta_batch in itertools.islice(sampler, meta_batches):
        for task in meta_batch:
            if not task.hard:
                logits, yq = stub_logits(task, weak_class)
                tracker.record(task.classes, logits, yq, indices=task.indices)
            seen.append(task)
    return seen


def test_always_failed_class_is_in_almost_every_hard_task():
    hard = [task for task in run(make_dataset(10), k=8, k_hard=8, meta_batches=30) if task.hard]
    share = sum(3 in task.classes for task in hard) / len(hard)
    assert len(hard) == 240
    assert share >= 0.95


def test_history_keeps_the_failed_class_between_meta_batches():
    # 20 classes and k=2: most meta-batches never see class 3, so only the history brings it back.
    hard = [task for task in run(make_dataset(20), k=2, k_hard=2, meta_batches=60, history_decay=0.9) if task.hard]
    assert sum(3 in task.classes for task in hard) / len(hard) >= 0.95


def test_history_is_on_by_default():
    assert ClassAccuracyTracker(make_dataset()).history_decay == 0.9


def test_hard_tasks_are_made_of_n_failure_classes_once_enough_exist():
    # 6 of 20 classes are always wrong (the more negative, the worse), the rest always right. Two normal
    # tasks a meta-batch give at most 2 failure classes: the default history supplies the others.
    md = make_dataset(20)
    skill = {c: (c - 6.0 if c < 6 else 1.0 + c) for c in range(20)}
    tracker = ClassAccuracyTracker(md, seed=0)
    sampler = HardTaskMetaBatch(
        build_taskset(md, ways=5, shots=SHOTS, queries=QUERIES, seed=0),
        hard_taskset(md, tracker),
        k=2,
        k_hard=2,
        seed=0,
    )
    weak_slots, checked = [], 0
    for meta_batch in itertools.islice(sampler, 40):
        for task in meta_batch.normal:
            tracker.record(task.classes, *graded_logits(task, skill))
        failure_classes = set(tracker.failure_classes) | set(tracker.history)
        for task in meta_batch.hard():
            weak_slots += [c < 6 for c in task.classes]
            if len(failure_classes) >= 5:
                assert set(task.classes) <= failure_classes  # no random class while N failure classes exist
                checked += 1
    assert checked >= 50
    # A normal task's classes are 30% weak ones; the hard tasks' are mostly weak.
    assert sum(weak_slots) / len(weak_slots) >= 0.7


def test_failure_ties_are_broken_by_the_lowest_margin():
    md = make_dataset()
    failures = set()
    for seed in range(10):
        tracker = ClassAccuracyTracker(md, seed=seed)
        # Every query right (a tie at 100%); class 7's queries win by the smallest margin.
        logits = torch.tensor([[3.0, 0.0, 0.0], [0.0, 0.5, 0.2], [0.0, 0.0, 2.0], [2.5, 0.0, 0.0]])
        result = tracker.record([4, 7, 9], logits, torch.tensor([0, 1, 2, 0]))
        assert result.margins == pytest.approx({4: 2.75, 7: 0.3, 9: 2.0})
        failures.add(result.failure)
    assert failures == {7}


def test_history_fills_up_by_descending_score_then_margin():
    md = make_dataset()
    tracker = ClassAccuracyTracker(md, seed=0, history_decay=0.5)
    # (classes, predicted labels as logits, targets): each task's failure class and its error rate.
    wrong = lambda n: torch.nn.functional.one_hot(torch.ones(n, dtype=torch.long), 2).float()  # noqa: E731
    tracker.start_meta_batch()
    tracker.record([1, 0], wrong(2), torch.tensor([0, 0]))  # class 1 fails, error 1
    tracker.record([2, 0], wrong(2), torch.tensor([0, 0]))  # class 2 fails, error 1
    tracker.start_meta_batch()
    tracker.record([3, 0], wrong(2), torch.tensor([0, 0]))  # class 3 fails, error 1
    tracker.record([1, 0], wrong(2), torch.tensor([0, 0]))  # class 1 again
    tracker.start_meta_batch()  # scores: 1 -> 1.5, 3 -> 1, 2 -> 0.5
    tracker.record([5, 0], torch.tensor([[0.0, 1.0], [0.0, 2.0]]), torch.tensor([0, 1]))  # class 5, error 1
    assert tracker.history_order() == [1, 3, 2]
    for seed in range(5):
        description = HardTaskTransform(md, n=3, tracker=tracker, seed=seed)(None)
        # This meta-batch's failure first, then the two highest scores: never a random class.
        assert {md.indices_to_labels[dd.index] for dd in description} == {5, 1, 3}


def test_tasks_are_loaded_as_described():
    md = make_dataset()
    for task in run(md, k=2, k_hard=2, meta_batches=3):
        assert task.data.squeeze(1).long().tolist() == list(task.indices)
        assert [task.classes[y] for y in task.labels.tolist()] == [md.indices_to_labels[i] for i in task.indices]
        assert len(set(task.classes)) == 5


def failed_and_hard_images(mode):
    md = make_dataset(10, per_class=40)
    tracker = ClassAccuracyTracker(md, seed=0)
    normal = build_taskset(md, ways=5, shots=SHOTS, queries=QUERIES, seed=1)
    sampler = HardTaskMetaBatch(normal, hard_taskset(md, tracker, mode=mode), k=1, k_hard=3, seed=0)
    meta_batch = sampler.sample_meta_batch()
    task = meta_batch.normal[0]
    weak = task.classes[0]
    logits, yq = stub_logits(task, weak)
    failed = set(tracker.record(task.classes, logits, yq, indices=task.indices).failure_indices)
    assert failed == {i for i in task.indices if md.indices_to_labels[i] == weak}
    hard_images = [{i for i in hard.indices if md.indices_to_labels[i] == weak} for hard in meta_batch.hard()]
    return failed, hard_images


def test_resample_draws_new_images_of_the_failed_class():
    failed, hard_images = failed_and_hard_images("resample")
    assert all(len(images) == SHOTS + QUERIES and images != failed for images in hard_images)


def test_reuse_takes_the_failed_task_images():
    failed, hard_images = failed_and_hard_images("reuse")
    assert all(images == failed for images in hard_images)


def test_reuse_without_recorded_indices_says_what_to_do():
    md = make_dataset()
    tracker = ClassAccuracyTracker(md, seed=0)
    tracker.record([1, 2], torch.tensor([1, 1]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="indices=task.indices"):
        hard_taskset(md, tracker, mode="reuse").sample()


def test_seeded_runs_are_identical():
    md = make_dataset()
    first = [(t.classes, t.indices, t.hard) for t in run(md, k=2, k_hard=3, meta_batches=10, mode="resample")]
    second = [(t.classes, t.indices, t.hard) for t in run(md, k=2, k_hard=3, meta_batches=10, mode="resample")]
    other = [(t.classes, t.indices, t.hard) for t in run(md, k=2, k_hard=3, meta_batches=10, seed=1)]
    assert first == second
    assert first != other


def test_empty_tracker_samples_like_nways():
    md = make_dataset()
    hard, nways = HardTaskTransform(md, n=5, tracker=ClassAccuracyTracker(md), seed=7), NWays(md, 5, seed=7)
    assert [[dd.index for dd in hard(None)] for _ in range(5)] == [[dd.index for dd in nways(None)] for _ in range(5)]


def test_few_failures_are_filled_with_other_classes_without_duplicates():
    md = make_dataset()
    tracker = ClassAccuracyTracker(md, seed=0)
    tracker.record([4, 6], torch.tensor([1, 1, 1]), torch.tensor([0, 0, 1]))  # class 4 fails
    transform = HardTaskTransform(md, n=5, tracker=tracker, seed=0)
    for _ in range(20):
        labels = {md.indices_to_labels[dd.index] for dd in transform(None)}
        assert len(labels) == 5 and 4 in labels


def test_ties_are_broken_by_the_seed():
    md = make_dataset()
    draws = []
    for _ in range(2):
        tracker = ClassAccuracyTracker(md, seed=5)
        draws.append([tracker.record([0, 1, 2], torch.arange(3), torch.arange(3)).failure for _ in range(20)])
    assert draws[0] == draws[1] and len(set(draws[0])) > 1


def test_dataloader_without_workers_sees_the_live_tracker():
    md = make_dataset()
    tracker = ClassAccuracyTracker(md, seed=0)
    loader = DataLoader(hard_taskset(md, tracker), batch_size=None, num_workers=0)
    for weak in (2, 7):
        tracker.start_meta_batch()
        tracker.record([weak, 0], torch.tensor([1, 1]), torch.tensor([0, 1]))
        x, _ = next(iter(loader))
        assert weak in {md.indices_to_labels[i] for i in x.squeeze(1).long().tolist()}


def test_dataloader_workers_are_refused():
    md = make_dataset()
    loader = DataLoader(hard_taskset(md, ClassAccuracyTracker(md)), batch_size=None, num_workers=1)
    batches = iter(loader)
    with pytest.raises(RuntimeError, match="DataLoader worker"):
        next(batches)
    # Left to the garbage collector, the failed iterator takes torch's 5 s join timeout to let its worker go.
    batches._shutdown_workers()


def test_cached_hard_task_raises_once_stale():
    md = make_dataset()
    tracker = ClassAccuracyTracker(md, seed=0)
    tasks = hard_taskset(md, tracker, num_tasks=4)
    tasks[0]
    tasks[0]  # nothing recorded in between: still fresh
    tracker.record([1, 2], torch.tensor([1, 1]), torch.tensor([0, 1]))
    with pytest.raises(RuntimeError, match="num_tasks=-1"):
        tasks[0]


def test_meta_batch_bypasses_the_hard_taskset_cache():
    md = make_dataset()
    tracker = ClassAccuracyTracker(md, seed=0)
    normal = build_taskset(md, ways=5, shots=SHOTS, queries=QUERIES, num_tasks=3, seed=0)
    sampler = HardTaskMetaBatch(normal, hard_taskset(md, tracker, num_tasks=2), k=2, seed=0)
    seen = set()
    for meta_batch in itertools.islice(sampler, 5):
        for task in meta_batch:
            if not task.hard:
                logits, yq = stub_logits(task, task.classes[0])
                tracker.record(task.classes, logits, yq)
                seen.add(task.indices)
            else:
                assert set(tracker.failure_classes) <= set(task.classes)
    # A pool of num_tasks=3 normal tasks, kept by the sampler: learn2learn's cache is not written.
    assert 1 < len(seen) <= 3
    assert len(normal.sampled_descriptions) == 0


def test_a_sampled_task_unpacks_like_a_learn2learn_task_and_records_itself():
    md = make_dataset()
    tracker = ClassAccuracyTracker(md, seed=0)
    sampler = HardTaskMetaBatch(build_taskset(md, 5, SHOTS, QUERIES, seed=0), hard_taskset(md, tracker), k=2, seed=0)
    meta_batch = sampler.sample_meta_batch()
    for task in meta_batch:
        data, labels = task
        assert data is task.data and labels is task.labels
        logits, yq = stub_logits(task, task.classes[0])
        result = task.record(logits, yq)
        assert (result is None) == task.hard
    assert len(tracker.failures) == 2
    loose = replace(meta_batch.normal[0], tracker=None)
    with pytest.raises(ValueError, match="tracker.record"):
        loose.record(logits, yq)


def test_sample_hands_over_a_meta_batch_one_task_at_a_time_like_a_taskset():
    md = make_dataset()
    normal = build_taskset(md, ways=5, shots=SHOTS, queries=QUERIES, seed=0)
    sampler = HardTaskMetaBatch.from_taskset(normal, k=2, k_hard=1, seed=0)
    for _ in range(2):  # two meta-batches of 2 normal tasks, then 1 hard task of their failure classes
        tasks = []
        for _ in range(3):
            task = sampler.sample()
            logits, yq = stub_logits(task, weak_class=task.classes[0])
            result = record_task(task, logits, yq)
            assert (result is None) == task.hard
            tasks.append(task)
        assert [task.hard for task in tasks] == [False, False, True]
        assert {tasks[0].classes[0], tasks[1].classes[0]} <= set(tasks[2].classes)
        assert len(sampler.tracker.failures) == 2
    # A learn2learn task (tasksets.test's, say) goes through the same fast_adapt and is not recorded.
    assert record_task(normal.sample(), torch.zeros(5 * QUERIES, 5), torch.zeros(5 * QUERIES).long()) is None
    assert len(sampler.tracker.failures) == 2


def test_sample_meta_batch_ends_the_meta_batch_sample_was_handing_over():
    md = make_dataset()
    sampler = HardTaskMetaBatch.from_taskset(build_taskset(md, 5, SHOTS, QUERIES, seed=0), k=2, seed=0)
    sampler.sample()
    assert len(sampler.sample_meta_batch().normal) == 2
    # Two normal tasks of a new meta-batch: the old one would now be due a hard task (and raise, unrecorded).
    assert not sampler.sample().hard and not sampler.sample().hard


def test_hard_tasks_before_recording_raise():
    md = make_dataset()
    tracker = ClassAccuracyTracker(md)
    sampler = HardTaskMetaBatch(build_taskset(md, 5, SHOTS, QUERIES), hard_taskset(md, tracker), k=2)
    with pytest.raises(RuntimeError, match="recorded"):
        sampler.sample_meta_batch().hard()
    sampler.sample(), sampler.sample()
    with pytest.raises(RuntimeError, match="record_task"):
        sampler.sample()  # the first hard task is due


def test_task_classes_recovers_the_data_set_labels():
    md = make_dataset()
    tasks = build_taskset(md, ways=5, shots=SHOTS, queries=QUERIES, seed=0)
    description = tasks.sample_task_description()
    x, y = tasks.get_task(description)
    classes = task_classes(md, description, y)
    assert [classes[j] for j in y.tolist()] == [md.indices_to_labels[i] for i in x.squeeze(1).long().tolist()]


@pytest.mark.parametrize(
    "build, name",
    [
        (lambda md, t: HardTaskTransform(md, n=11, tracker=t), "n=11"),
        (lambda md, t: HardTaskTransform(md, n=5, tracker=t, mode="replay"), "replay"),
        (lambda md, t: HardTaskMetaBatch(build_taskset(md, 5, 1, 3), hard_taskset(md, t), k=2, k_hard=-1), "k_hard=-1"),
        (lambda md, t: HardTaskMetaBatch(build_taskset(md, 5, 1, 3), hard_taskset(md, t), k=0), "k=0"),
        (lambda md, t: HardTaskMetaBatch(build_taskset(md, 5, 1, 3), build_taskset(md, 5, 1, 3), k=2), "HardTask"),
        (lambda md, t: t.record([1, 99], torch.tensor([0, 1]), torch.tensor([0, 1])), "99"),
        (lambda md, t: t.record([1, 2], torch.tensor([0, 1]), torch.tensor([0, 2])), r"\[2\]"),
        (lambda md, t: t.record([1, 2], torch.tensor([0, 1]), torch.tensor([0, 1]), indices=[0]), "index 0"),
        (lambda md, t: ClassAccuracyTracker(md, history_decay=1.5), "1.5"),
        (lambda md, t: t.record([1, 2], torch.zeros(2, 3), torch.tensor([0, 1])), "3 columns"),
    ],
)
def test_bad_input_raises_value_error_naming_it(build, name):
    md = make_dataset()
    with pytest.raises(ValueError, match=name):
        build(md, ClassAccuracyTracker(md))


def test_state_dict_resumes_the_same_draws(tmp_path):
    md = make_dataset()
    tracker = ClassAccuracyTracker(md, seed=0, history_decay=0.5)
    for weak in (1, 2):
        tracker.start_meta_batch()
        tracker.record([weak, 5, 6], torch.tensor([1, 1, 2]), torch.tensor([0, 1, 2]), indices=[weak, 5, 6])
    torch.save(tracker.state_dict(), tmp_path / "tracker.pt")
    resumed = ClassAccuracyTracker(md, seed=123, history_decay=0.5)
    resumed.load_state_dict(torch.load(tmp_path / "tracker.pt", weights_only=True))
    assert resumed.failures == tracker.failures and resumed.history == tracker.history
    assert resumed.history_margins == tracker.history_margins
    draws = [HardTaskTransform(md, n=5, tracker=t, seed=1)(None) for t in (tracker, resumed)]
    assert [dd.index for dd in draws[0]] == [dd.index for dd in draws[1]]
