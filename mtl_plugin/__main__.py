"""``python -m mtl_plugin`` runs the ``mtl`` command line, so that ``torchrun`` can launch it.

Example::

    torchrun --nproc_per_node=2 -m mtl_plugin meta-train --pretrained runs/pre/best.pt --out runs/meta
"""

from mtl_plugin.cli import main

if __name__ == "__main__":
    main(prog_name="mtl")
