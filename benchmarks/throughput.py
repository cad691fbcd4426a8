"""Meta-train throughput: tasks/s, seconds per meta-step and peak memory of ``MetaTransferLearner``.

Rows are configurations: backbone, image size, shots, first/second order, head init, meta-batch,
BN mode, SS granularity and the :class:`~mtl_plugin.speedups.Speedups` switches (plus
``SSAdapter(output_scaling=True)``, channel granularity only). Per base point the script times
``defaults`` (``Speedups()``), each lever of ``--levers`` toggled alone (``images_per_pass`` to
each value of ``--images-per-pass``, ``autocast`` to ``--autocast``), ``all exact`` (every selected
lever that keeps results within float tolerance on, autocast off) and ``none``
(``Speedups.none()``); a lever that cannot act on a row (support without graph outside first
order + Kaiming head + frozen BN, batched tasks with one task, images per pass with BN
training, output scaling at kernel granularity) is shown off and not toggled. Synthetic
5-way images, 15 queries per class, from a seeded generator; the same seed gives every model the
same weights.

Two more functions run in the same turns, for the ratio columns:

* ``reference: the official code's loop`` (:func:`reference_step`), written as the MTL
  authors' PyTorch code works: per task, support and query encoded in two forward passes of a
  kernel SS adapter (weights scaled, eager, contiguous), the Kaiming head θ = (W, b), the inner
  steps on the support features with ``torch.autograd.grad`` (``create_graph`` only for second
  order), query loss with the fast weights, backward per task, one Adam step on Φ and θ.
  ``vs reference`` = a row's tasks/s over this loop's, same backbone, px, shots, order,
  meta-batch and BN mode.
* a plain forward+backward of the bare backbone (all weights trainable, linear head, cross
  entropy) on all the meta-batch's images in one batch: ``vs plain`` = seconds per meta-step over
  this.

Every function of one (backbone, px, shots) group is warmed up (``torch.compile`` compiles
there; ``warm-up s`` is that first call) and then timed in turns, ``--repeats`` times, so that
drift hits all alike; figures are medians. Peak memory (MB): on CUDA the allocator's peak during
one step over what was allocated before it; on CPU, in a child process (this script with a
hidden ``--memory-of``), the peak resident memory (Linux ``VmHWM``) of two meta-steps from a
fresh model over the memory before them (``--no-memory`` skips these).

Goal (issue 13): with the exact levers, >= 2x the reference loop's tasks/s on resnet12 at 5-way
1-shot and 5-shot, first order, and meta-step / plain forward+backward <= 1.3.

    .venv/bin/python benchmarks/throughput.py --threads 2 --csv /tmp/throughput.csv
    .venv/bin/python benchmarks/throughput.py --backbone conv4 resnet12 resnet18-small --order first second \\
        --meta-batch 1 2 4 --bn frozen train --granularity kernel channel --image-size 84 --device cuda
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from mtl_plugin.backbones import build_backbone
from mtl_plugin.meta_config import MetaTrainConfig
from mtl_plugin.meta_transfer import MetaTransferLearner
from mtl_plugin.speedups import Speedups
from mtl_plugin.ss import SSAdapter
from mtl_plugin.training.meta_step import MetaTrainer

WAYS, QUERIES, SEED = 5, 15, 0
LEVERS = (
    "support_without_graph",
    "batch_tasks",
    "images_per_pass",
    "output_scaling",
    "channels_last",
    "compile",
    "autocast",
)
# Levers set to a value rather than on (None is off): their values come from the flags of the same name.
VALUED = ("images_per_pass", "autocast")
# Levers that change results only within float tolerance: "all exact" turns these on.
EXACT = tuple(lever for lever in LEVERS if lever != "autocast")
# Printed column names (the CSV keeps the full ones).
SHORT = {
    "support_without_graph": "no_graph",
    "batch_tasks": "batch",
    "images_per_pass": "per_pass",
    "output_scaling": "out_scale",
    "channels_last": "ch_last",
    "head_init": "head",
    "meta_batch": "tasks",
    "granularity": "ss",
}
REFERENCE, PLAIN = "reference: the official code's loop", "plain fwd+bwd"


@dataclass(frozen=True)
class Case:
    """One function to time: a learner configuration, the reference loop or the plain fwd+bwd."""

    kind: str  # "learner", "reference" or "plain"
    label: str
    backbone: str
    image_px: int
    shots: int
    order: str
    head_init: str
    meta_batch: int
    bn: str
    granularity: str
    output_scaling: bool
    speedups: Speedups

    def group(self) -> tuple:
        return self.backbone, self.image_px, self.shots

    def reference_key(self) -> tuple:
        return self.group() + (self.order, self.meta_batch, self.bn)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Case:
        fields = json.loads(text)
        return cls(**{**fields, "speedups": Speedups(**fields["speedups"])})


def applies(lever: str, case: Case) -> bool:
    """Whether ``lever`` can change anything in ``case``: the learner ignores it otherwise (see ``Speedups``)."""
    if lever == "support_without_graph":
        return case.order == "first" and case.head_init == "kaiming" and case.bn == "frozen"
    if lever == "batch_tasks":
        return case.meta_batch > 1
    if lever == "images_per_pass":
        return case.bn == "frozen"
    if lever == "output_scaling":
        return case.granularity == "channel"
    return True


def _with(case: Case, lever: str, value) -> Case:
    """``case`` with ``lever`` set: a bool, or for a lever of ``VALUED`` its value (None: off)."""
    if lever == "output_scaling":
        return replace(case, output_scaling=value)
    return replace(case, speedups=replace(case.speedups, **{lever: value}))


def _value(case: Case, lever: str):
    return case.output_scaling if lever == "output_scaling" else getattr(case.speedups, lever)


def _settings(lever: str, values: dict[str, list]) -> list:
    """What a lever can be set to: off first, then its flag's values (or on)."""
    return [None, *values[lever]] if lever in VALUED else [False, True]


def learner_cases(base: Case, levers: list[str], values: dict[str, list]) -> list[Case]:
    """``defaults``, each applicable lever set alone to each other setting, ``all exact`` and ``none``.

    ``values`` gives each lever of ``VALUED`` its settings (``images_per_pass``: [16, 32]);
    ``all exact`` takes the first. Rows that are the same configuration are timed once, under
    both names.
    """
    inactive = [lever for lever in LEVERS if not applies(lever, base)]
    defaults = base
    for lever in inactive:
        defaults = _with(defaults, lever, _settings(lever, values)[0])
    rows = [replace(defaults, label="defaults")]
    toggled = [lever for lever in levers if lever not in inactive]
    for lever in toggled:
        for setting in _settings(lever, values):
            if setting == _value(defaults, lever):
                continue
            name = f"+ {lever}" if setting is True else f"- {lever}" if not setting else f"+ {lever}={setting}"
            rows.append(replace(_with(defaults, lever, setting), label=f"defaults {name}"))
    exact = defaults
    for lever in toggled:
        exact = _with(exact, lever, _settings(lever, values)[1] if lever in EXACT else _settings(lever, values)[0])
    rows.append(replace(exact, label="all exact"))
    rows.append(replace(base, label="none", output_scaling=False, speedups=Speedups.none()))
    unique: dict[Case, Case] = {}
    for row in rows:
        same = replace(row, label="")
        # A row that another one already is keeps one timing under both names ("defaults = all exact").
        unique[same] = replace(unique[same], label=f"{unique[same].label} = {row.label}") if same in unique else row
    return list(unique.values())


def all_cases(args: argparse.Namespace) -> list[Case]:
    """Every row of the matrix the flags select, grouped by (backbone, px, shots)."""
    cases = []
    for backbone, px, shots in itertools.product(args.backbone, args.image_size, args.shots):
        for order, meta_batch, bn in itertools.product(args.order, args.meta_batch, args.bn):
            shared = dict(backbone=backbone, image_px=px, shots=shots, order=order, meta_batch=meta_batch, bn=bn)
            cases.append(
                Case(
                    "reference",
                    REFERENCE,
                    head_init="kaiming",
                    granularity="kernel",
                    output_scaling=False,
                    speedups=Speedups.none(),
                    **shared,
                )
            )
            for head_init, granularity in itertools.product(args.head_init, args.granularity):
                base = Case(
                    "learner",
                    "",
                    head_init=head_init,
                    granularity=granularity,
                    output_scaling=False,
                    speedups=Speedups(),
                    **shared,
                )
                cases += learner_cases(
                    base, args.levers, {"images_per_pass": args.images_per_pass, "autocast": [args.autocast]}
                )
        for meta_batch in args.meta_batch:
            cases.append(
                Case(
                    "plain",
                    PLAIN,
                    backbone,
                    px,
                    shots,
                    order="-",
                    head_init="-",
                    meta_batch=meta_batch,
                    bn="train",
                    granularity="-",
                    output_scaling=False,
                    speedups=Speedups.none(),
                )
            )
    return cases


def synthetic_tasks(case: Case, device: torch.device) -> list[tuple[torch.Tensor, ...]]:
    """``meta_batch`` seeded tasks ``(support_x, support_y, query_x, query_y)`` of random images."""
    generator = torch.Generator().manual_seed(SEED)
    tasks = []
    for _ in range(case.meta_batch):
        images = torch.randn(WAYS * (case.shots + QUERIES), 3, case.image_px, case.image_px, generator=generator)
        support_y = torch.arange(WAYS).repeat_interleave(case.shots)
        query_y = torch.arange(WAYS).repeat_interleave(QUERIES)
        support_x, query_x = images[: len(support_y)], images[len(support_y) :]
        tasks.append(tuple(t.to(device) for t in (support_x, support_y, query_x, query_y)))
    return tasks


def _backbone(case: Case) -> nn.Module:
    torch.manual_seed(SEED)  # the same weights for every function of a group
    return build_backbone(case.backbone, image_size=case.image_px)


def _config(case: Case, inner_steps: int) -> MetaTrainConfig:
    return MetaTrainConfig(
        ways=WAYS,
        shots=case.shots,
        queries=QUERIES,
        inner_steps=inner_steps,
        first_order=case.order == "first",
        head_init=case.head_init,
        meta_batch=case.meta_batch,
    )


def learner_step(case: Case, device: torch.device, inner_steps: int) -> Callable[[], None]:
    """One ``MetaTrainer.step`` (the library's checked Adam step) on the case's meta-batch."""
    encoder = SSAdapter(_backbone(case), granularity=case.granularity, bn=case.bn, output_scaling=case.output_scaling)
    learner = MetaTransferLearner(encoder, WAYS, _config(case, inner_steps), speedups=case.speedups).to(device)
    trainer = MetaTrainer(learner)
    tasks = synthetic_tasks(case, device)
    return lambda: trainer.step(tasks)


def reference_step(case: Case, device: torch.device, inner_steps: int) -> Callable[[], None]:
    """Reference: the official code's loop, one task at a time (see the module docstring)."""
    config = _config(case, inner_steps)
    # The official code's memory format, NCHW: the package's backbones are built channels-last and
    # would otherwise give the reference that speed-up too.
    backbone = _backbone(case).to(memory_format=torch.contiguous_format)
    encoder = SSAdapter(backbone, granularity="kernel", bn=case.bn).to(device).train()
    weight = torch.empty(WAYS, encoder.backbone.feature_dim)
    nn.init.kaiming_normal_(weight, generator=torch.Generator().manual_seed(config.seed))  # as the learner's θ
    weight = nn.Parameter(weight.to(device))
    bias = nn.Parameter(torch.zeros(WAYS, device=device))
    optimizer = torch.optim.Adam(
        [
            {"params": list(encoder.ss_parameters()), "lr": config.encoder_lr},
            {"params": [weight, bias], "lr": config.head_lr},
        ]
    )
    tasks = synthetic_tasks(case, device)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        for support_x, support_y, query_x, query_y in tasks:
            support, query = encoder(support_x), encoder(query_x)  # two passes, both with a graph
            fast = (weight, bias)
            for _ in range(config.inner_steps):
                loss = F.cross_entropy(F.linear(support, *fast), support_y)
                grads = torch.autograd.grad(loss, fast, create_graph=not config.first_order)
                fast = tuple(p - config.inner_lr * g for p, g in zip(fast, grads))
            (F.cross_entropy(F.linear(query, *fast), query_y) / len(tasks)).backward()
        optimizer.step()

    return step


def plain_step(case: Case, device: torch.device) -> Callable[[], None]:
    """One forward+backward of the bare backbone (every weight trainable) on the meta-batch's images."""
    backbone = _backbone(case).to(device).train()
    head = nn.Linear(backbone.feature_dim, WAYS).to(device)
    tasks = synthetic_tasks(case, device)
    images = torch.cat([x for task in tasks for x in (task[0], task[2])])
    labels = torch.cat([y for task in tasks for y in (task[1], task[3])])

    def step() -> None:
        backbone.zero_grad(set_to_none=True)
        head.zero_grad(set_to_none=True)
        F.cross_entropy(head(backbone(images)), labels).backward()

    return step


def make_step(case: Case, device: torch.device, inner_steps: int) -> Callable[[], None]:
    if case.kind == "reference":
        return reference_step(case, device, inner_steps)
    if case.kind == "plain":
        return plain_step(case, device)
    return learner_step(case, device, inner_steps)


def _seconds(step: Callable[[], None], device: torch.device) -> float:
    start = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def cuda_peak_mb(step: Callable[[], None], device: torch.device) -> float:
    """Allocator peak of one step over what was allocated before it, in MB."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    _seconds(step, device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def child_peak_mb(case: Case, args: argparse.Namespace) -> float:
    """Peak resident memory two steps add, measured in a fresh process running this script."""
    command = [
        sys.executable,
        __file__,
        "--memory-of",
        case.to_json(),
        "--inner-steps",
        str(args.inner_steps),
        "--device",
        args.device,
    ]
    if args.threads:
        command += ["--threads", str(args.threads)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"the memory child of {case.label!r} failed:\n{done.stderr[-2000:]}")
    return float(done.stdout.strip().splitlines()[-1])


def _status_kb(field: str) -> int:
    """A ``VmRSS``/``VmHWM`` line of ``/proc/self/status`` (Linux), in KB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}: peak memory on CPU needs Linux; use --no-memory")


def memory_of(case: Case, device: torch.device, inner_steps: int) -> float:
    """The child's side of :func:`child_peak_mb`: build, then two steps; their peak RSS over the RSS before, MB.

    Not ``ru_maxrss``: a child inherits its parent's through fork and exec, so the growth of a
    child of a large parent reads 0. The peak (``VmHWM``) is reset to the current RSS first.
    """
    step = make_step(case, device, inner_steps)
    Path("/proc/self/clear_refs").write_text("5")  # 5: reset the peak resident set size
    before = _status_kb("VmRSS")
    step()
    step()
    return (_status_kb("VmHWM") - before) / 1024


def time_group(cases: list[Case], args: argparse.Namespace, device: torch.device) -> list[dict]:
    """Warm up, then time every case of one group in turns; one result dict per case."""
    steps = [make_step(case, device, args.inner_steps) for case in cases]
    warmup = []
    for case, step in zip(cases, steps):
        warmup.append(_seconds(step, device))
        if case.speedups.compile:
            _seconds(step, device)  # a recompilation (grad mode, strides) lands here, not in the timing
    times: list[list[float]] = [[] for _ in cases]
    for _ in range(args.repeats):
        for step, record in zip(steps, times):
            record.append(_seconds(step, device))
    peaks: list[float | None] = [None] * len(cases)
    if args.memory:
        for index, (case, step) in enumerate(zip(cases, steps)):
            if case.kind != "plain":
                peaks[index] = cuda_peak_mb(step, device) if device.type == "cuda" else child_peak_mb(case, args)
    return [
        dict(case=case, seconds=statistics.median(record), warmup=first, peak=peak)
        for case, record, first, peak in zip(cases, times, warmup, peaks)
    ]


def table(results: list[dict]) -> pd.DataFrame:
    """One row per timed configuration (the plain fwd+bwd only feeds ``vs plain``)."""
    reference = {
        r["case"].reference_key(): r["seconds"] / r["case"].meta_batch for r in results if r["case"].kind == "reference"
    }
    plain = {r["case"].group() + (r["case"].meta_batch,): r["seconds"] for r in results if r["case"].kind == "plain"}
    rows = []
    for result in results:
        case = result["case"]
        if case.kind == "plain":
            continue
        switches = {lever: _value(case, lever) for lever in LEVERS if lever not in VALUED}
        rows.append(
            {
                "backbone": case.backbone,
                "px": case.image_px,
                "shots": case.shots,
                "order": case.order,
                "head_init": case.head_init,
                "meta_batch": case.meta_batch,
                "bn": case.bn,
                "granularity": case.granularity,
                "config": case.label,
                **switches,
                "images_per_pass": case.speedups.images_per_pass or "all",
                "autocast": case.speedups.autocast or "off",
                "tasks/s": case.meta_batch / result["seconds"],
                "s/step": result["seconds"],
                "warm-up s": result["warmup"],
                "vs reference": reference[case.reference_key()] * case.meta_batch / result["seconds"],
                "vs plain": result["seconds"] / plain[case.group() + (case.meta_batch,)],
                "peak MB": None if result["peak"] is None else round(result["peak"]),
            }
        )
    return pd.DataFrame(rows)


def goal_lines(frame: pd.DataFrame) -> list[str]:
    """The issue's goal, one line per resnet12 first-order ``defaults`` or ``all exact`` row."""
    names = frame["config"].str.split(" = ")
    chosen = names.apply(lambda row: "defaults" in row or "all exact" in row)
    rows = frame[(frame["backbone"] == "resnet12") & (frame["order"] == "first") & chosen]
    if rows.empty:
        return ["goal: no resnet12 first-order rows in this run (add --backbone resnet12 --order first)"]
    lines = ["goal (resnet12, first order): >= 2x the reference's tasks/s, meta-step <= 1.3x plain fwd+bwd"]
    for _, row in rows.iterrows():
        reference, plain = row["vs reference"], row["vs plain"]
        lines.append(
            f"  {row['shots']}-shot, {row['px']} px, meta-batch {row['meta_batch']}, bn {row['bn']}, "
            f"{row['head_init']}, {row['granularity']}, {row['config']}: {reference:.2f}x reference "
            f"({'met' if reference >= 2 else 'not met'}), {plain:.2f}x plain "
            f"({'met' if plain <= 1.3 else 'not met'})"
        )
    return lines


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--backbone",
        nargs="+",
        default=["conv4", "resnet12"],
        help="conv4, resnet12, resnet18-small or any registered backbone (default: conv4 resnet12)",
    )
    parser.add_argument("--image-size", nargs="+", type=int, default=[32], help="image side in px (default: 32)")
    parser.add_argument("--shots", nargs="+", type=int, default=[1, 5])
    parser.add_argument("--order", nargs="+", choices=("first", "second"), default=["first"])
    parser.add_argument("--meta-batch", nargs="+", type=int, default=[2])
    parser.add_argument("--bn", nargs="+", choices=("frozen", "train"), default=["frozen"])
    parser.add_argument(
        "--head-init",
        nargs="+",
        choices=("kaiming", "prototype"),
        default=["kaiming"],
        help="kaiming is the official code's head, the one the reference loop uses",
    )
    parser.add_argument(
        "--granularity",
        nargs="+",
        choices=("kernel", "channel"),
        default=["kernel"],
        help="SS granularity; output_scaling is toggled only at channel",
    )
    parser.add_argument(
        "--levers",
        nargs="*",
        choices=LEVERS,
        default=list(LEVERS),
        help="switches toggled one at a time from the defaults (default: all)",
    )
    parser.add_argument(
        "--images-per-pass",
        nargs="+",
        type=int,
        default=[40],
        help="settings of the images_per_pass lever; all exact takes the first (default: 40)",
    )
    parser.add_argument("--autocast", choices=("bf16", "fp16"), default="bf16", help="dtype of the autocast lever")
    parser.add_argument("--inner-steps", type=int, default=100, help="inner steps of every row (default: 100)")
    parser.add_argument("--repeats", type=int, default=3, help="timed turns; figures are medians (default: 3)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak memory column")
    parser.add_argument("--csv", default=None, help="also write the table to this CSV file")
    parser.add_argument("--memory-of", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> pd.DataFrame:
    """Run the matrix the flags select, print the table and the goal, write ``--csv``; returns the table."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.memory_of is not None:
        print(memory_of(Case.from_json(args.memory_of), device, args.inner_steps))
        return pd.DataFrame()
    print(
        f"torch {torch.__version__}, {device}, {torch.get_num_threads()} threads, median of {args.repeats}, "
        f"{args.inner_steps} inner steps, 5-way, {QUERIES} queries"
    )
    cases = all_cases(args)
    results = []
    for _, group in itertools.groupby(cases, key=Case.group):
        results += time_group(list(group), args, device)
    frame = table(results)
    with pd.option_context("display.width", 250, "display.max_columns", None, "display.float_format", "{:.3g}".format):
        print(frame.rename(columns=SHORT).to_string(index=False))
    for line in goal_lines(frame):
        print(line)
    if args.csv:
        Path(args.csv).parent.mkdir(parents=True, exist_ok=True)
        frame.to_csv(args.csv, index=False)
    return frame


if __name__ == "__main__":
    main()
