"""The public surface: what `import gpumagic` promises, and nothing heavy behind it."""

import subprocess
import sys

import pytest

import gpumagic

EXPECTED = {
    "Advice", "AdviceContext", "BatchSearchResult", "DeviceStatus", "Fit", "MemoryBreakdown", "MemoryReport",
    "OOMInfo", "RankRecord", "StepRecord", "Tracker", "Trial", "__version__", "advise", "device_status", "find_batch",
    "format_bytes", "free_memory", "load_ipython_extension", "parse_oom", "parse_size", "track",
    "unload_ipython_extension", "what_if",
}


def test_all_is_the_curated_public_api():
    assert set(gpumagic.__all__) == EXPECTED


def test_every_public_name_resolves():
    for name in gpumagic.__all__:
        assert getattr(gpumagic, name) is not None, name


def test_unknown_attributes_raise_attribute_error():
    with pytest.raises(AttributeError, match="no_such_thing"):
        gpumagic.no_such_thing  # noqa: B018


def test_result_classes_are_frozen():
    import dataclasses

    for cls in (gpumagic.MemoryReport, gpumagic.StepRecord, gpumagic.BatchSearchResult, gpumagic.Trial,
                gpumagic.Fit, gpumagic.MemoryBreakdown, gpumagic.DeviceStatus, gpumagic.RankRecord):
        assert dataclasses.is_dataclass(cls)
        assert cls.__dataclass_params__.frozen, cls


def test_core_modules_never_import_ipython():
    code = (
        "import sys, gpumagic, gpumagic.tracking, gpumagic.batch, gpumagic.search, gpumagic.oom, gpumagic.devices,"
        " gpumagic.distributed;"
        "print(sorted(m for m in ('IPython', 'ipywidgets', 'matplotlib') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
