"""Training infrastructure around the method: the loops, their run folders and their files.

* :mod:`~mtl_plugin.training.pretrain`: the paper's first phase, a backbone trained on all
  meta-train classes (``mtl pretrain``).
* :mod:`~mtl_plugin.training.meta_step`: :class:`~mtl_plugin.training.meta_step.MetaTrainer`, the
  outer step (Adam, schedule, divergence checks, all-reduce) that drives a learner;
  :mod:`~mtl_plugin.training.meta_training`: the meta-training loop around it (``mtl meta-train``).
* :mod:`~mtl_plugin.training.run_log`: run folders, resume, checkpoints and metrics files;
  :mod:`~mtl_plugin.training.checkpoints`: a learner rebuilt from its checkpoint.

The leaf helpers these use (atomic I/O, progress bars, torchrun) are in :mod:`mtl_plugin.utils`.
"""
