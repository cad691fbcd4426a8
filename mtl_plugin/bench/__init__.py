"""The bench: the paper's comparison and ablation tables, apart from the method itself.

* :mod:`~mtl_plugin.bench.runner`: ``mtl bench``'s loop: every row on the same seeded test
  tasks, cells cached by a digest of their settings, tables and plots;
  :mod:`~mtl_plugin.bench.sharing`: how the processes of a bench under torchrun share the cells out.
* :mod:`~mtl_plugin.bench.methods`: the rows, one file per method, in a decorator registry
  (the ablation rows are config presets of ``mtl``).
* :mod:`~mtl_plugin.bench.ablation_report`: the ablation's plot and the paper's claims on paired
  differences; :mod:`~mtl_plugin.bench.published`: other papers' figures, shown beside ours.

The runner's public names are also importable from here, as they were when the bench was one
module (``from mtl_plugin.bench import BenchConfig, run_bench``); they load on first use, so that
importing :mod:`mtl_plugin.bench.methods` does not load the runner. Patch a name in
:mod:`~mtl_plugin.bench.runner`, where the runner looks it up, not here.

Example::

    from mtl_plugin.bench import BenchConfig, run_bench
    result = run_bench(BenchConfig.quick(methods=("protonet", "mtl"), shots=(1,)))
    print(result.table.to_string(index=False))
"""

import importlib
from typing import Any

_RUNNER_NAMES = (
    "BenchConfig",
    "BenchResult",
    "PROFILES",
    "SUITES",
    "pretrain_config_for",
    "run_bench",
    "shared_pretraining",
    "work_dir",
)

__all__ = list(_RUNNER_NAMES)


def __getattr__(name: str) -> Any:
    if name not in _RUNNER_NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(".runner", __name__), name)
