"""``mtl data``: generate the kanji data set, preview it, and check local benchmark files.

Example::

    mtl data kanji --preview kanji.png            # generate (once) and write a sample grid
    mtl data kanji --image-size 84 --num-classes 200
    mtl data kanji --style clean                  # the first generator's mild rendering
    mtl data info fc100 --root ~/data/fc100       # class and image counts per split

A bad option ends as one ``Error: ...`` line with exit code 2, missing or damaged files with
exit code 1 (see :mod:`mtl_plugin.errors`).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import click

from mtl_plugin.checks import check_output_file
from mtl_plugin.cli.base import SEED, Group, count
from mtl_plugin.data.benchmark import KNOWN_BENCHMARKS, get_benchmark, image_size_of
from mtl_plugin.data.kanji import STYLES, KanjiConfig, load_kanji, preview_grid
from mtl_plugin.errors import DataError, UsageError

__all__ = ["data"]

_DEFAULTS = KanjiConfig()


@contextmanager
def _typed_errors(plain: type) -> Iterator[None]:
    """Let the typed errors through to the group; a plain ``ValueError`` becomes ``plain``, a missing
    file or package a :class:`DataError`."""
    try:
        yield
    except (UsageError, DataError):
        raise
    except ValueError as error:
        raise plain(str(error)) from error
    except (FileNotFoundError, ModuleNotFoundError) as error:
        raise DataError(str(error)) from error


@click.group(cls=Group)
def data() -> None:
    """Few-shot data sets: generate, preview, check."""


@data.command()
@click.option(
    "--num-classes", type=count(1), default=_DEFAULTS.num_classes, show_default=True, help="Kanji (classes) to draw."
)
@click.option(
    "--instances", type=count(1), default=_DEFAULTS.instances, show_default=True, help="Simulated writers per kanji."
)
@click.option("--image-size", default=_DEFAULTS.image_size, show_default=True, help="Pixels per side (28, 32 or 84).")
@click.option(
    "--seed", type=SEED, default=_DEFAULTS.seed, show_default=True, help="Fixes the kanji, their split and the writers."
)
@click.option(
    "--style",
    type=click.Choice(sorted(STYLES)),
    default=_DEFAULTS.style,
    show_default=True,
    help="wild: pose, pen, dropped strokes, contrast, noise and clutter; clean: mild variation only.",
)
@click.option("--workers", type=int, default=None, help="Processes to draw with [default: all usable cores].")
@click.option(
    "--cache-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Cache folder [default: $MTL_DATA/kanji or ~/.cache/mtl_plugin/kanji].",
)
@click.option(
    "--preview",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write a PNG grid of samples here: one row per class, one column per writer.",
)
@click.option("--preview-classes", type=count(1), default=10, show_default=True, help="Rows in the preview.")
def kanji(
    num_classes: int,
    instances: int,
    image_size: int,
    seed: int,
    style: str,
    workers: int | None,
    cache_dir: Path | None,
    preview: Path | None,
    preview_classes: int,
) -> None:
    """Generate (or load from the cache) the kanji data set drawn from KanjiVG (CC BY-SA 3.0)."""
    start = time.perf_counter()
    if preview is not None:
        check_output_file(preview, "--preview")  # before the drawing, not after it
    # Every value KanjiConfig and the drawing refuse is one of the flags.
    with _typed_errors(UsageError):
        config = KanjiConfig(
            num_classes=num_classes, instances=instances, image_size=image_size, seed=seed, style=style
        )
        result = load_kanji(config, cache_dir=cache_dir, workers=workers)
    elapsed = time.perf_counter() - start
    train, val, test = result.split_sizes
    click.echo(
        f"kanji ({style}): {num_classes} classes (train {train} / val {val} / test {test}) x {instances} writers, "
        f"{image_size} px, {result.pixels.nbytes / 2**20:.1f} MiB, ready in {elapsed:.1f} s"
    )
    if preview is not None:
        from mtl_plugin.utils.io import atomic_open

        grid = preview_grid(result, "train", classes=preview_classes, instances=min(instances, 10))
        # Small images are hard to see: scale up to at least about 56 px a cell.
        factor = max(1, round(56 / image_size))
        grid = grid.resize((grid.width * factor, grid.height * factor), resample=0)
        with atomic_open(preview, "wb") as handle:
            grid.save(handle, format="PNG")
        click.echo(f"preview written to {preview}")


@data.command()
@click.argument("name", type=click.Choice(KNOWN_BENCHMARKS))
@click.option(
    "--root",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Folder holding the data set's files [default: $MTL_DATA/NAME].",
)
@click.option("--image-size", type=int, default=None, help="Pixels per side [default: the data set's usual size].")
def info(name: str, root: Path | None, image_size: int | None) -> None:
    """Load a data set from local files and print its classes and images per split."""
    # get_benchmark names bad flags with UsageError; anything else it refuses is in the files.
    with _typed_errors(DataError):
        # get_benchmark checks the size too, in API terms; checked first so that the message names the flag.
        image_size_of(name, image_size, "--image-size")
        bench = get_benchmark(name, root=root, image_size=image_size)
    click.echo(f"{bench.name}: {bench.channels} x {bench.image_size} x {bench.image_size}, standard={bench.standard}")
    for split in ("train", "val", "test"):
        dataset = bench.split(split)
        click.echo(f"  {split:5s} {len(dataset.labels):6d} classes {len(dataset):8d} images")
