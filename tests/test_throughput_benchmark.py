"""Smoke test of benchmarks/throughput.py on its tiniest matrix: it runs and writes the columns it promises."""

from __future__ import annotations

import argparse

import pandas as pd
import pytest
from benchmark_scripts import loaded_script

pytestmark = pytest.mark.usefixtures("one_thread")

COLUMNS = [
    "backbone",
    "px",
    "shots",
    "order",
    "head_init",
    "meta_batch",
    "bn",
    "granularity",
    "config",
    "support_without_graph",
    "batch_tasks",
    "output_scaling",
    "channels_last",
    "compile",
    "images_per_pass",
    "autocast",
    "tasks/s",
    "s/step",
    "warm-up s",
    "vs reference",
    "vs plain",
    "peak MB",
]


@pytest.fixture(scope="module")
def throughput():
    yield from loaded_script("throughput.py")


def test_tiniest_matrix_writes_every_column(throughput, tmp_path, capsys):
    csv = tmp_path / "out" / "throughput.csv"
    frame = throughput.main(
        [
            "--backbone",
            "conv4",
            "--image-size",
            "16",
            "--shots",
            "1",
            "--meta-batch",
            "2",
            "--inner-steps",
            "2",
            "--repeats",
            "1",
            "--threads",
            "1",
            "--no-memory",
            "--levers",
            "batch_tasks",
            "--csv",
            str(csv),
        ]
    )
    written = pd.read_csv(csv)
    assert list(written.columns) == COLUMNS
    assert len(written) == len(frame)
    configs = list(written["config"])
    assert configs[0] == throughput.REFERENCE and written.loc[0, "vs reference"] == 1.0
    assert configs[1].startswith("defaults") and configs[-1].endswith("none")
    # The one lever asked for is toggled alone, from the defaults.
    toggled = written[written["config"].str.contains("batch_tasks")]
    assert len(toggled) == 1 and toggled.iloc[0]["batch_tasks"] != written.loc[1, "batch_tasks"]
    assert (written["tasks/s"] > 0).all() and (written["vs plain"] > 0).all()
    none = written.iloc[-1]
    assert not none[["support_without_graph", "batch_tasks", "channels_last", "compile"]].any()
    assert none["images_per_pass"] == "all" and none["autocast"] == "off"
    assert "goal: no resnet12 first-order rows" in capsys.readouterr().out


def test_levers_that_cannot_act_are_shown_off_and_not_toggled(throughput):
    base = throughput.Case(
        "learner",
        "",
        "conv4",
        16,
        1,
        order="second",
        head_init="kaiming",
        meta_batch=1,
        bn="frozen",
        granularity="kernel",
        output_scaling=False,
        speedups=throughput.Speedups(),
    )
    rows = throughput.learner_cases(base, list(throughput.LEVERS), {"images_per_pass": [16], "autocast": ["bf16"]})
    defaults = rows[0]
    assert not defaults.speedups.support_without_graph and not defaults.speedups.batch_tasks
    labels = [row.label for row in rows]
    assert not any(
        lever in label for label in labels for lever in ("support_without_graph", "batch_tasks", "output_scaling")
    )
    assert "defaults + autocast=bf16" in labels and "defaults + images_per_pass=16" in labels
    assert [row.speedups for row in rows].count(throughput.Speedups.none()) == 1
    assert len(set(labels)) == len(labels)


def test_memory_child_measures_its_own_steps(throughput):
    case = throughput.Case(
        "reference",
        throughput.REFERENCE,
        "conv4",
        16,
        1,
        order="first",
        head_init="kaiming",
        meta_batch=1,
        bn="frozen",
        granularity="kernel",
        output_scaling=False,
        speedups=throughput.Speedups.none(),
    )
    assert throughput.Case.from_json(case.to_json()) == case
    # A child of this (larger) process: ru_maxrss, inherited through fork and exec, would read 0.
    args = argparse.Namespace(inner_steps=2, device="cpu", threads=1)
    assert throughput.child_peak_mb(case, args) > 0
