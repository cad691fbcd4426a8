"""What a user meets first: the README's snippets, the package's metadata and where data is cached."""
import os
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

import mtl_plugin
from mtl_plugin.data.cache import data_home

ROOT = Path(__file__).resolve().parents[1]


def test_every_readme_python_snippet_runs_as_written(tmp_path, monkeypatch):
    # The snippets continue one another, as a reader runs them: one script, in a fresh folder.
    blocks = re.findall(r"^```python\n(.*?)^```", (ROOT / "README.md").read_text(), re.S | re.M)
    assert len(blocks) >= 3
    script = tmp_path / "readme.py"
    script.write_text("\n".join(blocks))
    monkeypatch.setenv("MTL_DATA", str(tmp_path / "data"))
    monkeypatch.chdir(tmp_path)
    namespace = runpy.run_path(str(script))
    assert namespace["logits"].shape == (75, 5)
    assert (tmp_path / "ss.pt").is_file()


def test_one_version_a_licence_and_type_information():
    setup = (ROOT / "setup.py").read_text()
    assert "version=VERSION" in setup and re.search(r'version="\d', setup) is None
    assert re.match(r"\d+\.\d+\.\d+$", mtl_plugin.__version__)
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")
    assert "CC BY-SA" in (ROOT / "LICENSE").read_text()
    assert (ROOT / "mtl_plugin" / "py.typed").is_file() and '"py.typed"' in setup
    assert "build-backend" in (ROOT / "pyproject.toml").read_text()


def test_the_cache_follows_mtl_data_then_xdg_cache_home(tmp_path, monkeypatch):
    monkeypatch.delenv("MTL_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert data_home() == tmp_path / "xdg" / "mtl_plugin"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")
    assert data_home() == Path.home() / ".cache" / "mtl_plugin"
    monkeypatch.setenv("MTL_DATA", str(tmp_path / "mine"))
    assert data_home() == tmp_path / "mine"


@pytest.mark.parametrize("first, notice", [("mtl_plugin", False), ("learn2learn", True)])
def test_gyms_notice_is_silenced_when_the_plugin_comes_first_and_other_warnings_still_show(first, notice):
    # A fresh interpreter: gym prints its notice once, at its first import. learn2learn first prints
    # it before the plugin can act: the README says so.
    code = f"import {first}, mtl_plugin, learn2learn, warnings; warnings.warn('still shown')"
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": path})
    assert result.returncode == 0, result.stderr
    assert ("Gym has been unmaintained" in result.stderr) == notice
    assert "UserWarning: still shown" in result.stderr
