"""Leaf helpers that the method, the loops, the bench and the CLI share; they import nothing of
the package but :mod:`mtl_plugin.errors`.

* :mod:`~mtl_plugin.utils.io`: atomic writes with the user's umask, and the low-level safe
  checkpoint reader (``torch.load(weights_only=True)``) under each kind's reader;
* :mod:`~mtl_plugin.utils.progress`: progress bars, plain lines when not on a terminal;
* :mod:`~mtl_plugin.utils.distributed`: ``torch.distributed`` under torchrun (gloo on CPU, nccl on GPU).
"""
