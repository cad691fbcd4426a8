"""What :class:`~mtl_plugin.ss.SSAdapter` is built with (:class:`SSConfig`) and the folder it is saved to.

An adapter saved with :meth:`~mtl_plugin.ss.SSAdapter.save_pretrained` is a folder of two
files: ``ss_config.json`` (the :class:`SSConfig`) and ``ss_weights.pt`` (Φ1 and Φ2 by layer
name, tensors only, read back with ``torch.load(..., weights_only=True)`` so that nothing in
the file can run code). Together they rebuild the adapter on any backbone of the same
architecture, as PEFT's ``save_pretrained`` / ``from_pretrained`` do.

Example::

    config = SSConfig(granularity="channel", layers=("layer4",))
    adapter = SSAdapter.from_config(torchvision.models.resnet18(), config)
    adapter.save_pretrained("ss-resnet18")
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch

from mtl_plugin.errors import DataError, MissingDataError
from mtl_plugin.ss.layers import GRANULARITIES
from mtl_plugin.utils.io import atomic_save, atomic_write_text, read_checkpoint

__all__ = [
    "BN_MODES",
    "CONFIG_FILE",
    "GRANULARITIES",
    "SSConfig",
    "WEIGHTS_FILE",
    "read_pretrained",
    "write_pretrained",
]

BN_MODES = ("frozen", "train")
CONFIG_FILE = "ss_config.json"
WEIGHTS_FILE = "ss_weights.pt"
# Written even at their defaults: every record of an SS encoder has had them.
_ALWAYS_WRITTEN = ("granularity", "bn")


@dataclass
class SSConfig:
    """The construction options of :class:`~mtl_plugin.ss.SSAdapter`, as saved beside its weights.

    The defaults are :class:`~mtl_plugin.ss.SSAdapter`'s; :meth:`paper` is the paper's SS
    (a scale per kernel on every conv), which the bench's MTL rows and ``mtl meta-train`` use.

    Args:
        granularity: of the convs' scales, one of :data:`GRANULARITIES`: ``"auto"`` (per
            kernel on convs with a k x k > 1 kernel, per output channel on 1x1 convs),
            ``"kernel"`` (the paper's, on every conv) or ``"channel"``.
        bn: one of :data:`BN_MODES`: ``"frozen"`` keeps BatchNorm in eval mode, ``"train"``
            lets it use batch statistics in training mode.
        layers: module names (as ``backbone.named_modules()`` spells them; a name selects
            every layer under it) whose layers get Φ; ``None``: every conv, linear and
            attention layer. A name is stored as a one-name tuple.
        output_scaling: with ``"channel"`` granularity, scale each conv's output instead of
            its weight (the same function).

    Raises:
        ValueError: an unknown granularity or bn mode, ``output_scaling`` without
            ``"channel"`` granularity, or ``layers`` that are not module names.

    Example::

        config = SSConfig(granularity="channel", output_scaling=True)
        adapter = SSAdapter.from_config(backbone, config)
    """

    granularity: str = "auto"
    bn: str = "frozen"
    layers: tuple[str, ...] | None = None
    output_scaling: bool = False

    def __post_init__(self):
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"unknown granularity {self.granularity!r}; valid: {', '.join(GRANULARITIES)}")
        if self.output_scaling and self.granularity != "channel":
            raise ValueError(
                "output_scaling=True needs granularity='channel': a scale per kernel mixes input "
                "channels, so it cannot move to the conv's output"
            )
        if self.bn not in BN_MODES:
            raise ValueError(f"unknown bn mode {self.bn!r}; valid: {', '.join(BN_MODES)}")
        if isinstance(self.layers, str):
            self.layers = (self.layers,)
        elif self.layers is not None:
            if not isinstance(self.layers, Sequence) or not all(isinstance(name, str) for name in self.layers):
                raise ValueError(
                    f"layers={self.layers!r}: give module names as named_modules() spells them "
                    f"(a predicate selects layers in SSAdapter(layers=...), not in a config)"
                )
            self.layers = tuple(self.layers)

    @classmethod
    def paper(cls) -> SSConfig:
        """The paper's SS [Θ; θ]: a scale per kernel on every conv, BatchNorm frozen.

        Example::

            SSConfig.paper().granularity   # "kernel"
        """
        return cls(granularity="kernel")

    def to_dict(self) -> dict[str, Any]:
        """The config as JSON-ready values; ``layers`` and ``output_scaling`` only where set.

        Leaving them out at their defaults keeps the record of a plain encoder as it was written
        before they were recorded, so that older runs resume and read as the same model.

        Example::

            SSConfig(granularity="channel").to_dict()   # {"granularity": "channel", "bn": "frozen"}
        """
        defaults = SSConfig()
        return {
            name: list(value) if isinstance(value, tuple) else value
            for name, value in asdict(self).items()
            if name in _ALWAYS_WRITTEN or value != getattr(defaults, name)
        }

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> SSConfig:
        """The config that :meth:`to_dict` wrote; a missing field takes its default.

        Args:
            values: the fields by name.
            source: what they were read from, for the message.

        Raises:
            ValueError: an unknown field, or a value :class:`SSConfig` refuses.

        Example::

            SSConfig.from_dict(json.loads(Path("ss/ss_config.json").read_text()))
        """
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"{source}: unknown SS option {unknown[0]!r}; SSConfig has {', '.join(sorted(names))}")
        return cls(**values)


def write_pretrained(directory: str | Path, config: SSConfig, tensors: dict[str, torch.Tensor]) -> Path:
    """Write ``config`` and ``tensors`` to ``directory`` (:data:`CONFIG_FILE`, :data:`WEIGHTS_FILE`).

    Each file is written atomically: a save that is killed leaves each file whole, old or new.

    Returns:
        ``directory`` as a ``Path``.

    Raises:
        OutputError: a file could not be written.

    Example::

        write_pretrained("ss", adapter.config, adapter.ss_state_dict())
    """
    directory = Path(directory).expanduser()
    atomic_save({name: tensor.detach().cpu() for name, tensor in tensors.items()}, directory / WEIGHTS_FILE)
    atomic_write_text(directory / CONFIG_FILE, json.dumps(config.to_dict(), indent=2) + "\n")
    return directory


def read_pretrained(directory: str | Path) -> tuple[SSConfig, dict[str, torch.Tensor]]:
    """The config and the SS tensors that :func:`write_pretrained` left in ``directory``.

    Raises:
        MissingDataError: ``directory`` or one of its two files is not there.
        DataError: a config that is not JSON or not an :class:`SSConfig`, or weights that a
            safe load refuses, are damaged or hold NaN.

    Example::

        config, tensors = read_pretrained("ss")
    """
    directory = Path(directory).expanduser()
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (directory / name).is_file():
            raise MissingDataError(
                f"{directory}: no {name} there, so it holds no saved SS adapter; "
                f"write one with adapter.save_pretrained({str(directory)!r})"
            )
    path = directory / CONFIG_FILE
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(values, dict):
            raise ValueError(f"it holds a JSON {type(values).__name__}, not an object")
        config = SSConfig.from_dict(values, str(path))
    except ValueError as error:
        raise DataError(
            f"{path}: not the config of an SS adapter ({error}); save the adapter again with save_pretrained"
        ) from error
    tensors = read_checkpoint(directory / WEIGHTS_FILE, "SS weights", require_kind=False)
    return config, tensors
