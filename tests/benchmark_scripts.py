"""Load a script under ``benchmarks/`` as a module, for tests that call its functions."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def loaded_script(filename: str) -> Iterator[ModuleType]:
    """Yield ``benchmarks/<filename>`` imported as a module, then forget it (for a fixture's ``yield from``)."""
    spec = importlib.util.spec_from_file_location(f"benchmark_{Path(filename).stem}", BENCHMARKS / filename)
    module = importlib.util.module_from_spec(spec)
    # dataclasses look their module up by name while the script is executed.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]
