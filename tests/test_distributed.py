"""Pretraining, meta-training and evaluation on torch.distributed: 2 gloo processes on CPU.

One job of 2 processes (``torch.multiprocessing.spawn``) checks the library against one process;
the command-line test runs the real ``torchrun -m mtl_plugin`` and kills a rank mid-run.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from click.testing import CliRunner
from PIL import Image
from test_pipeline import fixed_tasks, tiny_backbone, tiny_benchmark, tiny_config

from mtl_plugin.cli import pipeline as pipeline_cli
from mtl_plugin.errors import NonFiniteLossError, UsageError
from mtl_plugin.evaluation import EvaluationConfig, evaluate
from mtl_plugin.meta_transfer import MetaTransferLearner
from mtl_plugin.speedups import Speedups
from mtl_plugin.ss import SSAdapter
from mtl_plugin.tasks import split_support_query
from mtl_plugin.training.meta_step import MetaTrainer
from mtl_plugin.training.meta_training import _TaskStream
from mtl_plugin.training.pretrain import PretrainConfig, pretrain
from mtl_plugin.utils import distributed

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 3
EVALUATION = EvaluationConfig(ways=3, shots=1, queries=3, tasks=7, seed=3)


def _learner(meta_batch: int, speedups: Speedups | None = None) -> MetaTransferLearner:
    return MetaTransferLearner(
        SSAdapter(tiny_backbone()), ways=3, config=tiny_config(meta_batch=meta_batch), speedups=speedups
    )


def _hard_tasks(rank: int) -> dict:
    """One hard-task meta-batch of this rank's share; rank 1's normal task fails its label-0 class."""
    stream = _TaskStream(tiny_benchmark().train, tiny_config(meta_batch=2, hard_tasks=True, hard_meta_batch=2))
    tasks, record = stream.next_batch()
    normal, hard = [], []
    for task in tasks:
        if task.hard:
            hard.append(list(task.classes))
            continue
        _, (_, query_y) = split_support_query(task.data, task.labels, shots=1)
        logits = torch.nn.functional.one_hot(query_y.long(), 3).float()
        if rank == 1:
            logits[query_y == 0] = torch.tensor([0.0, 1.0, 0.0])
        record(task, logits, query_y)
        normal.append(list(task.classes))
    return {"normal": normal, "hard": hard, "failures": stream.tracker.failure_classes}


def _diverge_on_rank_1(rank: int, config: PretrainConfig, out: Path) -> str:
    """Pretrain with a loss that turns infinite on rank 1 alone at its second step; return the error."""
    real, calls = torch.nn.functional.cross_entropy, []

    def loss(*args, **kwargs):
        calls.append(1)
        value = real(*args, **kwargs)
        return value * float("inf") if rank == 1 and len(calls) == 2 else value

    torch.nn.functional.cross_entropy = loss
    try:
        pretrain(tiny_benchmark(), config, out, progress=False)
    except NonFiniteLossError as error:
        return str(error)
    finally:
        torch.nn.functional.cross_entropy = real
    return ""


def _job(rank: int, world: int, store: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        results: dict = {"folder": out}
        learner = _learner(meta_batch=1)
        tasks = fixed_tasks(tiny_benchmark().train, learner.config, count=2 * STEPS)
        trainer = MetaTrainer(learner)
        steps = [trainer.step([tasks[2 * step + rank]]) for step in range(STEPS)]
        results["state"] = {name: tensor.clone() for name, tensor in learner.state_dict().items()}
        results["losses"] = [step.loss for step in steps]
        results["tasks"] = [step.tasks for step in steps]
        results["hard"] = _hard_tasks(rank)
        results["evaluation"] = evaluate(learner.predict, tiny_benchmark().test, EVALUATION, progress=False).accuracies
        config = PretrainConfig(
            backbone="conv4", epochs=2, batch_size=8, steps_per_epoch=3, val_tasks=3, val_ways=3, val_queries=3
        )
        backbone = pretrain(tiny_benchmark(), config, Path(out) / "pre", progress=False)
        results["pretrained"] = {name: tensor.clone() for name, tensor in backbone.state_dict().items()}
        results["diverged"] = _diverge_on_rank_1(rank, config, Path(out) / "diverging")
        try:
            _TaskStream(tiny_benchmark().train, tiny_config(meta_batch=3))
        except UsageError as error:
            results["odd_meta_batch"] = str(error)
        torch.save(results, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> list[dict]:
    """The results of :func:`_job` on each of 2 gloo ranks."""
    folder = tmp_path_factory.mktemp("two-ranks")
    torch.multiprocessing.spawn(_job, args=(2, str(folder / "store"), str(folder)), nprocs=2, join=True)
    return [torch.load(folder / f"rank{rank}.pt", weights_only=True) for rank in range(2)]


def test_two_ranks_of_one_task_follow_one_process_of_two(two_ranks):
    # Task by task, as the ranks do: a batched pass rounds differently, and Adam turns rounding
    # in a near-zero gradient into a whole step (tests/test_speedups.py compares gradients instead).
    learner = _learner(meta_batch=2, speedups=Speedups(batch_tasks=False))
    tasks = fixed_tasks(tiny_benchmark().train, learner.config, count=2 * STEPS)
    trainer = MetaTrainer(learner)
    steps = [trainer.step(tasks[2 * step : 2 * step + 2]) for step in range(STEPS)]
    for name, tensor in learner.state_dict().items():
        assert torch.equal(two_ranks[0]["state"][name], two_ranks[1]["state"][name]), name
        torch.testing.assert_close(two_ranks[0]["state"][name], tensor, rtol=1e-5, atol=1e-6)
    # Every rank reports the whole meta-batch.
    assert two_ranks[0]["tasks"] == two_ranks[1]["tasks"] == [2] * STEPS
    assert two_ranks[0]["losses"] == pytest.approx([step.loss for step in steps], rel=1e-5)


def test_a_failure_seen_only_on_rank_1_is_in_rank_0_hard_tasks(two_ranks):
    first, second = (ranks["hard"] for ranks in two_ranks)
    assert first["normal"] != second["normal"], "two ranks drew the same task"
    assert first["failures"] == second["failures"] and len(first["failures"]) == 2
    # Rank 1 failed the class of its label 0; rank 0 never saw it, yet draws its hard task from it.
    assert first["failures"][1] == second["normal"][0][0]
    assert first["failures"][1] not in first["normal"][0]
    # 3-way hard tasks fill up from the meta-batch's 2 failures first, on every rank.
    assert set(first["failures"]) <= set(first["hard"][0])
    assert set(first["failures"]) <= set(second["hard"][0])
    assert first["hard"] != second["hard"]


def test_distributed_evaluation_equals_one_process(two_ranks):
    learner = _learner(meta_batch=1)
    learner.load_state_dict(two_ranks[0]["state"])
    single = evaluate(learner.predict, tiny_benchmark().test, EVALUATION, progress=False)
    assert distributed.world_size() == 1 and len(single.accuracies) == EVALUATION.tasks
    # 7 tasks on 2 ranks (4 and 3), gathered in task order: the very same numbers, hence mean and CI.
    assert two_ranks[0]["evaluation"] == two_ranks[1]["evaluation"] == single.accuracies


def test_pretraining_on_two_ranks_keeps_them_equal_and_saves_both_generators(two_ranks):
    for name, tensor in two_ranks[0]["pretrained"].items():
        assert torch.equal(tensor, two_ranks[1]["pretrained"][name]), name
    state = torch.load(Path(two_ranks[0]["folder"]) / "pre" / "last.pt", weights_only=True)
    assert state["epoch"] == 2 and state["world_size"] == 2 and len(state["torch_rngs"]) == 2
    assert not torch.equal(*state["torch_rngs"]), "two ranks drew the same augmentations"
    assert [row["epoch"] for row in state["metrics"]] == [1, 2]


def test_pretraining_that_diverges_on_one_rank_stops_every_rank(two_ranks):
    # Rank 0's own loss was finite, yet it stops with rank 1's error instead of waiting in the all-reduce.
    assert two_ranks[0]["diverged"] == two_ranks[1]["diverged"]
    assert "pretraining diverged at epoch 1, step 2: the loss is inf" in two_ranks[0]["diverged"]


def test_a_meta_batch_must_divide_among_the_ranks(two_ranks):
    assert "--meta-batch 3" in two_ranks[0]["odd_meta_batch"]
    assert "multiple of 2" in two_ranks[0]["odd_meta_batch"]


# The command line, as a user runs it: torchrun -m mtl_plugin ...


def _folder_data(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for split, classes in (("train", 8), ("val", 5), ("test", 5)):
        for label in range(classes):
            pattern = np.kron(rng.uniform(0, 255, (4, 4, 3)), np.ones((4, 4, 1)))
            (root / split / f"c{label}").mkdir(parents=True)
            for index in range(6):
                image = np.clip(pattern + rng.normal(0, 120, pattern.shape), 0, 255).astype(np.uint8)
                Image.fromarray(image).save(root / split / f"c{label}" / f"{index}.png")
    return root


def _torchrun(*args: str) -> list[str]:
    # --standalone picks a free port, so that parallel jobs on one machine do not collide.
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "mtl_plugin",
        *args,
        "--device",
        "cpu",
    ]


def _environment() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).parents[1]))


def _children(parent: int) -> list[int]:
    children = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == parent:
                children.append(int(entry.name))
        except (OSError, ValueError, IndexError):
            continue
    return children


def _rank_process(launcher: int, rank: int) -> int:
    for child in _children(launcher):
        try:
            if f"\0RANK={rank}\0".encode() in b"\0" + (Path("/proc") / str(child) / "environ").read_bytes():
                return child
        except OSError:
            continue
    raise AssertionError(f"no process of rank {rank} under torchrun {launcher}")


def _run(command: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, env=_environment(), timeout=300)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the rank to kill in /proc")
def test_torchrun_meta_train_killed_rank_stops_the_job_and_resume_continues(tmp_path):
    data = ["--data", "folder", "--root", str(_folder_data(tmp_path / "data")), "--image-size", "16"]
    meta = _torchrun(
        "meta-train",
        *data,
        "--backbone",
        "conv4",
        "--ways",
        "3",
        "--queries",
        "2",
        "--iterations",
        "12",
        "--inner-steps",
        "2",
        "--val-every",
        "6",
        "--val-tasks",
        "3",
        "--checkpoint-every",
        "1",
        "--hard-tasks",
        "--out",
        str(tmp_path / "meta"),
        "--quiet",
    )
    job = subprocess.Popen(meta, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_environment())
    deadline = time.monotonic() + 240
    while not (tmp_path / "meta" / "last.pt").is_file() and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert job.poll() is None, "the job ended before it could be killed"
    os.kill(_rank_process(job.pid, 1), 9)
    _, stderr = job.communicate(timeout=120)
    assert job.returncode != 0
    # Rank 0 is stopped by torchrun or finds rank 1 gone, whichever comes first: one Error line either way.
    assert "Error: rank 0" in stderr and "another process of the job" in stderr
    assert "--resume to continue" in stderr and "rank      : 1" in stderr

    resumed = _run(meta + ["--resume"])
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout.count("best val accuracy") == 1  # rank 0 alone reports
    state = torch.load(tmp_path / "meta" / "last.pt", weights_only=True)
    assert state["iteration"] == 12 and state["world_size"] == 2 and len(state["streams"]) == 2
    assert [row["iteration"] for row in state["metrics"]] == list(
        range(0, 13)
    )  # iteration 0: validated before any update

    # One process cannot continue a job of two: each rank's task generators are in last.pt.
    alone = CliRunner().invoke(pipeline_cli.meta_train_command, meta[meta.index("meta-train") + 1 :] + ["--resume"])
    assert alone.exit_code == 2 and "job of 2 process(es)" in alone.output
