"""Out-of-memory errors: read every figure the message states, then advise with numbers.

``parse`` turns an error (an exception, or text: a message, a traceback, a log) into an
:class:`OOMInfo` with the figures as ``int`` bytes, or ``None`` when it is not an out-of-memory
error. It reads the wordings of PyTorch 1.0 to 2.x (CUDA, ROCm/HIP, XPU, MPS, CPU; the caching
allocator and the cudaMallocAsync backend), plus JAX/XLA, TensorFlow and numpy allocation
failures, also when wrapped by a terminal, quoted in an issue, or cut short.

``advise`` turns an ``OOMInfo`` and what the notebook knows (:class:`AdviceContext`) into an
:class:`Advice`: ranked suggestions whose numbers are derived from those figures, and a list of
what could not be derived. ``last_advice()`` is the advice last shown after an error (the
exception carries it too, as ``exc.advice``).

    >>> info = parse("CUDA out of memory. Tried to allocate 20.00 MiB (GPU 0; 7.79 GiB total "
    ...              "capacity; 6.64 GiB already allocated; 21.00 MiB free; 150.86 MiB cached)")
    >>> info.tried_to_allocate, info.free
    (20971520, 22020096)

Parsing lives in ``parsing.py`` (formats), advice in ``advice.py`` (rules, with the families
that are not a device allocator's in ``_families.py``), and what the notebook knows in
``context.py`` (pure functions of the namespace and the cell's source, building the
``AdviceContext``). Importing the package and parsing need no torch; ``advise`` imports
``torch.distributed`` to read this process's rank when the context gives none, and
``context.py`` imports torch inside its functions to read the namespace's tensors, loaders and
optimizers. None of them imports IPython.
"""

from __future__ import annotations

from gpumagic.oom.advice import Advice, AdviceContext, Suggestion, advise, last_advice
from gpumagic.oom.parsing import FIGURES, OOMInfo, parse

__all__ = ["FIGURES", "Advice", "AdviceContext", "OOMInfo", "Suggestion", "advise", "last_advice", "parse"]
