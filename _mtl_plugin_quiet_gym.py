"""Keeps gym's deprecation notice off stderr when learn2learn imports gym, whatever is imported first.

learn2learn imports gym (for ``learn2learn.gym``; the plugin never uses it), and gym's import prints
a four-line notice read from ``gym_notices.notices``, with no switch to turn it off. gym skips the
notice when that module fails to import. This finder makes it fail, and only while learn2learn is
being imported: a program that imports gym itself still gets the notice, and no warning is touched.

The plugin's wheel installs ``mtl_plugin_quiet_gym.pth`` beside its packages, whose one line
imports this module when Python starts, so the finder is in place before any import of the user's
program; ``import mtl_plugin`` installs it too (a source checkout or an editable install, which
carry no ``.pth``). It imports nothing but ``sys``, to keep every interpreter's start-up as it was.
"""

import sys

_NOTICES = "gym_notices.notices"


class GymNoticeFinder:
    """A ``sys.meta_path`` finder that refuses ``gym_notices.notices`` while learn2learn is importing."""

    def find_spec(self, name: str, path: object = None, target: object = None) -> None:
        """Refuse gym's notices module inside learn2learn's import; leave every other import alone.

        Raises:
            ModuleNotFoundError: for ``gym_notices.notices`` while ``learn2learn`` is in
                ``sys.modules`` (it is, from the first line of its ``__init__``), which gym catches.
        """
        if name == _NOTICES and "learn2learn" in sys.modules:
            raise ModuleNotFoundError(f"{name}: not imported under learn2learn (mtl-plugin)", name=name)
        return None


# A module runs once per interpreter, so the finder goes in once however often it is imported.
sys.meta_path.insert(0, GymNoticeFinder())
