"""The rows of ``mtl bench``: a registry of methods and of named config presets, torchvision style.

A row is a :class:`~mtl_plugin.bench.methods.base.FewShotMethod` class with its config
dataclass (:func:`register_method`), or a named preset of a registered row: the same
method, its config changed by a function (:func:`register_preset`). The ablation
rows are presets of ``mtl`` (:mod:`mtl_plugin.bench.methods.ablation`). Registration order
is row order, in the results table as in :data:`METHODS`.

Example::

    from mtl_plugin.bench.methods import build_method, register_method, register_preset

    @register_method("my-probe", config=MyProbeConfig)   # MyProbeConfig has a quick() profile
    class MyProbe(TestTimeMethod):
        ...

    @register_preset("mtl-lr2x", base="mtl", adapts="SS [Θ; θ], 2x lr")
    def mtl_lr2x(config: MTLConfig) -> MTLConfig:
        return replace(config, meta=replace(config.meta, encoder_lr=2 * config.meta.encoder_lr))

    method = build_method("mtl-lr2x", profile="quick")
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from mtl_plugin.bench.methods.base import FewShotMethod

__all__ = ["METHODS", "MethodSpec", "build_method", "list_methods", "method_spec", "register_method", "register_preset"]

Preset = Callable[[Any], Any]


@dataclass(frozen=True)
class MethodSpec:
    """A registered row: how to build it, and what the results table says about it.

    Calling a spec builds the row from a config of its ``config`` class, with the preset
    applied, so that ``METHODS[name][0](config)`` builds every row alike.

    Attributes:
        name: the row's name (``--methods NAME``).
        method: the :class:`FewShotMethod` class that runs it.
        config: its config dataclass; ``config()`` is the ``paper`` profile, ``config.quick()``
            the ``quick`` one.
        preset: for a preset row, the function that turns a config of the base row into
            this row's; ``None`` for a method row.
        adapts: what the outer loop learns, in the paper's notation (the ablation table's column).
        ablation_only: whether the row is left out of the comparison suite.

    Example::

        spec = method_spec("mtl-channel")
        method = spec(MTLConfig.quick())   # an MTL with ss.granularity="channel", named "mtl-channel"
    """

    name: str
    method: type[FewShotMethod]
    config: type
    preset: Preset | None = None
    adapts: str = ""
    ablation_only: bool = False

    @property
    def uses_pretraining(self) -> bool:
        return self.method.uses_pretraining

    @property
    def transductive(self) -> bool:
        return self.method.transductive

    def profile_config(self, profile: str = "paper") -> Any:
        """The config of ``profile`` before the preset: ``paper`` the default config, ``quick``
        ``config.quick()``, ``deep`` ``config.deep()`` where the config class itself defines one
        (not inherited: a subclass's quick settings win over its parent's deep ones), else ``quick()``."""
        if profile == "paper":
            return self.config()
        if profile == "deep" and "deep" in vars(self.config):
            return self.config.deep()
        return self.config.quick()

    def __call__(self, config: Any = None) -> FewShotMethod:
        """The row's method on ``config`` (default: the ``paper`` profile), the preset applied to it.

        A preset row's method takes the row's ``name`` and ``adapts``, so that its
        checkpoints and messages name the row rather than its base.
        """
        config = self.config() if config is None else config
        if self.preset is None:
            return self.method(config)
        method = self.method(self.preset(config))
        method.name, method.adapts = self.name, self.adapts
        return method


_REGISTRY: dict[str, MethodSpec] = {}


def _add(spec: MethodSpec) -> None:
    if spec.name in _REGISTRY:
        raise ValueError(f"a method named {spec.name!r} is registered already; pick another name")
    _REGISTRY[spec.name] = spec


def register_method(name: str, *, config: type, ablation_only: bool = False) -> Callable:
    """Register a :class:`FewShotMethod` class as the row ``name`` of ``mtl bench``.

    Args:
        name: the row's name (``BenchConfig(methods=(name,))``, ``--methods NAME``).
        config: its config dataclass, whose ``quick()`` classmethod gives the ``quick`` profile;
            the class is built as ``method_class(config)``.
        ablation_only: leave the row out of the comparison suite.

    Returns:
        A decorator that registers the class and returns it unchanged; its ``adapts``
        class attribute, if any, fills the ablation table's column.

    Raises:
        ValueError: ``name`` is registered already.

    Example::

        @register_method("my-probe", config=MyProbeConfig)
        class MyProbe(TestTimeMethod):
            name = "my-probe"
            ...
    """

    def register(method_class: type[FewShotMethod]) -> type[FewShotMethod]:
        _add(
            MethodSpec(
                name, method_class, config, adapts=getattr(method_class, "adapts", ""), ablation_only=ablation_only
            )
        )
        return method_class

    return register


def register_preset(name: str, *, base: str, adapts: str = "", ablation_only: bool = False) -> Callable:
    """Register a named config preset of the row ``base`` as the row ``name``.

    The row runs ``base``'s method on ``preset(config)``: a variant is a config, not a
    subclass. Presets of presets compose (the base's preset first).

    Args:
        name: the new row's name.
        base: a registered row, e.g. ``"mtl"``.
        adapts: what its outer loop learns, in the paper's notation (default: the base's).
        ablation_only: leave the row out of the comparison suite.

    Returns:
        A decorator that registers a function ``config -> config`` (a config of ``base``'s
        config class in, the row's out; it must not modify its argument) and returns it unchanged.

    Raises:
        ValueError: ``name`` is registered already, or ``base`` is not registered.

    Example::

        @register_preset("mtl-channel", base="mtl", adapts="SS [Θ; θ], channel", ablation_only=True)
        def mtl_channel(config: MTLConfig) -> MTLConfig:
            return replace(config, ss=replace(config.ss, granularity="channel"))
    """

    def register(preset: Preset) -> Preset:
        parent = method_spec(base)
        if parent.preset is not None:

            def composed(config: Any) -> Any:
                return preset(parent.preset(config))
        else:
            composed = preset
        _add(
            MethodSpec(
                name,
                parent.method,
                parent.config,
                preset=composed,
                adapts=adapts or parent.adapts,
                ablation_only=ablation_only,
            )
        )
        return preset

    return register


def method_spec(name: str) -> MethodSpec:
    """The registered row ``name``.

    Raises:
        ValueError: ``name`` is not registered; the message lists the names that are.

    Example::

        method_spec("mtl-ht").uses_pretraining   # True
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; known: {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def list_methods() -> list[str]:
    """The registered row names, in registration (table) order.

    Example::

        print(list_methods()[:3])   # ['scratch', 'finetune', 'cosine-finetune']
    """
    return list(_REGISTRY)


def build_method(name: str, profile: str = "paper") -> FewShotMethod:
    """A row by its table name, with the ``paper`` (default config) or ``quick`` budget.

    Raises:
        ValueError: ``name`` is not registered.

    Example::

        method = build_method("mtl-channel", profile="quick")
    """
    spec = method_spec(name)
    return spec(spec.profile_config(profile))


class _MethodTable(Mapping):
    """``name -> (builder, config class)`` over the registry, read-only and live.

    The builder is the method class for a method row and its :class:`MethodSpec` for a
    preset row; either is called as ``builder(config)``.
    """

    def __getitem__(self, name: str) -> tuple[Callable[[Any], FewShotMethod], type]:
        spec = _REGISTRY[name]
        return (spec.method if spec.preset is None else spec), spec.config

    def __iter__(self) -> Iterator[str]:
        return iter(_REGISTRY)

    def __len__(self) -> int:
        return len(_REGISTRY)

    def __repr__(self) -> str:
        return f"METHODS({', '.join(_REGISTRY)})"


METHODS: Mapping[str, tuple[Callable[[Any], FewShotMethod], type]] = _MethodTable()
