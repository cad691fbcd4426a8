"""mtl-plugin: Meta-Transfer Learning (Sun et al., CVPR 2019) for learn2learn, higher and torch.func.

Example::

    import mtl_plugin
    backbone = mtl_plugin.backbones.resnet12()
    adapter = mtl_plugin.SSAdapter(backbone)          # freeze W, learn Φ1 and Φ2
    optimiser = torch.optim.Adam(adapter.ss_parameters(), lr=1e-4)
    print(adapter.parameter_report().tail(1))
"""
import contextlib
import io

# learn2learn imports gym, whose import prints a deprecation notice on every run; gym is never
# used here, so take that first import with the notice swallowed.
with contextlib.redirect_stderr(io.StringIO()):
    try:
        import gym  # noqa: F401
    except ImportError:
        pass

from . import backbones
from .backbones import build_backbone, list_backbones, register_backbone
from .data import KNOWN_BENCHMARKS, FewShotBenchmark, get_benchmark, get_tasksets
from .hard_tasks import (
    ClassAccuracyTracker,
    HardTaskMetaBatch,
    HardTaskTransform,
    MetaBatch,
    SampledTask,
    TaskAccuracy,
    task_classes,
)
from .heads import feature_width, new_head
from .evaluation import EvaluationConfig, EvaluationResult, evaluate, nearest_centroid
from .meta_training import meta_train
from .meta_transfer import MetaTrainConfig, MetaTransferLearner
from .pretrain import PretrainConfig, load_pretrained, pretrain
from .run_log import NonFiniteLossError
from .ss import SSAdapter

__version__ = "0.1.0"

__all__ = [
    "SSAdapter",
    "feature_width",
    "new_head",
    "backbones",
    "build_backbone",
    "list_backbones",
    "register_backbone",
    "ClassAccuracyTracker",
    "HardTaskMetaBatch",
    "HardTaskTransform",
    "MetaBatch",
    "SampledTask",
    "TaskAccuracy",
    "task_classes",
    "get_benchmark",
    "get_tasksets",
    "FewShotBenchmark",
    "KNOWN_BENCHMARKS",
    "MetaTransferLearner",
    "MetaTrainConfig",
    "meta_train",
    "PretrainConfig",
    "pretrain",
    "load_pretrained",
    "EvaluationConfig",
    "EvaluationResult",
    "evaluate",
    "nearest_centroid",
    "NonFiniteLossError",
    "__version__",
]
