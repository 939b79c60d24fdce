"""What ``oom.parse`` and ``oom.advise`` accept besides the usual, and advice for an error about
another device than the one measured (issue 19, section 5)."""

import builtins
import math

import pytest
import torch
from IPython.utils.capture import capture_output

import gpumagic.oom as oom

CUDA = ("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 8.00 GiB of which "
        "1.00 GiB is free. Of the allocated memory 6.00 GiB is allocated by PyTorch, and 0 bytes is reserved "
        "by PyTorch but unallocated.")


def test_parse_of_none_is_not_an_oom():
    assert oom.parse(None) is None


def test_parse_reads_bytes_as_text():
    info = oom.parse(CUDA.encode())
    assert info is not None
    assert info.tried_to_allocate == 2 * 2**30


def test_parse_of_another_type_names_what_is_allowed():
    with pytest.raises(TypeError, match="an exception, a str or bytes, got int"):
        oom.parse(42)


ExceptionGroup = getattr(builtins, "ExceptionGroup", None)
BaseExceptionGroup = getattr(builtins, "BaseExceptionGroup", None)
groups = pytest.mark.skipif(ExceptionGroup is None, reason="exception groups are Python 3.11+")


@groups
def test_an_exception_group_holding_an_oom_parses_to_it():
    group = ExceptionGroup("workers failed", [ValueError("bad"), torch.OutOfMemoryError(CUDA)])
    info = oom.parse(group)
    assert info is not None
    assert info.free == 2**30


@groups
def test_a_nested_exception_group_is_read_too():
    group = BaseExceptionGroup("outer", [ExceptionGroup("inner", [RuntimeError(CUDA)])])
    assert oom.parse(group) is not None


def test_advise_takes_the_error_text():
    advice = oom.advise(CUDA, oom.AdviceContext(batch_size=64))
    assert advice.info is not None
    assert advice.info.tried_to_allocate == 2 * 2**30
    assert advice.suggestions


def test_advise_takes_the_exception():
    info = oom.advise(torch.OutOfMemoryError(CUDA)).info
    assert info is not None
    assert info.exception_type is not None
    assert info.tried_to_allocate == 2 * 2**30


def test_advise_of_another_type_names_what_is_allowed():
    with pytest.raises(TypeError, match="OOMInfo, an exception or its text, got list"):
        oom.advise([CUDA])


def test_a_nan_figure_in_the_context_is_unknown():
    ctx = oom.AdviceContext(batch_size=64, bytes_per_sample=math.nan, intercept_bytes=1e6)
    assert ctx.bytes_per_sample is None
    advice = oom.advise(oom.parse(CUDA), ctx)
    assert advice.suggestions


def test_an_infinite_figure_in_the_context_is_unknown():
    assert oom.AdviceContext(intercept_bytes=math.inf).intercept_bytes is None


def test_a_cuda_oom_raised_in_a_cell_measured_on_the_host_is_not_advised_with_the_host_budget(ip, clean_ns):
    ip.user_ns.update(msg=CUDA, batch_size=64)
    with capture_output():
        r = ip.run_cell("%%gpumem -d cpu --budget 3GiB -q\nn = batch_size\nraise torch.OutOfMemoryError(msg)\n")
    text = r.error_in_exec.advice.text()
    assert "3.00 GiB" not in text
    assert "3GiB" not in text  # not measured again on the host
    assert "at most 53" in text  # 95% of the message's 7 GiB usable, scaled from 64
