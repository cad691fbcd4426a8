"""What a user meets first: the README's snippets, the package's metadata and where data is cached."""

import os
import re
import runpy
import subprocess
import sys
import zipfile
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


def _stderr_of(code: str, site_dir: Path | None = None) -> str:
    """stderr of ``code`` in a fresh interpreter (gym prints its notice once, at its first import),
    with ``site_dir`` added as a site directory first, as Python adds site-packages at start-up."""
    if site_dir is not None:
        code = f"import site; site.addsitedir({str(site_dir)!r}); {code}"
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": path},
    )
    assert result.returncode == 0, result.stderr
    return result.stderr


@pytest.fixture(scope="module")
def wheel_site(tmp_path_factory) -> Path:
    """A site directory holding the top-level files of the wheel ``pip install .`` installs."""
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    site_dir = out / "site"
    with zipfile.ZipFile(next(out.glob("mtl_plugin-*.whl"))) as wheel:
        top = [name for name in wheel.namelist() if "/" not in name]
        wheel.extractall(site_dir, members=top)
    assert sorted(top) == ["_mtl_plugin_quiet_gym.py", "mtl_plugin_quiet_gym.pth"]
    return site_dir


@pytest.mark.parametrize("first", ["mtl_plugin", "learn2learn"])
def test_an_installed_plugin_keeps_gyms_notice_off_whichever_comes_first(wheel_site, first):
    stderr = _stderr_of(f"import {first}, mtl_plugin, learn2learn, warnings; warnings.warn('still shown')", wheel_site)
    assert "Gym has been unmaintained" not in stderr
    assert "UserWarning: still shown" in stderr


def test_a_program_that_imports_gym_itself_still_gets_its_notice(wheel_site):
    assert "Gym has been unmaintained" in _stderr_of("import gym, learn2learn, mtl_plugin", wheel_site)


@pytest.mark.parametrize("first, notice", [("mtl_plugin", False), ("learn2learn", True)])
def test_from_a_source_checkout_the_plugin_keeps_gyms_notice_off_when_it_comes_first(first, notice):
    # Without the wheel's .pth nothing of the plugin runs before learn2learn: the README says so.
    stderr = _stderr_of(f"import {first}, mtl_plugin, learn2learn, warnings; warnings.warn('still shown')")
    assert ("Gym has been unmaintained" in stderr) == notice
    assert "UserWarning: still shown" in stderr
