"""A small parser for SVG path data (the ``d`` attribute), enough for KanjiVG strokes.

Every path becomes a list of cubic Bézier segments, each a ``(4, 2)`` array of
control points in absolute coordinates, so that a stroke can be deformed by
moving its control points and then flattened into a polyline for drawing.

Example::

    from mtl_plugin.data.svg_path import parse_path, flatten
    segments = parse_path("M11,54.25c3.19,0.62,6.25,0.75,9.73,0.5")
    points = flatten(segments, steps=8)   # (9, 2) array
    assert points.shape == (9, 2)
"""

from __future__ import annotations

import re

import numpy as np

__all__ = ["parse_path", "flatten"]

# Numbers may run together ("1.5.5" is 1.5 then .5; "3-2" is 3 then -2).
_TOKEN = re.compile(r"[MmCcSsLlHhVvZzQqTt]|[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")
_ARITY = {"M": 2, "L": 2, "H": 1, "V": 1, "C": 6, "S": 4, "Q": 4, "T": 2, "Z": 0}


def _line(p0: np.ndarray, p1: np.ndarray) -> np.ndarray:
    return np.array([p0, p0 + (p1 - p0) / 3.0, p0 + 2.0 * (p1 - p0) / 3.0, p1])


def _quadratic(p0: np.ndarray, q: np.ndarray, p1: np.ndarray) -> np.ndarray:
    # Degree elevation: a quadratic Bézier is exactly this cubic.
    return np.array([p0, p0 + 2.0 / 3.0 * (q - p0), p1 + 2.0 / 3.0 * (q - p1), p1])


def parse_path(d: str) -> list[np.ndarray]:
    """Parse SVG path data into cubic Bézier segments (absolute ``(4, 2)`` arrays).

    Supports M/m, L/l, H/h, V/v, C/c, S/s, Q/q, T/t and Z/z, implicit repetition
    of a command, and numbers written without separators. Arcs (A/a) are not
    used by KanjiVG and raise a ``ValueError``.

    Example::

        segments = parse_path("M0,0 C1,1 2,1 3,0 s1,-1 2,0 Z")
        assert len(segments) == 3
    """
    tokens = _TOKEN.findall(d)
    leftover = _TOKEN.sub("", d).replace(",", "").split()
    if leftover:
        raise ValueError(f"unsupported SVG path data {leftover[0]!r} in {d[:60]!r}: only M L H V C S Q T Z")
    segments: list[np.ndarray] = []
    current = np.zeros(2)
    start = np.zeros(2)
    last_cubic_control = None
    last_quad_control = None
    command = None
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if token.isalpha():
            command = token
            i += 1
            if command in "Zz":
                if not np.allclose(current, start):
                    segments.append(_line(current, start))
                current = start.copy()
                last_cubic_control = last_quad_control = None
                continue
        elif command is None:
            raise ValueError(f"SVG path data must start with a command, got {token!r} in {d[:60]!r}")
        upper = command.upper()
        arity = _ARITY[upper]
        args = tokens[i : i + arity]
        if len(args) < arity or any(a.isalpha() for a in args):
            raise ValueError(f"SVG path command {command!r} needs {arity} numbers in {d[:60]!r}")
        values = np.array([float(a) for a in args])
        i += arity
        relative = command.islower()
        origin = current if relative else np.zeros(2)
        cubic_control = quad_control = None
        if upper == "M":
            current = origin + values
            start = current.copy()
            # Pairs after a moveto are implicit linetos.
            command = "l" if relative else "L"
        elif upper in "LHV":
            if upper == "H":
                target = np.array([values[0] + (current[0] if relative else 0.0), current[1]])
            elif upper == "V":
                target = np.array([current[0], values[0] + (current[1] if relative else 0.0)])
            else:
                target = origin + values
            segments.append(_line(current, target))
            current = target
        elif upper == "C":
            c1, c2, end = origin + values[0:2], origin + values[2:4], origin + values[4:6]
            segments.append(np.array([current, c1, c2, end]))
            cubic_control, current = c2, end
        elif upper == "S":
            c1 = 2.0 * current - last_cubic_control if last_cubic_control is not None else current.copy()
            c2, end = origin + values[0:2], origin + values[2:4]
            segments.append(np.array([current, c1, c2, end]))
            cubic_control, current = c2, end
        elif upper == "Q":
            q, end = origin + values[0:2], origin + values[2:4]
            segments.append(_quadratic(current, q, end))
            quad_control, current = q, end
        elif upper == "T":
            q = 2.0 * current - last_quad_control if last_quad_control is not None else current.copy()
            end = origin + values[0:2]
            segments.append(_quadratic(current, q, end))
            quad_control, current = q, end
        last_cubic_control, last_quad_control = cubic_control, quad_control
    return segments


def flatten(segments: list[np.ndarray], steps: int = 8) -> np.ndarray:
    """Sample each cubic segment at ``steps`` intervals; return one ``(n, 2)`` polyline.

    Example::

        line = flatten(parse_path("M0,0 L3,0"), steps=3)
        assert line.shape == (4, 2)
    """
    if not segments:
        return np.zeros((0, 2))
    t = np.linspace(0.0, 1.0, steps + 1)[:, None]
    basis = np.stack([(1 - t) ** 3, 3 * (1 - t) ** 2 * t, 3 * (1 - t) * t**2, t**3], axis=1)[..., 0]
    pieces = [basis @ segment for segment in segments]
    # Drop each later segment's first point: it repeats the previous end point.
    return np.concatenate([pieces[0]] + [piece[1:] for piece in pieces[1:]])
