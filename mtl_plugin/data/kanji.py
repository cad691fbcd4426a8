"""``kanji``: an Omniglot-like few-shot data set generated locally from KanjiVG stroke data.

Each class is one kanji; each instance is that kanji "written" by a different
simulated writer: the writer moves, turns and rescales every stroke, bends its
control points with a smooth displacement field, picks a pen width, and applies
a global affine pose (rotation, anisotropic scale, shear, shift). The strokes
are drawn with round caps and anti-aliased edges.
Images are greyscale, light strokes on a dark ground, like Omniglot after the
usual ``1 - x``.

Two named styles (:data:`STYLES`) set the drawing parameters:

* ``"wild"`` (the default) has headroom for few-shot methods: strong pose and
  elastic variation, a wide range of pen widths, dropped strokes, varying ink
  and paper brightness, pixel noise, and background clutter made of a few
  strokes of other kanji (kanji with more strokes than any class, so never a
  class of the data set), often partly off the frame;
* ``"clean"`` is the first generator's mild rendering, pixel for pixel.

Any drawing field left at ``None`` takes its style's value; a field that is set
overrides it, e.g. ``KanjiConfig(clutter=0)`` is the wild style without clutter.

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
    clean = load_kanji(KanjiConfig(num_classes=30, instances=6, style="clean"))
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import sys
import time
import warnings
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from mtl_plugin.data.cache import data_home, load_verified_array, save_verified_array
from mtl_plugin.data.svg_path import flatten, parse_path
from mtl_plugin.utils.progress import progress_bar

__all__ = [
    "STYLES",
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
GENERATOR_VERSION = 2
SPLITS = ("train", "val", "test")
_CANVAS = 109.0  # KanjiVG's viewBox is 0 0 109 109.
_CJK_RANGES = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF))
_PATH_DATA = re.compile(r"<path\b[^>]*?\sd=\"([^\"]+)\"")
_INLINE_LIMIT = 2000  # below this many images, worker start-up costs more than it saves
# The generated set is held in memory twice while it is drawn and saved: a few GiB at most.
MAX_BYTES = 4 * 2**30
_CLUTTER_POOL = 256  # kanji whose strokes make the background clutter
_CLUTTER_RUN = 3  # strokes at most in one piece of clutter

# The drawing parameters of each style; lengths in KanjiVG units (the character box is 109 wide).
STYLES: dict[str, dict[str, Any]] = {
    "clean": dict(
        stroke_width=(5.0, 8.0),
        stroke_shift=1.5,
        stroke_turn_degrees=4.0,
        stroke_scale=0.05,
        control_jitter=0.8,
        field_amplitude=2.0,
        field_wavelength=(60.0, 160.0),
        turn_degrees=6.0,
        scale=(0.82, 1.0),
        shear=0.12,
        shift=4.0,
        drop_stroke=0.0,
        ink=(1.0, 1.0),
        background=(0.0, 0.0),
        noise=0.0,
        clutter=0,
        clutter_ink=(0.25, 0.6),
    ),
    # Calibrated on the validation split with benchmarks/kanji_calibration.py (see its docstring):
    # re-calibrated for a pretraining that converges, by more lost strokes, noise and brighter clutter.
    "wild": dict(
        stroke_width=(3.5, 9.0),
        stroke_shift=3.0,
        stroke_turn_degrees=8.0,
        stroke_scale=0.1,
        control_jitter=1.5,
        field_amplitude=4.0,
        field_wavelength=(40.0, 140.0),
        turn_degrees=12.0,
        scale=(0.68, 1.04),
        shear=0.25,
        shift=12.0,
        drop_stroke=0.2,
        ink=(0.6, 1.0),
        background=(0.0, 0.25),
        noise=0.08,
        clutter=5,
        clutter_ink=(0.35, 0.8),
    ),
}
_RANGES = ("stroke_width", "field_wavelength", "scale", "ink", "background", "clutter_ink")


@dataclass(frozen=True)
class KanjiConfig:
    """What to generate. Lengths are in KanjiVG units (the character box is 109 wide).

    ``style`` names a set of drawing parameters (:data:`STYLES`): ``"wild"``
    (default) or ``"clean"``. Each drawing field left at ``None`` takes the
    style's value; :meth:`resolved` fills them in.

    Drawing fields: ``stroke_width`` (pen width range), ``stroke_shift``,
    ``stroke_turn_degrees`` and ``stroke_scale`` (per-stroke pose, standard
    deviations), ``control_jitter`` (Bézier control points), ``field_amplitude``
    and ``field_wavelength`` (smooth displacement field), ``turn_degrees``,
    ``scale``, ``shear`` and ``shift`` (the writer's global pose),
    ``drop_stroke`` (chance that a stroke is left out; at most a quarter of a
    kanji's strokes are), ``ink`` and ``background`` (stroke and paper
    brightness ranges, 0 black, 1 white), ``noise`` (standard deviation of
    per-pixel noise), ``clutter`` (at most this many pieces of 1-3 strokes of
    other kanji behind the character) and ``clutter_ink`` (their brightness
    relative to the character's ink).

    Raises:
        ValueError: naming the field, for a value out of its range or an unknown style.

    Example::

        config = KanjiConfig(num_classes=1600, instances=20, image_size=28, seed=0)
        no_clutter = KanjiConfig(clutter=0)
        first_generator = KanjiConfig(style="clean")
    """

    num_classes: int = 1600
    instances: int = 20  # Omniglot has 20 drawers per character.
    image_size: int = 28
    seed: int = 0
    split_fractions: tuple[float, float, float] = (0.6, 0.2, 0.2)
    # Dense kanji turn into blobs at 28 px; 10 strokes still leaves 2,300+ candidates.
    max_strokes: int = 10
    style: str = "wild"
    stroke_width: tuple[float, float] | None = None
    stroke_shift: float | None = None
    stroke_turn_degrees: float | None = None
    stroke_scale: float | None = None
    control_jitter: float | None = None
    field_amplitude: float | None = None
    field_wavelength: tuple[float, float] | None = None
    turn_degrees: float | None = None
    scale: tuple[float, float] | None = None
    shear: float | None = None
    shift: float | None = None
    drop_stroke: float | None = None
    ink: tuple[float, float] | None = None
    background: tuple[float, float] | None = None
    noise: float | None = None
    clutter: int | None = None
    clutter_ink: tuple[float, float] | None = None
    curve_steps: int = 6  # line pieces per Bézier segment

    def __post_init__(self):
        if self.num_classes < 3:
            raise ValueError(f"num_classes={self.num_classes}: need at least 3 (one per split)")
        if self.instances < 1:
            raise ValueError(f"instances={self.instances}: need at least 1")
        size = self.num_classes * self.instances * self.image_size**2
        if size > MAX_BYTES:
            raise ValueError(
                f"num_classes={self.num_classes} x instances={self.instances} at {self.image_size} px would be "
                f"{size / 2**30:,.1f} GiB of images; keep it under {MAX_BYTES // 2**30} GiB "
                f"(at most {MAX_BYTES // (self.num_classes * self.image_size**2):,} instances here)"
            )
        if self.image_size < 8:
            raise ValueError(f"image_size={self.image_size}: use 8 px or more (28, 32 and 84 are usual)")
        if len(self.split_fractions) != 3 or min(self.split_fractions) <= 0:
            raise ValueError(f"split_fractions={self.split_fractions}: give three positive train/val/test fractions")
        if self.curve_steps < 1:
            raise ValueError(f"curve_steps={self.curve_steps}: need at least 1 line piece per curve")
        if self.style not in STYLES:
            raise ValueError(f"style={self.style!r}: use one of {sorted(STYLES)}")
        self._check_drawing(self.resolved())

    @staticmethod
    def _check_drawing(drawing: KanjiConfig) -> None:
        for name in _RANGES:
            value = getattr(drawing, name)
            if not isinstance(value, (tuple, list)) or len(value) != 2 or not 0 <= value[0] <= value[1]:
                raise ValueError(f"{name}={value}: give a (low, high) pair with 0 <= low <= high")
        for name in ("stroke_width", "field_wavelength", "scale"):
            if getattr(drawing, name)[0] <= 0:
                raise ValueError(f"{name}={getattr(drawing, name)}: both ends must be positive")
        for name in ("ink", "clutter_ink"):
            if not (getattr(drawing, name)[0] > 0 and getattr(drawing, name)[1] <= 1):
                raise ValueError(f"{name}={getattr(drawing, name)}: brightness must lie in (0, 1]")
        if drawing.background[1] >= drawing.ink[0]:
            raise ValueError(
                f"background={drawing.background} must stay below ink={drawing.ink} so strokes stay lighter "
                f"than the paper: lower background or raise ink"
            )
        for name in (
            "stroke_shift",
            "stroke_turn_degrees",
            "stroke_scale",
            "control_jitter",
            "field_amplitude",
            "turn_degrees",
            "shear",
            "shift",
            "noise",
        ):
            if getattr(drawing, name) < 0:
                raise ValueError(f"{name}={getattr(drawing, name)}: must be 0 or more")
        if not 0 <= drawing.drop_stroke <= 1:
            raise ValueError(f"drop_stroke={drawing.drop_stroke}: a chance per stroke, between 0 and 1")
        if not isinstance(drawing.clutter, (int, np.integer)) or drawing.clutter < 0:
            raise ValueError(f"clutter={drawing.clutter}: a whole number of pieces, 0 (none) or more")

    def resolved(self) -> KanjiConfig:
        """This configuration with every drawing field left at ``None`` set to its style's value.

        Returns:
            A ``KanjiConfig`` without ``None`` fields (itself if it has none).

        Example::

            KanjiConfig(style="clean").resolved().stroke_width   # (5.0, 8.0)
        """
        unset = {name: value for name, value in STYLES[self.style].items() if getattr(self, name) is None}
        return replace(self, **unset) if unset else self

    def split_sizes(self) -> tuple[int, int, int]:
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
    code_points: list[int]
    split_sizes: tuple[int, int, int]
    manifest: dict = field(default_factory=dict)

    def _range(self, split: str) -> slice:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}: use one of {SPLITS}")
        start = sum(self.split_sizes[: SPLITS.index(split)])
        return slice(start, start + self.split_sizes[SPLITS.index(split)])

    def split_pixels(self, split: str) -> np.ndarray:
        """``(classes, instances, H, W)`` images of one split."""
        return self.pixels[self._range(split)]

    def split_classes(self, split: str) -> list[int]:
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
            "the 'kanji' data set is drawn from KanjiVG's strokes: install them with `pip install kanjivg`"
        ) from None
    folder = Path(distribution.locate_file("kanji"))
    if not folder.is_dir():
        raise FileNotFoundError(f"the kanjivg package is installed but {folder} is missing: reinstall kanjivg")
    return folder


def _kanjivg_version() -> str:
    kanjivg_folder()  # raises the "install kanjivg" error when it is missing
    return importlib_metadata.version("kanjivg")


def kanji_strokes(code_point: int, folder: Path | None = None) -> list[str]:
    """The SVG path data of each stroke of ``code_point``, in writing order.

    Example::

        strokes = kanji_strokes(ord("木"))   # 4 strokes
    """
    folder = kanjivg_folder() if folder is None else folder
    text = (folder / f"{code_point:05x}.svg").read_text(encoding="utf-8")
    return _PATH_DATA.findall(text)


@functools.lru_cache(maxsize=4)
def _stroke_counts(folder: Path) -> tuple[tuple[int, int], ...]:
    """``(code point, strokes)`` of every kanji (no variants, no kana), in code-point order."""
    found = []
    for path in sorted(folder.glob("*.svg")):
        stem = path.stem
        if "-" in stem:
            continue
        code_point = int(stem, 16)
        if any(low <= code_point <= high for low, high in _CJK_RANGES):
            found.append((code_point, path.read_bytes().count(b"<path ")))
    return tuple(found)


def _candidates(config: KanjiConfig, folder: Path) -> list[int]:
    """Code points of the kanji with at most ``max_strokes`` strokes: the possible classes."""
    return [code_point for code_point, strokes in _stroke_counts(folder) if strokes <= config.max_strokes]


def _clutter_kanji(config: KanjiConfig, folder: Path) -> list[int]:
    """The seeded pool of kanji whose strokes make the clutter: more strokes than any class may have."""
    heavier = [code_point for code_point, strokes in _stroke_counts(folder) if strokes > config.max_strokes]
    if not heavier:
        raise ValueError(
            f"clutter={config.resolved().clutter} draws strokes of kanji with more than max_strokes="
            f"{config.max_strokes} strokes, and there are none: lower max_strokes or set clutter=0"
        )
    rng = np.random.default_rng([config.seed, 0x636C7574])  # "clut"
    return sorted(rng.choice(heavier, size=min(_CLUTTER_POOL, len(heavier)), replace=False).tolist())


@functools.cache
def _parsed_kanji(folder: Path, code_point: int) -> tuple[np.ndarray, ...]:
    # Every worker parses the clutter pool once, not once per class.
    return tuple(parse_strokes(kanji_strokes(code_point, folder)))


def choose_classes(config: KanjiConfig, folder: Path | None = None) -> tuple[list[int], tuple[int, int, int]]:
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


def _simulated_writer(strokes: list[np.ndarray], rng: np.random.Generator, config: KanjiConfig):
    """Deform each stroke's control points ``(segments, 4, 2)``; return them and pen widths."""
    centre = np.full(2, _CANVAS / 2)
    waves = []
    for _ in range(2):
        direction = rng.normal(size=2)
        direction /= np.linalg.norm(direction) + 1e-12
        wavelength = rng.uniform(*config.field_wavelength)
        waves.append(
            (direction * 2 * np.pi / wavelength, rng.uniform(0, 2 * np.pi), rng.normal(0, config.field_amplitude, 2))
        )
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


def parse_strokes(stroke_data: Sequence[str]) -> list[np.ndarray]:
    """Each stroke's cubic Bézier control points, ``(segments, 4, 2)``, in KanjiVG units.

    Example::

        strokes = parse_strokes(kanji_strokes(ord("木")))
        len(strokes)      # 4
    """
    return [np.stack(parse_path(d)) for d in stroke_data]


def _coverage(polylines: Sequence[np.ndarray], widths: Sequence[float], size: int) -> np.ndarray:
    """Pen coverage in [0, 1] of each pixel of a ``(size, size)`` image (see :func:`rasterise`)."""
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
    return ink


def rasterise(polylines: Sequence[np.ndarray], widths: Sequence[float], size: int) -> np.ndarray:
    """Draw round-capped strokes of the given widths; return a ``(size, size)`` uint8 image.

    Each pixel's ink is its pen coverage: 1 inside the stroke, 0 outside, a
    linear ramp over the one pixel across the stroke's edge (anti-aliasing).
    The distance to a polyline is the distance to its nearest piece, so caps
    and joins come out round. Only pixels near a stroke's bounding box are visited.

    Args:
        polylines: ``(n, 2)`` point arrays in KanjiVG units (0 to 109).
        widths: the pen width of each polyline, in the same units.
        size: pixels per side.

    Returns:
        A ``(size, size)`` uint8 image, 255 where fully inked.

    Example::

        line = np.array([[20.0, 54.5], [90.0, 54.5]])
        image = rasterise([line], [6.0], 28)
    """
    return np.round(_coverage(polylines, widths, size) * 255).astype(np.uint8)


def _kept_strokes(count: int, rng: np.random.Generator, chance: float) -> list[int]:
    """Indices of the strokes the writer draws: each is left out with ``chance``, a quarter of them at most."""
    dropped = np.flatnonzero(rng.random(count) < chance)
    # A kanji of 3 strokes or fewer keeps them all: one missing stroke may well make another kanji.
    if len(dropped) > count // 4:
        dropped = rng.choice(dropped, count // 4, replace=False)
    return [i for i in range(count) if i not in dropped]


def _clutter_pieces(others: Sequence[Sequence[np.ndarray]], rng: np.random.Generator, config: KanjiConfig):
    """Up to ``config.clutter`` runs of 1-3 consecutive strokes of other kanji: (polylines, pen width, brightness)."""
    pieces = []
    for _ in range(rng.integers(0, config.clutter + 1)):
        strokes = others[rng.integers(len(others))]
        run = rng.integers(1, min(_CLUTTER_RUN, len(strokes)) + 1)
        first = rng.integers(0, len(strokes) - run + 1)
        chosen = strokes[first : first + run]
        pivot = np.concatenate([controls.reshape(-1, 2) for controls in chosen]).mean(axis=0)
        pose = _rotation(rng.normal(0, config.turn_degrees)) * rng.uniform(*config.scale)
        # The piece lands anywhere on the canvas, so one near an edge is partly off the frame.
        place = rng.uniform(0, _CANVAS, 2)
        polylines = [
            flatten(list(((controls.reshape(-1, 2) - pivot) @ pose.T + place).reshape(-1, 4, 2)), config.curve_steps)
            for controls in chosen
        ]
        pieces.append((polylines, rng.uniform(*config.stroke_width), rng.uniform(*config.clutter_ink)))
    return pieces


def render_kanji(
    strokes: Sequence[np.ndarray],
    rng: np.random.Generator,
    config: KanjiConfig,
    others: Sequence[Sequence[np.ndarray]] = (),
) -> np.ndarray:
    """One simulated writer's ``(image_size, image_size)`` uint8 rendering of a kanji.

    Args:
        strokes: the kanji's strokes, as :func:`parse_strokes` gives them.
        rng: the writer's random generator; every random choice is drawn from it.
        config: the drawing parameters (its style fills in unset ones).
        others: parsed strokes of other kanji to take the clutter from.

    Returns:
        A ``(image_size, image_size)`` uint8 image, light strokes on a dark ground.

    Raises:
        ValueError: if ``config`` asks for clutter and ``others`` is empty.

    Example::

        strokes = parse_strokes(kanji_strokes(ord("木")))
        image = render_kanji(strokes, np.random.default_rng(0), KanjiConfig(clutter=0))
    """
    config = config.resolved()
    if config.clutter and not others:
        raise ValueError(f"clutter={config.clutter} needs other kanji's strokes: pass others= or set clutter=0")
    deformed, widths = _simulated_writer(strokes, rng, config)
    polylines = [flatten(list(controls), steps=config.curve_steps) for controls in deformed]
    # Drawn after the writer's own draws, so that the clean style's images stay the first generator's.
    kept = _kept_strokes(len(polylines), rng, config.drop_stroke)
    ink, paper = rng.uniform(*config.ink), rng.uniform(*config.background)
    light = ink * _coverage([polylines[i] for i in kept], [widths[i] for i in kept], config.image_size)
    for piece, width, brightness in _clutter_pieces(others, rng, config):
        np.maximum(light, brightness * ink * _coverage(piece, [width] * len(piece), config.image_size), out=light)
    image = paper + (1 - paper) * light + rng.normal(0, config.noise, light.shape)
    return np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)


def _render_class(job: tuple[int, list[str], KanjiConfig, Path, list[int]]) -> np.ndarray:
    code_point, stroke_data, config, folder, clutter_kanji = job
    strokes = parse_strokes(stroke_data)
    others = [_parsed_kanji(folder, other) for other in clutter_kanji]
    return np.stack(
        [
            render_kanji(strokes, np.random.default_rng([config.seed, code_point, instance]), config, others)
            for instance in range(config.instances)
        ]
    )


def _cache_path(config: KanjiConfig, cache_dir: Path) -> Path:
    digest = hashlib.sha256(json.dumps(_identity(config), sort_keys=True).encode()).hexdigest()[:12]
    size = f"c{config.num_classes}-i{config.instances}-{config.image_size}px"
    return cache_dir / f"kanji-{config.style}-{size}-seed{config.seed}-{digest}.npy"


def _identity(config: KanjiConfig) -> dict:
    return {"generator": GENERATOR_VERSION, "kanjivg": _kanjivg_version(), "config": asdict(config.resolved())}


def _default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def generate_kanji(config: KanjiConfig, workers: int | None = None, progress: bool = True) -> KanjiData:
    """Generate the data set without touching the cache (see :func:`load_kanji`).

    ``workers`` processes draw the classes (default: one for small jobs, else
    every usable core); the result does not depend on it.

    Example::

        data = generate_kanji(KanjiConfig(num_classes=30, instances=6), workers=1)
    """
    folder = kanjivg_folder()
    code_points, sizes = choose_classes(config, folder)
    clutter_kanji = _clutter_kanji(config, folder) if config.resolved().clutter else []
    jobs = [(cp, kanji_strokes(cp, folder), config, folder, clutter_kanji) for cp in code_points]
    if workers is None:
        workers = 1 if len(jobs) * config.instances < _INLINE_LIMIT else _default_workers()
    bar = dict(total=len(jobs), desc="drawing kanji", unit="class", disable=not progress)
    if workers <= 1:
        rendered = [_render_class(job) for job in progress_bar(jobs, **bar)]
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            rendered = list(progress_bar(pool.map(_render_class, jobs, chunksize=16), **bar))
    return KanjiData(np.stack(rendered), code_points, sizes)


def load_kanji(
    config: KanjiConfig = KanjiConfig(),
    cache_dir: os.PathLike | None = None,
    workers: int | None = None,
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
    start = time.perf_counter()
    data = generate_kanji(config, workers=workers, progress=progress)
    data.manifest = save_verified_array(
        path, data.pixels, dict(identity, code_points=data.code_points, split_sizes=list(data.split_sizes))
    )
    # Generation takes minutes for the full set: say once what was made, how long it took and where
    # it is, so that a run that regenerates (new settings or data seed) is not a silent wait.
    print(
        f"kanji: generated {len(data.code_points):,} classes x {config.instances} images at "
        f"{config.image_size} px (data seed {config.seed}) in {time.perf_counter() - start:.0f} s; "
        f"cached in {path}",
        file=sys.stderr,
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
