from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="mtl-plugin",
    version="0.1.0",
    description=(
        "Meta-Transfer Learning (Sun et al., CVPR 2019) with the hard-task meta-batch, "
        "as a plugin for learn2learn, higher and torch.func"
    ),
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    packages=find_packages(include=["mtl_plugin", "mtl_plugin.*"]),
    install_requires=[
        "torch>=2.0,<3",
        "torchvision>=0.15,<1",
        "learn2learn>=0.2.0,<0.3",
        "higher>=0.2.1,<0.3",
        "click>=8.0,<9",
        "pandas>=1.5,<4",
        "tqdm>=4.60,<5",
        "matplotlib>=3.5,<4",
        # learn2learn needs qpth, whose releases pin numpy<2.
        "numpy>=1.22,<2",
        "pillow>=9,<13",
        # KanjiVG strokes: the embedded default data set is drawn from them.
        "kanjivg>=20250422",
        # pandas' to_markdown, for the bench tables.
        "tabulate>=0.9,<1",
    ],
    extras_require={
        "test": ["pytest>=7,<10"],
    },
    entry_points={"console_scripts": ["mtl=mtl_plugin.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
