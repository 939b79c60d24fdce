"""Ctrl-C at awkward moments and odd cells, in a real IPython shell: whatever gpumagic was doing
when interrupted, the next cell finds the session as it was."""

import importlib

import pytest
from IPython.utils.capture import capture_output

from gpumagic import backends


def test_ctrl_c_while_the_backends_load_leaves_none_loaded_and_the_next_cell_loads_all(ip, clean_ns, monkeypatch):
    saved = list(backends._REGISTRY)
    real_import = importlib.import_module

    def interrupted_after_the_first(name, *args):
        if name == backends._BUILTIN[1]:
            raise KeyboardInterrupt
        return real_import(name, *args)

    backends._REGISTRY.clear()
    try:
        monkeypatch.setattr(importlib, "import_module", interrupted_after_the_first)
        with capture_output():
            r = ip.run_cell("%%gpumem -d cpu -q\ny = 1", store_history=True)
        assert isinstance(r.error_in_exec, KeyboardInterrupt)
        assert backends._REGISTRY == []
        monkeypatch.undo()
        with capture_output():
            r = ip.run_cell("%%gpumem -d cpu -q -o\ny = 1", store_history=True)
        assert r.error_in_exec is None, r.error_in_exec
        assert [b.name for b in backends.registry()] == [real_import(m).BACKEND.name for m in backends._BUILTIN]
    finally:
        backends._REGISTRY[:] = saved
