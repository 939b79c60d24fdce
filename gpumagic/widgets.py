"""Deprecated name of :mod:`gpumagic.render.widgets` (figures, PNGs and ipywidgets for results).

Every renderer now lives in :mod:`gpumagic.render`; this module keeps ``import gpumagic.widgets``
working for one release, with a DeprecationWarning.
"""

import warnings

from gpumagic.render.widgets import *  # noqa: F403  (the old module's names, unchanged)
from gpumagic.render.widgets import __all__ as __all__

warnings.warn("gpumagic.widgets moved to gpumagic.render.widgets; the old name goes in the next release",
              DeprecationWarning, stacklevel=2)
