"""Time the generation of the default kanji data set (goal: under 2 minutes on 2 cores).

Generates into a fresh temporary cache folder, so nothing cached is reused, and
prints wall time, CPU time (this process and its workers) and the load average,
since other work on the machine slows the wall-clock figure.

Example::

    python benchmarks/kanji_generation.py                      # wild, 1,600 classes x 20 x 28 px
    python benchmarks/kanji_generation.py --style clean
    python benchmarks/kanji_generation.py --image-size 84 --workers 2
"""

from __future__ import annotations

import os
import resource
import tempfile
import time

import click

from mtl_plugin.data.kanji import STYLES, KanjiConfig, load_kanji


def _cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    workers = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + workers.ru_utime + workers.ru_stime


@click.command()
@click.option("--num-classes", default=KanjiConfig.num_classes, show_default=True)
@click.option("--instances", default=KanjiConfig.instances, show_default=True)
@click.option("--image-size", default=KanjiConfig.image_size, show_default=True)
@click.option("--style", type=click.Choice(sorted(STYLES)), default=KanjiConfig.style, show_default=True)
@click.option("--workers", type=int, default=None, help="[default: all usable cores]")
def main(num_classes: int, instances: int, image_size: int, style: str, workers) -> None:
    """Generate once from scratch and report the time it took."""
    config = KanjiConfig(num_classes=num_classes, instances=instances, image_size=image_size, style=style)
    with tempfile.TemporaryDirectory() as cache:
        wall, cpu = time.perf_counter(), _cpu_seconds()
        data = load_kanji(config, cache_dir=cache, workers=workers, progress=False)
        wall, cpu = time.perf_counter() - wall, _cpu_seconds() - cpu
        hit = time.perf_counter()
        load_kanji(config, cache_dir=cache, progress=False)
        hit = time.perf_counter() - hit
    images = data.pixels.shape[0] * data.pixels.shape[1]
    print(f"kanji {style} {num_classes} classes x {instances} x {image_size} px = {images} images")
    print(f"generation: {wall:.1f} s wall, {cpu:.1f} s CPU, {images / wall:.0f} images/s")
    print(f"cache hit: {hit:.2f} s")
    print(f"usable cores: {len(os.sched_getaffinity(0))}, load average: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
