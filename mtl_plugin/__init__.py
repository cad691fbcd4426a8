"""mtl-plugin: Meta-Transfer Learning (Sun et al., CVPR 2019) for learn2learn, higher and torch.func.

The public names below are imported on first use (PEP 562), so that ``import mtl_plugin``
and ``mtl --help`` do not load torch, learn2learn and pandas before they are needed.

Example::

    import mtl_plugin
    backbone = mtl_plugin.backbones.resnet12()
    adapter = mtl_plugin.SSAdapter(backbone)          # freeze W, learn Φ1 and Φ2
    optimiser = torch.optim.Adam(adapter.ss_parameters(), lr=1e-4)
    print(adapter.parameter_report().tail(1))
"""

import importlib
from typing import TYPE_CHECKING, Any

# Keeps gym's deprecation notice, printed when learn2learn imports gym, off stderr (and nothing
# else): the wheel's .pth loads this hook at start-up; importing it here covers source checkouts.
import _mtl_plugin_quiet_gym  # noqa: F401

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "SSAdapter": "ss",
    "feature_width": "heads",
    "new_head": "heads",
    "SSHead": "heads",
    "build_backbone": "backbones",
    "list_backbones": "backbones",
    "register_backbone": "backbones",
    "ClassAccuracyTracker": "hard_tasks",
    "HardTaskMetaBatch": "hard_tasks",
    "HardTaskTransform": "hard_tasks",
    "MetaBatch": "hard_tasks",
    "SampledTask": "hard_tasks",
    "TaskAccuracy": "hard_tasks",
    "record_task": "hard_tasks",
    "task_classes": "hard_tasks",
    "get_benchmark": "data",
    "get_tasksets": "data",
    "FewShotBenchmark": "data",
    "KNOWN_BENCHMARKS": "data",
    # Data sets by name, as backbones: a user's own registers as the built-in ones do.
    "register_dataset": "data.registry",
    "list_datasets": "data.registry",
    "dataset_spec": "data.registry",
    "Splits": "data.registry",
    "ImageRecipe": "data.transforms",
    "MetaTransferLearner": "meta_transfer",
    "MetaTrainConfig": "meta_config",
    "MetaTransferConfig": "meta_config",
    # The paper's outer loop (Adam, schedule, divergence checks, all-reduce) apart from the learner.
    "MetaTrainer": "training.meta_step",
    "MetaStepResult": "training.meta_step",
    "split_support_query": "tasks",
    "Speedups": "speedups",
    "meta_train": "training.meta_training",
    "PretrainConfig": "training.pretrain",
    "pretrain": "training.pretrain",
    "load_pretrained": "training.pretrain_checkpoint",
    # The one reader of each kind of checkpoint: its contents, read safely and checked.
    "read_pretrain_checkpoint": "training.pretrain_checkpoint",
    "read_meta_checkpoint": "training.checkpoints",
    "EvaluationConfig": "evaluation",
    "EvaluationResult": "evaluation",
    "evaluate": "evaluation",
    "nearest_centroid": "evaluation",
    "NonFiniteLossError": "errors",
    # The leak guard: a model trained on a val or test class is refused where it is evaluated.
    "ClassLeakError": "data.leak",
    # An adapter saved with its config; a meta-trained learner rebuilt from its checkpoint.
    "SSConfig": "ss",
    "load_learner": "training.checkpoints",
    # The rows of `mtl bench`: a user's own method or config preset joins them by name.
    "build_method": "bench.methods",
    "list_methods": "bench.methods",
    "register_method": "bench.methods",
    "register_preset": "bench.methods",
}

__all__ = ["backbones", *_EXPORTS, "__version__"]

if TYPE_CHECKING:
    from . import backbones
    from .backbones import build_backbone, list_backbones, register_backbone
    from .bench.methods import build_method, list_methods, register_method, register_preset
    from .data import KNOWN_BENCHMARKS, FewShotBenchmark, get_benchmark, get_tasksets
    from .data.leak import ClassLeakError
    from .data.registry import Splits, dataset_spec, list_datasets, register_dataset
    from .data.transforms import ImageRecipe
    from .errors import NonFiniteLossError
    from .evaluation import EvaluationConfig, EvaluationResult, evaluate, nearest_centroid
    from .hard_tasks import (
        ClassAccuracyTracker,
        HardTaskMetaBatch,
        HardTaskTransform,
        MetaBatch,
        SampledTask,
        TaskAccuracy,
        record_task,
        task_classes,
    )
    from .heads import SSHead, feature_width, new_head
    from .meta_config import MetaTrainConfig, MetaTransferConfig
    from .meta_transfer import MetaTransferLearner
    from .speedups import Speedups
    from .ss import SSAdapter, SSConfig
    from .tasks import split_support_query
    from .training.checkpoints import load_learner, read_meta_checkpoint
    from .training.meta_step import MetaStepResult, MetaTrainer
    from .training.meta_training import meta_train
    from .training.pretrain import PretrainConfig, pretrain
    from .training.pretrain_checkpoint import load_pretrained, read_pretrain_checkpoint


def __getattr__(name: str) -> Any:
    if name == "backbones":
        return importlib.import_module(".backbones", __name__)
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list:
    return sorted({*globals(), *__all__})
