"""The public surface: what `import gpumagic` promises, and nothing heavy behind it."""


import pytest

import gpumagic

EXPECTED = {
    "Advice", "AdviceContext", "BatchSearchResult", "DeviceStatus", "Fit", "MemoryBreakdown", "MemoryReport",
    "OOMInfo", "RankRecord", "StepRecord", "Tracker", "Trial", "__version__", "advise", "device_status", "find_batch",
    "format_bytes", "free_memory", "load_ipython_extension", "parse_oom", "parse_size", "track",
    "unload_ipython_extension", "batch_sweep", "SweepResult", "SweepRun", "NoiseScale", "what_if", "BadOptions",
    "SearchOptions",
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
                gpumagic.Fit, gpumagic.MemoryBreakdown, gpumagic.DeviceStatus, gpumagic.RankRecord,
                gpumagic.SweepResult, gpumagic.SweepRun, gpumagic.NoiseScale):
        assert dataclasses.is_dataclass(cls)
        assert cls.__dataclass_params__.frozen, cls


def test_the_old_tracking_track_still_works_with_a_deprecation_warning():
    import gpumagic.tracking

    with pytest.warns(DeprecationWarning, match="gpumagic.track"):
        old = gpumagic.tracking.track
    assert old is gpumagic.track


def test_the_old_widgets_module_still_imports_with_a_deprecation_warning():
    import importlib
    import sys

    sys.modules.pop("gpumagic.widgets", None)
    with pytest.warns(DeprecationWarning, match="gpumagic.render.widgets"):
        old = importlib.import_module("gpumagic.widgets")
    from gpumagic.render import widgets

    assert old.search_widget is widgets.search_widget
