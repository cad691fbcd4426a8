import re
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

HOOK = "_mtl_plugin_quiet_gym"

HERE = Path(__file__).parent
# One version source: the package's __version__, read without importing the package (whose
# dependencies are not installed yet when this runs).
VERSION = re.search(r'^__version__ = "([^"]+)"', (HERE / "mtl_plugin" / "__init__.py").read_text(), re.M).group(1)


class BuildWithStartupHook(build_py):
    """Adds ``mtl_plugin_quiet_gym.pth`` beside the packages, so that it lands in site-packages.

    Its one line imports the hook module when Python starts: learn2learn's import of gym then
    prints no deprecation notice, whether a program imports the plugin or learn2learn first.
    """

    PTH = "mtl_plugin_quiet_gym.pth"

    def run(self) -> None:
        super().run()
        Path(self.build_lib, self.PTH).write_text(f"import {HOOK}\n")

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        return [*super().get_outputs(include_bytecode), str(Path(self.build_lib, self.PTH))]


setup(
    name="mtl-plugin",
    version=VERSION,
    description=(
        "Meta-Transfer Learning (Sun et al., CVPR 2019) with the hard-task meta-batch, "
        "as a plugin for learn2learn, higher and torch.func"
    ),
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="MIT",
    license_files=["LICENSE"],
    # learn2learn's qpth pins numpy<2, which has no wheels for Python 3.13.
    python_requires=">=3.10,<3.13",
    packages=find_packages(include=["mtl_plugin", "mtl_plugin.*"]),
    package_data={"mtl_plugin": ["py.typed"]},
    py_modules=[HOOK],
    cmdclass={"build_py": BuildWithStartupHook},
    install_requires=[
        # 2.2: init.kaiming_normal_(generator=) seeds the head without the global generator.
        "torch>=2.2,<3",
        "torchvision>=0.17,<1",
        "learn2learn>=0.2.0,<0.3",
        "higher>=0.2.1,<0.3",
        "click>=8.0,<9",
        "pandas>=1.5,<4",
        "tqdm>=4.60,<5",
        "matplotlib>=3.5,<4",
        # learn2learn needs qpth, whose releases pin numpy<2. Stated here too because without it
        # pip picks pandas 3.1 (numpy>=2) and backtracks into old qpth sdists that no longer build.
        "numpy>=1.22,<2",
        "pillow>=9,<13",
        # KanjiVG strokes: the embedded default data set is drawn from them.
        "kanjivg>=20250422",
        # pandas' to_markdown, for the bench tables.
        "tabulate>=0.9,<1",
    ],
    extras_require={
        # ruff pinned: a newer one may add rules that an unchanged tree fails (make lint).
        "test": ["pytest>=7,<10", "ruff==0.17.6"],
    },
    entry_points={"console_scripts": ["mtl=mtl_plugin.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
