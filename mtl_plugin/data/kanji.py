"""``kanji``: an Omniglot-like few-shot data set generated locally from KanjiVG stroke data.

Each class is one kanji; each instance is that kanji "written" by a different
simulated writer: the writer moves, turns and rescales every stroke a little,
bends its control points with a smooth displacement field, picks a pen width,
and applies a small global affine change; the strokes are then drawn with round
caps at ``supersample`` times the target size and box-filtered down, which
anti-aliases them. Images are greyscale, white strokes on black, like Omniglot
after the usual ``1 - x``.

The stroke data come from the ``kanjivg`` package (KanjiVG, copyright Ulrich
Apel, CC BY-SA 3.0, https://kanjivg.tagaini.net); the generated images are an
adaptation of it and carry the same licence.

Everything random is drawn from generators seeded with ``(seed, code point,
instance)``, so the same configuration gives byte-identical arrays whatever the
number of worker processes. Results are cached under ``$MTL_DATA/kanji``.

Example::

    from mtl_plugin.data.kanji import KanjiConfig, load_kanji
    data = load_kanji(KanjiConfig(num_classes=30, instances=6))
    data.pixels.shape            # (30, 6, 28, 28), uint8
    data.split_classes("train")  # code points of the training classes
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from mtl_plugin.data.cache import data_home, load_verified_array, save_verified_array
from mtl_plugin.data.svg_path import flatten, parse_path

__all__ = [
    "KanjiConfig",
    "KanjiData",
    "load_kanji",
    "generate_kanji",
    "render_kanji",
    "rasterise",
    "parse_strokes",
    "kanji_strokes",
    "preview_grid",
]

# Bump when the drawing changes, so old caches are not mistaken for new ones.
GENERATOR_VERSION = 1
SPLITS = ("train", "val", "test")
_CANVAS = 109.0  # KanjiVG's viewBox is 0 0 109 109.
_CJK_RANGES = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF))
_PATH_DATA = re.compile(r"<path\b[^>]*?\sd=\"([^\"]+)\"")
_INLINE_LIMIT = 2000  # below this many images, worker start-up costs more than it saves


@dataclass(frozen=True)
class KanjiConfig:
    """What to generate. Lengths are in KanjiVG units (the character box is 109 wide).

    Example::

        config = KanjiConfig(num_classes=1600, instances=20, image_size=28, seed=0)
    """

    num_classes: int = 1600
    instances: int = 20  # Omniglot has 20 drawers per character.
    image_size: int = 28
    seed: int = 0
    split_fractions: Tuple[float, float, float] = (0.6, 0.2, 0.2)
    # Dense kanji turn into blobs at 28 px; 10 strokes still leaves 2,300+ candidates.
    max_strokes: int = 10
    stroke_width: Tuple[float, float] = (5.0, 8.0)
    stroke_shift: float = 1.5
    stroke_turn_degrees: float = 4.0
    stroke_scale: float = 0.05
    control_jitter: float = 0.8
    field_amplitude: float = 2.0
    field_wavelength: Tuple[float, float] = (60.0, 160.0)
    turn_degrees: float = 6.0
    scale: Tuple[float, float] = (0.82, 1.0)
    shear: float = 0.12
    shift: float = 4.0
    curve_steps: int = 6  # line pieces per Bézier segment

    def __post_init__(self):
        if self.num_classes < 3:
            raise ValueError(f"num_classes={self.num_classes}: need at least 3 (one per split)")
        if self.instances < 1:
            raise ValueError(f"instances={self.instances}: need at least 1")
        if self.image_size < 8:
            raise ValueError(f"image_size={self.image_size}: use 8 px or more (28, 32 and 84 are usual)")
        if len(self.split_fractions) != 3 or min(self.split_fractions) <= 0:
            raise ValueError(f"split_fractions={self.split_fractions}: give three positive train/val/test fractions")

    def split_sizes(self) -> Tuple[int, int, int]:
        """Number of classes in train, val and test (every split gets at least one)."""
        total = sum(self.split_fractions)
        val = max(1, round(self.num_classes * self.split_fractions[1] / total))
        test = max(1, round(self.num_classes * self.split_fractions[2] / total))
        train = self.num_classes - val - test
        if train < 1:
            raise ValueError(f"num_classes={self.num_classes} is too few for splits {self.split_fractions}")
        return train, val, test


@dataclass
class KanjiData:
    """Generated images ``pixels[class, instance, H, W]`` (uint8) and their classes.

    Classes are stored train first, then val, then test, each in code-point order.

    Example::

        data = load_kanji(KanjiConfig(num_classes=30, instances=6))
        train_pixels = data.split_pixels("train")
    """

    pixels: np.ndarray
    code_points: List[int]
    split_sizes: Tuple[int, int, int]
    manifest: Dict = field(default_factory=dict)

    def _range(self, split: str) -> slice:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}: use one of {SPLITS}")
        start = sum(self.split_sizes[: SPLITS.index(split)])
        return slice(start, start + self.split_sizes[SPLITS.index(split)])

    def split_pixels(self, split: str) -> np.ndarray:
        """``(classes, instances, H, W)`` images of one split."""
        return self.pixels[self._range(split)]

    def split_classes(self, split: str) -> List[int]:
        """Code points of the classes of one split, in label order."""
        return self.code_points[self._range(split)]


def kanjivg_folder() -> Path:
    """The folder of KanjiVG SVG files installed by the ``kanjivg`` package.

    Example::

        svg = kanjivg_folder() / f"{ord('木'):05x}.svg"
    """
    try:
        distribution = importlib_metadata.distribution("kanjivg")
    except importlib_metadata.PackageNotFoundError:
        raise ModuleNotFoundError(
            "the 'kanji' data set is drawn from KanjiVG's strokes: install them with "
            "`pip install kanjivg`"
        ) from None
    folder = Path(distribution.locate_file("kanji"))
    if not folder.is_dir():
        raise FileNotFoundError(f"the kanjivg package is installed but {folder} is missing: reinstall kanjivg")
    return folder


def _kanjivg_version() -> str:
    kanjivg_folder()  # raises the "install kanjivg" error when it is missing
    return importlib_metadata.version("kanjivg")


def kanji_strokes(code_point: int, folder: Optional[Path] = None) -> List[str]:
    """The SVG path data of each stroke of ``code_point``, in writing order.

    Example::

        strokes = kanji_strokes(ord("木"))   # 4 strokes
    """
    folder = kanjivg_folder() if folder is None else folder
    text = (folder / f"{code_point:05x}.svg").read_text(encoding="utf-8")
    return _PATH_DATA.findall(text)


def _candidates(config: KanjiConfig, folder: Path) -> List[int]:
    """Code points of the kanji (no variants, no kana) with at most ``max_strokes`` strokes."""
    found = []
    for path in sorted(folder.glob("*.svg")):
        stem = path.stem
        if "-" in stem:
            continue
        code_point = int(stem, 16)
        if not any(low <= code_point <= high for low, high in _CJK_RANGES):
            continue
        if path.read_bytes().count(b"<path ") <= config.max_strokes:
            found.append(code_point)
    return found


def choose_classes(config: KanjiConfig, folder: Optional[Path] = None) -> Tuple[List[int], Tuple[int, int, int]]:
    """The seeded choice of kanji and their split: code points train-then-val-then-test.

    Example::

        code_points, (train, val, test) = choose_classes(KanjiConfig(num_classes=30))
        train_kanji = [chr(cp) for cp in code_points[:train]]
    """
    candidates = _candidates(config, kanjivg_folder() if folder is None else folder)
    if config.num_classes > len(candidates):
        raise ValueError(
            f"num_classes={config.num_classes} but only {len(candidates)} kanji have at most "
            f"{config.max_strokes} strokes; lower num_classes or raise max_strokes"
        )
    rng = np.random.default_rng([config.seed, 0x6B616E6A])  # "kanj": a stream of its own
    chosen = [candidates[i] for i in rng.permutation(len(candidates))[: config.num_classes]]
    sizes = config.split_sizes()
    ordered, start = [], 0
    for size in sizes:
        ordered.extend(sorted(chosen[start : start + size]))
        start += size
    return ordered, sizes


def _rotation(degrees: float) -> np.ndarray:
    angle = np.deg2rad(degrees)
    return np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])


def _simulated_writer(strokes: List[np.ndarray], rng: np.random.Generator, config: KanjiConfig):
    """Deform each stroke's control points ``(segments, 4, 2)``; return them and pen widths."""
    centre = np.full(2, _CANVAS / 2)
    waves = []
    for _ in range(2):
        direction = rng.normal(size=2)
        direction /= np.linalg.norm(direction) + 1e-12
        wavelength = rng.uniform(*config.field_wavelength)
        waves.append((direction * 2 * np.pi / wavelength, rng.uniform(0, 2 * np.pi), rng.normal(0, config.field_amplitude, 2)))
    glob = (
        _rotation(rng.normal(0, config.turn_degrees))
        @ np.array([[1.0, rng.uniform(-config.shear, config.shear)], [0.0, 1.0]])
        @ np.diag(rng.uniform(*config.scale, size=2))
    )
    glob_shift = rng.normal(0, config.shift / 2, 2)
    base_width = rng.uniform(*config.stroke_width)
    deformed, widths = [], []
    for controls in strokes:
        points = controls.reshape(-1, 2)
        pivot = points.mean(axis=0)
        local = _rotation(rng.normal(0, config.stroke_turn_degrees)) * (1 + rng.normal(0, config.stroke_scale))
        points = (points - pivot) @ local.T + pivot + rng.normal(0, config.stroke_shift, 2)
        points = points.reshape(-1, 4, 2).copy()
        # Jitter inner control points only: end points are shared with the next segment.
        points[:, 1:3] += rng.normal(0, config.control_jitter, points[:, 1:3].shape)
        flat = points.reshape(-1, 2)
        for frequency, phase, amplitude in waves:
            flat = flat + np.sin(flat @ frequency + phase)[:, None] * amplitude
        flat = (flat - centre) @ glob.T + centre + glob_shift
        deformed.append(flat.reshape(-1, 4, 2))
        widths.append(base_width * rng.uniform(0.9, 1.1))
    return deformed, widths


def parse_strokes(stroke_data: Sequence[str]) -> List[np.ndarray]:
    """Each stroke's cubic Bézier control points, ``(segments, 4, 2)``, in KanjiVG units.

    Example::

        strokes = parse_strokes(kanji_strokes(ord("木")))
        len(strokes)      # 4
    """
    return [np.stack(parse_path(d)) for d in stroke_data]


def rasterise(polylines: Sequence[np.ndarray], widths: Sequence[float], size: int) -> np.ndarray:
    """Draw round-capped strokes of the given widths; return a ``(size, size)`` uint8 image.

    Each pixel's ink is its pen coverage: 1 inside the stroke, 0 outside, a
    linear ramp over the one pixel across the stroke's edge (anti-aliasing).
    The distance to a polyline is the distance to its nearest piece, so caps
    and joins come out round. Only pixels near a stroke's bounding box are visited.

    Example::

        line = np.array([[20.0, 54.5], [90.0, 54.5]])
        image = rasterise([line], [6.0], 28)
    """
    pixel = _CANVAS / size
    centres = (np.arange(size) + 0.5) * pixel
    ink = np.zeros((size, size))
    for points, width in zip(polylines, widths):
        reach = width / 2 + pixel
        low = np.clip(np.floor((points.min(axis=0) - reach) / pixel).astype(int), 0, size)
        high = np.clip(np.ceil((points.max(axis=0) + reach) / pixel).astype(int), 0, size)
        if (high <= low).any():
            continue
        xs = np.tile(centres[low[0] : high[0]], high[1] - low[1])[:, None]
        ys = np.repeat(centres[low[1] : high[1]], high[0] - low[0])[:, None]
        start_x, start_y = points[:-1, 0], points[:-1, 1]
        step_x, step_y = np.diff(points[:, 0]), np.diff(points[:, 1])
        length2 = np.maximum(step_x**2 + step_y**2, 1e-12)
        t = np.clip(((xs - start_x) * step_x + (ys - start_y) * step_y) / length2, 0.0, 1.0)
        distance = np.sqrt(((xs - start_x - t * step_x) ** 2 + (ys - start_y - t * step_y) ** 2).min(axis=1))
        coverage = np.clip((width / 2 - distance) / pixel + 0.5, 0.0, 1.0)
        window = ink[low[1] : high[1], low[0] : high[0]]
        np.maximum(window, coverage.reshape(window.shape), out=window)
    return np.round(ink * 255).astype(np.uint8)


def render_kanji(strokes: Sequence[np.ndarray], rng: np.random.Generator, config: KanjiConfig) -> np.ndarray:
    """One simulated writer's ``(image_size, image_size)`` uint8 rendering of a kanji.

    Example::

        strokes = parse_strokes(kanji_strokes(ord("木")))
        image = render_kanji(strokes, np.random.default_rng(0), KanjiConfig())
    """
    deformed, widths = _simulated_writer(strokes, rng, config)
    polylines = [flatten(list(controls), steps=config.curve_steps) for controls in deformed]
    return rasterise(polylines, widths, config.image_size)


def _render_class(job: Tuple[int, List[str], KanjiConfig]) -> np.ndarray:
    code_point, stroke_data, config = job
    strokes = parse_strokes(stroke_data)
    return np.stack(
        [
            render_kanji(strokes, np.random.default_rng([config.seed, code_point, instance]), config)
            for instance in range(config.instances)
        ]
    )


def _cache_path(config: KanjiConfig, cache_dir: Path) -> Path:
    digest = hashlib.sha256(json.dumps(_identity(config), sort_keys=True).encode()).hexdigest()[:12]
    name = f"kanji-c{config.num_classes}-i{config.instances}-{config.image_size}px-seed{config.seed}-{digest}.npy"
    return cache_dir / name


def _identity(config: KanjiConfig) -> dict:
    return {"generator": GENERATOR_VERSION, "kanjivg": _kanjivg_version(), "config": asdict(config)}


def _default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def generate_kanji(config: KanjiConfig, workers: Optional[int] = None, progress: bool = True) -> KanjiData:
    """Generate the data set without touching the cache (see :func:`load_kanji`).

    ``workers`` processes draw the classes (default: one for small jobs, else
    every usable core); the result does not depend on it.

    Example::

        data = generate_kanji(KanjiConfig(num_classes=30, instances=6), workers=1)
    """
    from tqdm.auto import tqdm

    folder = kanjivg_folder()
    code_points, sizes = choose_classes(config, folder)
    jobs = [(cp, kanji_strokes(cp, folder), config) for cp in code_points]
    if workers is None:
        workers = 1 if len(jobs) * config.instances < _INLINE_LIMIT else _default_workers()
    bar = dict(total=len(jobs), desc="drawing kanji", unit="class", disable=not progress)
    if workers <= 1:
        rendered = [_render_class(job) for job in tqdm(jobs, **bar)]
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            rendered = list(tqdm(pool.map(_render_class, jobs, chunksize=16), **bar))
    return KanjiData(np.stack(rendered), code_points, sizes)


def load_kanji(
    config: KanjiConfig = KanjiConfig(),
    cache_dir: Optional[os.PathLike] = None,
    workers: Optional[int] = None,
    progress: bool = True,
) -> KanjiData:
    """The kanji data set for ``config``: read from the cache, or generated and cached.

    A cache entry whose checksum or settings do not match is reported with a
    warning and rebuilt.

    Example::

        data = load_kanji(KanjiConfig(num_classes=30, instances=6), cache_dir="/tmp/mtl")
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else data_home() / "kanji"
    path = _cache_path(config, cache_dir)
    identity = _identity(config)
    pixels, manifest, problem = load_verified_array(path, identity)
    if pixels is not None:
        sizes = tuple(manifest["split_sizes"])
        return KanjiData(pixels, list(manifest["code_points"]), sizes, manifest)
    if problem != "not generated yet":
        warnings.warn(f"kanji cache {path}: {problem}; generating it again", stacklevel=2)
    data = generate_kanji(config, workers=workers, progress=progress)
    data.manifest = save_verified_array(
        path, data.pixels, dict(identity, code_points=data.code_points, split_sizes=list(data.split_sizes))
    )
    return data


def preview_grid(data: KanjiData, split: str = "train", classes: int = 8, instances: int = 8) -> Image.Image:
    """A grid image: one row per class, one column per simulated writer.

    Example::

        preview_grid(load_kanji(), classes=10).save("kanji.png")
    """
    block = data.split_pixels(split)[:classes, :instances]
    rows, cols, height, width = block.shape
    pad = 2
    grid = np.full((rows * (height + pad) + pad, cols * (width + pad) + pad), 96, dtype=np.uint8)
    for r in range(rows):
        for c in range(cols):
            top, left = pad + r * (height + pad), pad + c * (width + pad)
            grid[top : top + height, left : left + width] = block[r, c]
    return Image.fromarray(grid)
