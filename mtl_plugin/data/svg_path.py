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
    tokens = _tokens(d)
    pen = _Pen()
    command = None
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if token.isalpha():
            command = token
            i += 1
            if command in "Zz":
                pen.close()
                continue
        elif command is None:
            raise ValueError(f"SVG path data must start with a command, got {token!r} in {d[:60]!r}")
        elif command in "Zz":
            # Z takes no numbers: reading none would never move past this one.
            raise ValueError(
                f"SVG path data has a number ({token!r}) after {command!r}, which takes none, in {d[:60]!r}"
            )
        values = _arguments(tokens, i, command, d)
        i += len(values)
        command = pen.draw(command, values)
    return pen.segments


def _tokens(d: str) -> list[str]:
    """The commands and numbers of ``d``, refusing anything else (an arc, a stray letter) up front."""
    leftover = _TOKEN.sub("", d).replace(",", "").split()
    if leftover:
        raise ValueError(f"unsupported SVG path data {leftover[0]!r} in {d[:60]!r}: only M L H V C S Q T Z")
    return _TOKEN.findall(d)


def _arguments(tokens: list[str], i: int, command: str, d: str) -> np.ndarray:
    """The numbers of one use of ``command``, from ``tokens[i]`` on: a command cut short is an error."""
    arity = _ARITY[command.upper()]
    args = tokens[i : i + arity]
    if len(args) < arity or any(a.isalpha() for a in args):
        raise ValueError(f"SVG path command {command!r} needs {arity} numbers in {d[:60]!r}")
    return np.array([float(a) for a in args])


class _Pen:
    """The segments drawn so far and the state the next command reads: where the pen is, where its
    subpath started (for Z), and the last curve's second control point (which S and T reflect)."""

    def __init__(self) -> None:
        self.segments: list[np.ndarray] = []
        self.current = np.zeros(2)
        self.start = np.zeros(2)
        self.cubic_control: np.ndarray | None = None
        self.quad_control: np.ndarray | None = None

    def draw(self, command: str, values: np.ndarray) -> str:
        """Apply one use of ``command`` (not Z) to ``values``; return the command that repeats
        implicitly on further numbers (a lineto after a moveto)."""
        upper, relative = command.upper(), command.islower()
        origin = self.current if relative else np.zeros(2)
        if upper == "M":
            self._move(origin + values)
            return "l" if relative else "L"
        if upper == "H":
            self._line(np.array([values[0] + (self.current[0] if relative else 0.0), self.current[1]]))
        elif upper == "V":
            self._line(np.array([self.current[0], values[0] + (self.current[1] if relative else 0.0)]))
        elif upper == "L":
            self._line(origin + values)
        elif upper == "C":
            self._cubic(origin + values[0:2], origin + values[2:4], origin + values[4:6])
        elif upper == "S":
            self._cubic(self._reflected(self.cubic_control), origin + values[0:2], origin + values[2:4])
        elif upper == "Q":
            self._quadratic(origin + values[0:2], origin + values[2:4])
        elif upper == "T":
            self._quadratic(self._reflected(self.quad_control), origin + values[0:2])
        return command

    def close(self) -> None:
        """Z: a line back to the subpath's start, unless the pen is already there."""
        if not np.allclose(self.current, self.start):
            self.segments.append(_line(self.current, self.start))
        self.current = self.start.copy()
        self.cubic_control = self.quad_control = None

    def _reflected(self, control: np.ndarray | None) -> np.ndarray:
        # A smooth curve's first control point mirrors the previous curve's last one through the
        # pen; after any other command it is the pen itself.
        return 2.0 * self.current - control if control is not None else self.current.copy()

    def _move(self, point: np.ndarray) -> None:
        self.current = point
        self.start = self.current.copy()
        self.cubic_control = self.quad_control = None

    def _line(self, target: np.ndarray) -> None:
        self.segments.append(_line(self.current, target))
        self.current = target
        self.cubic_control = self.quad_control = None

    def _cubic(self, c1: np.ndarray, c2: np.ndarray, end: np.ndarray) -> None:
        self.segments.append(np.array([self.current, c1, c2, end]))
        self.current, self.cubic_control, self.quad_control = end, c2, None

    def _quadratic(self, q: np.ndarray, end: np.ndarray) -> None:
        self.segments.append(_quadratic(self.current, q, end))
        self.current, self.cubic_control, self.quad_control = end, None, q


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
