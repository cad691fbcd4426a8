"""Few-shot data sets: an embedded default (``kanji``), the published benchmarks from local files, image
folders, and any data set registered with :func:`register_dataset`.

Example::

    from mtl_plugin.data import get_benchmark, build_taskset
    bench = get_benchmark("kanji")                     # generated once, then cached in $MTL_DATA
    tasks = build_taskset(bench.test, ways=5, shots=1, queries=15, num_tasks=600, seed=0)
"""

from mtl_plugin.data.benchmark import KNOWN_BENCHMARKS, FewShotBenchmark, get_benchmark
from mtl_plugin.data.cache import data_home
from mtl_plugin.data.folders import image_folder_split
from mtl_plugin.data.kanji import KanjiConfig, load_kanji
from mtl_plugin.data.registry import DatasetSpec, Splits, dataset_spec, list_datasets, register_dataset
from mtl_plugin.data.tasksets import get_tasksets
from mtl_plugin.data.transforms import ImageRecipe
from mtl_plugin.tasks import build_taskset

__all__ = [
    "KNOWN_BENCHMARKS",
    "DatasetSpec",
    "FewShotBenchmark",
    "ImageRecipe",
    "Splits",
    "dataset_spec",
    "image_folder_split",
    "list_datasets",
    "register_dataset",
    "get_benchmark",
    "get_tasksets",
    "build_taskset",
    "data_home",
    "KanjiConfig",
    "load_kanji",
]
