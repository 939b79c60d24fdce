"""Reading out-of-memory errors: the corpus of real messages, and the ways text arrives mangled.

Each file in ``tests/oom_corpus/positive`` holds one message copied from a public report, with a
header naming its source and every figure it states, in bytes, worked out from the printed
values (printed value × binary unit, rounded half up). Figures a header does not list must be
read as ``None``. Files in ``tests/oom_corpus/negative`` are real errors that are not out of memory.
"""

from __future__ import annotations

import importlib.util
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Final, get_args

import pytest
import torch

from gpumagic.backends.cpu_exact import simulated_oom_message
from gpumagic.oom import FIGURES, OOMInfo, parse
from gpumagic.oom.parsing import OOMKind
from gpumagic.units import format_size_torch

CORPUS = Path(__file__).resolve().parents[1] / "oom_corpus"
MiB = 2**20
GiB = 2**30


@dataclass(frozen=True)
class Case:
    name: str
    meta: dict[str, str]
    body: str


def _load(path: Path) -> Case:
    head, body = path.read_text(encoding="utf-8").split("# ---\n", 1)
    meta = {}
    for line in head.splitlines():
        key, value = line.removeprefix("# ").split(": ", 1)
        meta[key] = value
    return Case(path.name, meta, body.removesuffix("\n"))


POSITIVE = [_load(p) for p in sorted((CORPUS / "positive").glob("*.txt"))]
NEGATIVE = [_load(p) for p in sorted((CORPUS / "negative").glob("*.txt"))]


def _expected_figures(case: Case) -> dict[str, int]:
    return {name: int(case.meta[name].split()[0]) for name in FIGURES if name in case.meta}


def _expected_processes(case: Case) -> tuple[tuple[int, int], ...]:
    if "processes" not in case.meta:
        return ()
    pairs = (item.split("=") for item in case.meta["processes"].split(", "))
    return tuple((int(pid), int(size)) for pid, size in pairs)


SENTENCE = (
    "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 1.50 GiB. GPU 0 has a total capacity of "
    "23.65 GiB of which 820.44 MiB is free. Process 4242 has 2.00 GiB memory in use. Including non-PyTorch "
    "memory, this process has 20.81 GiB memory in use. Of the allocated memory 19.09 GiB is allocated by "
    "PyTorch, and 1.24 GiB is reserved by PyTorch but unallocated. If reserved but unallocated memory is large "
    "try setting PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid fragmentation.  See documentation "
    "for Memory Management  (https://pytorch.org/docs/stable/notes/cuda.html#environment-variables)"
)
SENTENCE_FIGURES = {
    "tried_to_allocate": 1610612736,
    "total_capacity": 25393994138,
    "free": 860293693,
    "process_in_use": 22344567357,
    "allocated_by_pytorch": 20497731420,
    "reserved_unallocated": 1331439862,
    "reserved_total": 20497731420 + 1331439862,
}


# --- the corpus ---------------------------------------------------------------------------------


def test_corpus_holds_more_than_350_real_messages_and_40_negatives() -> None:
    assert len(POSITIVE) + len(NEGATIVE) > 350
    assert len(NEGATIVE) >= 40


def test_corpus_kinds_are_the_declared_kinds() -> None:
    assert {case.meta["kind"] for case in POSITIVE} <= set(get_args(OOMKind))


@pytest.mark.parametrize("case", POSITIVE + NEGATIVE, ids=lambda c: c.name)
def test_corpus_file_names_its_source(case: Case) -> None:
    assert case.meta["source"].startswith(("https://", "measured here:"))


@pytest.mark.parametrize("case", POSITIVE, ids=lambda c: c.name)
def test_corpus_message_parses_to_its_exact_figures(case: Case) -> None:
    info = parse(case.body)
    assert info is not None
    assert info.figures() == _expected_figures(case)
    assert info.processes == _expected_processes(case)


@pytest.mark.parametrize("case", POSITIVE, ids=lambda c: c.name)
def test_corpus_message_names_its_format_and_device(case: Case) -> None:
    info = parse(case.body)
    assert info is not None
    expected_type = None if case.meta["device_type"] == "none" else case.meta["device_type"]
    expected_index = None if case.meta["device_index"] == "none" else int(case.meta["device_index"])
    assert (info.kind, info.device_type, info.device_index) == (case.meta["kind"], expected_type, expected_index)


@pytest.mark.parametrize("case", [c for c in POSITIVE if "memory" in c.meta], ids=lambda c: c.name)
def test_corpus_message_says_which_memory_ran_out(case: Case) -> None:
    info = parse(case.body)
    assert info is not None
    assert info.memory == case.meta["memory"]


_NAMED: Final = ("pid", "process_name", "max_model_len", "model_len_fits", "prefill_tokens")


@pytest.mark.parametrize("case", [c for c in POSITIVE if set(_NAMED) & set(c.meta)], ids=lambda c: c.name)
def test_corpus_message_names_its_process_and_token_counts(case: Case) -> None:
    info = parse(case.body)
    assert info is not None
    read = {name: getattr(info, name) for name in _NAMED if getattr(info, name) is not None}
    expected = {
        name: case.meta[name] if name == "process_name" else int(case.meta[name])
        for name in _NAMED
        if name in case.meta
    }
    assert read == expected


@pytest.mark.parametrize("case", NEGATIVE, ids=lambda c: c.name)
def test_corpus_negative_is_not_out_of_memory(case: Case) -> None:
    assert parse(case.body) is None


@pytest.mark.parametrize("case", POSITIVE, ids=lambda c: c.name)
def test_corpus_message_parses_the_same_as_a_runtime_error(case: Case) -> None:
    text_info = parse(case.body)
    exc_info = parse(RuntimeError(case.body))
    assert text_info is not None
    assert exc_info is not None
    assert exc_info.figures() == text_info.figures()


# --- sizes ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("printed", "expected"),
    [
        ("20.00 MiB", 20971520),
        ("1.50 GiB", 1610612736),
        ("512 bytes", 512),
        ("1024.00 KiB", 1048576),
        ("1.71 GiB", 1836098519),  # 1836098519.04, rounded down
        ("1.03 KiB", 1055),  # 1054.72, rounded up
        ("0 bytes", 0),
    ],
)
def test_printed_size_converts_to_value_times_binary_unit(printed: str, expected: int) -> None:
    info = parse(f"CUDA out of memory. Tried to allocate {printed}. GPU 0 has a total capacity of 8.00 GiB")
    assert info is not None
    assert info.tried_to_allocate == expected


def test_mps_gb_means_gib() -> None:
    info = parse(
        "MPS backend out of memory (MPS allocated: 18.09 GB, other allocations: 7.57 MB, max allowed: 18.13 GB). "
        "Tried to allocate 256 bytes on private pool. Use PYTORCH_MPS_HIGH_WATERMARK_RATIO=0.0 to disable upper "
        "limit for memory allocations (may cause system failure)."
    )
    assert info is not None
    assert (info.mps_allocated, info.other_allocations, info.max_allowed, info.tried_to_allocate) == (
        19423989596,
        7937720,
        19466939269,
        256,
    )


@pytest.mark.parametrize("limit", ["17179869184.00 GiB", "16.00 EiB"])
def test_size_max_limit_means_unknown(limit: str) -> None:
    info = parse(
        "Allocation on device 0 would exceed allowed memory. (out of memory)\nCurrently allocated     : 1.00 GiB\n"
        "Requested               : 2.00 GiB\nDevice limit            : 8.00 GiB\nFree (according to CUDA): 0 bytes\n"
        f"PyTorch limit (set by user-supplied memory fraction)\n                        : {limit}"
    )
    assert info is not None
    assert info.max_allowed is None
    assert info.total_capacity == 8 * GiB


def test_a_real_memory_fraction_limit_is_read() -> None:
    info = parse(
        "Allocation on device 1 would exceed allowed memory. (out of memory)\nCurrently allocated     : 3.90 GiB\n"
        "Requested               : 200.00 MiB\nDevice limit            : 15.77 GiB\nFree (according to CUDA): 11.6"
        "0 GiB\nPyTorch limit (set by user-supplied memory fraction)\n                        : 4.00 GiB"
    )
    assert info is not None
    assert (info.device_index, info.max_allowed) == (1, 4 * GiB)


# --- gpumagic's own simulated message ------------------------------------------------------------


def test_simulated_message_is_a_cpu_device() -> None:
    info = parse(simulated_oom_message(20 * MiB, 60 * MiB, 64 * MiB))
    assert info is not None
    assert (info.simulated, info.device_type, info.kind) == (True, "cpu", "cuda_sentence")
    assert info.figures() == {
        "tried_to_allocate": 20 * MiB,
        "total_capacity": 64 * MiB,
        "free": 4 * MiB,
        "process_in_use": 60 * MiB,
        "allocated_by_pytorch": 60 * MiB,
        "reserved_unallocated": 0,
        "reserved_total": 60 * MiB,
    }


@pytest.mark.parametrize(("requested", "allocated", "budget"), [(1, 1000, 1025), (123457, 7654321, 7700000)])
def test_simulated_message_reads_back_what_it_printed(requested: int, allocated: int, budget: int) -> None:
    info = parse(simulated_oom_message(requested, allocated, budget))
    assert info is not None
    for value, read in ((requested, info.tried_to_allocate), (allocated, info.allocated_by_pytorch)):
        printed = format_size_torch(value)
        assert read is not None
        assert format_size_torch(read) == printed


# --- text as it arrives: wrapped, indented, embedded, cut short -----------------------------------


@pytest.mark.parametrize("width", [80, 61, 37])
def test_terminal_hard_wrap_mid_word_and_mid_number_reads_the_same(width: int) -> None:
    wrapped = "\n".join(SENTENCE[i : i + width] for i in range(0, len(SENTENCE), width))
    info = parse(wrapped)
    assert info is not None
    assert info.figures() == SENTENCE_FIGURES


OOM_KILL = (
    "[2059991.491542] Out of memory: Killed process 25315 (python3) total-vm:53312244kB, anon-rss:31451456kB, "
    "file-rss:74816kB, shmem-rss:12296kB, UID:0 pgtables:69068kB oom_score_adj:0\n"
    "[2059992.056260] oom_reaper: reaped process 25315 (python3), now anon-rss:0kB, file-rss:74732kB, shmem-rss:12296kB"
)


@pytest.mark.parametrize("width", [80, 61, 37])
def test_oom_killer_lines_hard_wrapped_at_a_terminal_width_read_the_same(width: int) -> None:
    wrapped = "\n".join(line[i : i + width] for line in OOM_KILL.splitlines() for i in range(0, len(line), width))
    info = parse(wrapped)
    assert info is not None
    assert (info.pid, info.process_name, info.process_in_use) == (25315, "python3", (31451456 + 74816 + 12296) * 1024)


def test_word_wrap_with_indent_reads_the_same() -> None:
    wrapped = textwrap.indent(textwrap.fill(SENTENCE, width=72), "    ")
    info = parse(wrapped)
    assert info is not None
    assert info.figures() == SENTENCE_FIGURES
    assert info.processes == ((4242, 2 * GiB),)


def test_message_at_the_end_of_a_traceback_is_found() -> None:
    traceback = (
        "Traceback (most recent call last):\n"
        '  File "/tmp/ipykernel_1/123.py", line 4, in <module>\n'
        "    out = model(x)  # keep memory low: free cached blocks first\n"
        '  File "/usr/lib/python3.11/site-packages/torch/nn/modules/module.py", line 1751, in _call_impl\n'
        "    return forward_call(*args, **kwargs)\n" + SENTENCE + "\n"
    )
    info = parse(traceback)
    assert info is not None
    assert info.figures() == SENTENCE_FIGURES


@pytest.mark.parametrize(
    ("cut_after", "present"),
    [
        ("Tried to allocate 1.50 GiB.", {"tried_to_allocate"}),
        ("of which 820.44 MiB is free.", {"tried_to_allocate", "total_capacity", "free"}),
        ("this process has 20.81 GiB memory", {"tried_to_allocate", "total_capacity", "free", "process_in_use"}),
    ],
)
def test_message_cut_short_returns_what_is_there(cut_after: str, present: set[str]) -> None:
    cut = SENTENCE[: SENTENCE.index(cut_after) + len(cut_after)]
    info = parse(cut)
    assert info is not None
    assert info.figures() == {k: v for k, v in SENTENCE_FIGURES.items() if k in present}


def test_message_cut_mid_number_drops_only_that_figure() -> None:
    info = parse(SENTENCE[: SENTENCE.index("820.44") + 3])
    assert info is not None
    assert info.figures() == {"tried_to_allocate": 1610612736, "total_capacity": 25393994138}


OLD = (
    "RuntimeError: CUDA out of memory. Tried to allocate 20.00 MiB (GPU 0; 7.79 GiB total capacity; 6.64 GiB "
    "already allocated; 21.00 MiB free; 150.86 MiB cached)"
)
OLD_FIGURES = {
    "tried_to_allocate": 20971520,
    "total_capacity": 8364448809,
    "allocated_by_pytorch": 7129645711,
    "free": 22020096,
    "reserved_unallocated": 158188175,
    "reserved_total": 7129645711 + 158188175,
}


@pytest.mark.parametrize(
    ("message", "cut_before", "kind", "index", "figures"),
    [
        (SENTENCE, "Tried to allocate", "cuda_sentence", 0, SENTENCE_FIGURES),
        (
            SENTENCE,
            "GPU 0 has a total",
            "cuda_sentence",
            0,
            {k: v for k, v in SENTENCE_FIGURES.items() if k != "tried_to_allocate"},
        ),
        (OLD, "Tried to allocate", "cuda_caching_allocator", 0, OLD_FIGURES),
        (
            OLD,
            "6.64 GiB already",
            "cuda_caching_allocator",
            None,
            {k: v for k, v in OLD_FIGURES.items() if k not in ("tried_to_allocate", "total_capacity")},
        ),
    ],
    ids=["sentence-at-request", "sentence-at-capacity", "old-at-request", "old-inside-parentheses"],
)
def test_message_cut_before_its_head_reads_what_follows_the_cut(
    message: str, cut_before: str, kind: str, index: int | None, figures: dict[str, int]
) -> None:
    info = parse(message[message.index(cut_before) :])
    assert info is not None
    assert (info.kind, info.device_type, info.device_index) == (kind, "cuda", index)
    assert info.figures() == figures


@pytest.mark.parametrize("message", [SENTENCE, OLD], ids=["sentence", "old"])
def test_message_with_its_head_is_one_message_not_its_fragments(message: str) -> None:
    info = parse(message)
    assert info is not None
    assert info.message.startswith(message.split(" Tried")[0])


def test_underflowed_figure_is_kept_as_printed() -> None:
    # PyTorch computes "reserved but unallocated" as an unsigned difference: when it underflows
    # the message prints 16.00 EiB. The figure is what the message says; only a limit printed
    # as SIZE_MAX means "no limit".
    info = parse(
        SENTENCE.replace(
            "1.24 GiB is reserved by PyTorch but unallocated", "16.00 EiB is reserved by PyTorch but unallocated"
        )
    )
    assert info is not None
    assert info.reserved_unallocated == 2**64


def test_old_format_reads_figures_only_inside_its_parentheses() -> None:
    info = parse(
        "RuntimeError: XPU out of memory. Tried to allocate 1.71 GiB (GPU 0; 15.56 GiB total capacity; 0 bytes "
        "already allocated; 0 bytes reserved in total by PyTorch)\nxpu-smi: 2.00 GiB free"
    )
    assert info is not None
    assert info.free is None


def test_last_message_in_a_log_wins() -> None:
    first = "RuntimeError: CUDA out of memory. Tried to allocate 2.00 MiB. GPU 0 has a total capacity of 8.00 GiB"
    info = parse(first + "\nretrying with a smaller batch\n" + SENTENCE)
    assert info is not None
    assert info.tried_to_allocate == 1610612736


def test_message_field_holds_the_error_not_what_follows() -> None:
    info = parse(SENTENCE + "\n\nDuring handling of the above exception, another exception occurred:")
    assert info is not None
    assert info.message.startswith("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 1.50 GiB.")
    assert info.message.endswith("is reserved by PyTorch but unallocated.")


def test_except_clause_naming_the_class_is_not_an_oom() -> None:
    traceback = (
        "Traceback (most recent call last):\n"
        '  File "train.py", line 12, in <module>\n'
        "    except torch.cuda.OutOfMemoryError:\n"
        "RuntimeError: mat1 and mat2 shapes cannot be multiplied (135168x32 and 20x2048)"
    )
    assert parse(traceback) is None


def test_traceback_ending_in_bare_memory_error_is_host_oom() -> None:
    info = parse('Traceback (most recent call last):\n  File "a.py", line 3, in <module>\n    x = [0] * n\nMemoryError')
    assert info is not None
    assert (info.kind, info.device_type) == ("python_memory_error", "cpu")


def test_oom_class_line_with_unknown_wording_is_still_an_oom() -> None:
    info = parse("torch.OutOfMemoryError: PrivateUse1 ran out of memory while allocating a buffer")
    assert info is not None
    assert info.kind == "out_of_memory_error"
    assert info.figures() == {}


# --- exceptions ----------------------------------------------------------------------------------


def test_torch_out_of_memory_error_names_its_class() -> None:
    info = parse(torch.OutOfMemoryError(SENTENCE.removeprefix("torch.OutOfMemoryError: ")))
    assert info is not None
    assert info.exception_type == "torch.OutOfMemoryError"
    assert info.figures() == SENTENCE_FIGURES


def test_out_of_memory_error_with_unknown_text_is_an_oom() -> None:
    info = parse(torch.OutOfMemoryError("allocator refused"))
    assert info is not None
    assert (info.kind, info.exception_type) == ("out_of_memory_error", "torch.OutOfMemoryError")


def test_accelerator_error_out_of_memory_is_a_cuda_error() -> None:
    exc = torch.AcceleratorError("CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported")
    info = parse(exc)
    assert info is not None
    assert (info.kind, info.device_type, info.exception_type) == ("cuda_error", "cuda", "torch.AcceleratorError")


def test_accelerator_error_that_is_not_memory_is_none() -> None:
    assert parse(torch.AcceleratorError("CUDA error: an illegal memory access was encountered")) is None


def test_runtime_error_old_format_is_read() -> None:
    exc = RuntimeError(
        "CUDA out of memory. Tried to allocate 20.00 MiB (GPU 0; 7.79 GiB total capacity; 6.64 GiB already "
        "allocated; 21.00 MiB free; 150.86 MiB cached)"
    )
    info = parse(exc)
    assert info is not None
    assert (info.exception_type, info.tried_to_allocate, info.reserved_unallocated) == (
        "RuntimeError",
        20971520,
        158188175,
    )


def test_bare_memory_error_is_host_oom() -> None:
    info = parse(MemoryError())
    assert info is not None
    assert (info.kind, info.device_type, info.exception_type) == ("python_memory_error", "cpu", "MemoryError")


def test_numpy_memory_error_counts_shape_times_itemsize() -> None:
    np = pytest.importorskip("numpy")
    with pytest.raises(MemoryError) as caught:
        np.empty((2**20, 2**20, 64))  # 512 TiB: more than any address space
    info = parse(caught.value)
    assert info is not None
    assert (info.kind, info.tried_to_allocate) == ("numpy", 2**46 * 8)


def test_cause_chain_is_walked() -> None:
    oom = torch.OutOfMemoryError(SENTENCE.removeprefix("torch.OutOfMemoryError: "))
    wrapper = RuntimeError("generation failed")
    wrapper.__cause__ = oom
    info = parse(wrapper)
    assert info is not None
    assert info.figures() == SENTENCE_FIGURES


def test_context_chain_is_walked() -> None:
    oom = torch.OutOfMemoryError(SENTENCE.removeprefix("torch.OutOfMemoryError: "))
    later = ValueError("cleanup failed")
    later.__context__ = oom
    info = parse(later)
    assert info is not None
    assert info.exception_type == "torch.OutOfMemoryError"


def test_self_referencing_chain_terminates() -> None:
    exc = RuntimeError("CUDA error: device-side assert triggered")
    exc.__context__ = exc
    assert parse(exc) is None


def test_unrelated_exception_is_none() -> None:
    assert parse(ValueError("shapes (3,) and (4,) not aligned")) is None


def test_non_text_argument_is_refused() -> None:
    with pytest.raises(TypeError, match="got int"):
        parse(42)  # type: ignore[arg-type]


# --- the result object ---------------------------------------------------------------------------


def test_oom_info_is_frozen() -> None:
    info = parse(SENTENCE)
    assert info is not None
    with pytest.raises(AttributeError):
        info.free = 0  # type: ignore[misc]


def test_summary_is_one_line_with_the_figures() -> None:
    info = parse(SENTENCE)
    assert isinstance(info, OOMInfo)
    assert info.summary() == "Out of memory on cuda:0: tried to allocate 1.50 GiB with 820.44 MiB free of 23.65 GiB."


def test_device_joins_type_and_index() -> None:
    info = parse(SENTENCE)
    assert info is not None
    assert info.device == "cuda:0"


# --- linear time ---------------------------------------------------------------------------------
# The shell parses every RuntimeError: a text made of one fragment repeated (a format's opening, a
# unit, a bracket, a digit run, blank lines) must cost time in proportion to its length. The
# fragments and messages are bench/parse_time.py's (which reports the absolute time of 1 MB).

_BENCH = Path(__file__).resolve().parents[2] / "bench"
_spec = importlib.util.spec_from_file_location("parse_time", _BENCH / "parse_time.py")
assert _spec is not None
assert _spec.loader is not None
parse_time = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(parse_time)
TIME_CASES = parse_time.cases()


def _case_id(case: tuple[str, str, str]) -> str:
    family, fragment, message = case
    return f"{family}-{fragment[:24]!r}-{message}"


@pytest.mark.parametrize("case", TIME_CASES, ids=_case_id)
def test_parse_time_grows_linearly_with_a_repeated_fragment(case: tuple[str, str, str]) -> None:
    _family, fragment, name = case
    message = parse_time.MESSAGES[name]
    # CPU time, minimum of repeats: other processes on a shared machine do not count. Ten times
    # the text takes about ten times as long when linear, a hundred times when quadratic. Alone,
    # an opened bracket never closes; with a message after it, the message must be reached.
    ratios = []
    for tail in ("", message):
        small, _ = parse_time.parse_seconds(parse_time.repeated(fragment, 10_000, tail), 5)
        large, _ = parse_time.parse_seconds(parse_time.repeated(fragment, 100_000, tail), 3)
        ratios.append(round(large / max(small, 1e-4), 1))
    assert max(ratios) < 20, ratios


@pytest.mark.parametrize("case", TIME_CASES, ids=_case_id)
def test_message_after_a_repeated_fragment_is_read(case: tuple[str, str, str]) -> None:
    _family, fragment, name = case
    message = parse_time.MESSAGES[name]
    info, alone = parse(parse_time.repeated(fragment, 100_000, message)), parse(message)
    assert info is not None
    assert alone is not None
    assert (info.kind, info.figures()) == (alone.kind, alone.figures())


# --- XLA's messages with or without their status prefix ------------------------------------------


@pytest.mark.parametrize(
    ("name", "prefix"),
    [
        ("089_xla_tpu_hbm", "XlaRuntimeError: RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. "),
        ("285_jax_tpu_could_not_allocate_hbm0", "`XlaRuntimeError: RESOURCE_EXHAUSTED: "),
        ("283_xla_tpu_allocate_hbm1_old_wording", "(1) Resource exhausted: "),
        ("316_jax_gpu_buffer_assignment_stats", "RESOURCE_EXHAUSTED: "),
        ("162_jax_failed_request_title", "RESOURCE_EXHAUSTED: "),
    ],
)
def test_xla_message_without_its_status_prefix_reads_the_same(name: str, prefix: str) -> None:
    case = next(c for c in POSITIVE if c.name.startswith(name))
    assert prefix in case.body
    info, bare = parse(case.body), parse(case.body.replace(prefix, ""))
    assert info is not None
    assert bare is not None
    assert (bare.kind, bare.figures()) == (info.kind, info.figures())
