"""Advice for the families beyond a framework's device allocator, judged on real messages.

Host memory is fixed in RAM, a serving engine with its own settings, NCCL with its buffers: the
first suggestion names that knob, and suggestions about the training batch that cannot change the
memory that ran out are not offered. Messages come from ``tests/oom_corpus`` (sources there).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from gpumagic.oom import AdviceContext, OOMInfo, advise, parse

CORPUS = Path(__file__).resolve().parents[1] / "oom_corpus" / "positive"
TRAINING = {"batch_size", "measure", "accumulation", "evaluation", "mixed_precision", "checkpointing", "allocation"}
# What the notebook typically knows when the failing cell trains with a batch.
TRAINING_CONTEXT = AdviceContext(
    batch_size=64, bytes_per_sample=2.0**20, intercept_bytes=2.0**30, measure_code="%find_batch --var bs"
)


def corpus(name: str) -> OOMInfo:
    path = next(CORPUS.glob(f"*_{name}.txt"))
    info = parse(path.read_text(encoding="utf-8").split("# ---\n", 1)[1])
    assert info is not None
    return info


HOST = [
    "oom_killer_dmesg_commas",
    "colab_session_crashed_bold",
    "kaggle_notebook_restarted_title",
    "errno12_fork_dataloader",
    "winerror1455_yolov5_with_progress",
    "pinned_host_jax_dalle_flow",
]


@pytest.mark.parametrize("name", HOST)
def test_host_oom_advises_host_memory_first_even_with_a_batch_in_the_cell(name: str) -> None:
    advice = advise(corpus(name), TRAINING_CONTEXT)
    assert advice.suggestions[0].kind == "host_memory"
    assert advice.headline.startswith("Out of host memory (RAM)")


@pytest.mark.parametrize("name", HOST)
def test_host_oom_offers_no_autocast_or_gpu_process_list(name: str) -> None:
    kinds = {s.kind for s in advise(corpus(name), TRAINING_CONTEXT).suggestions}
    assert not kinds & {"mixed_precision", "checkpointing", "other_processes", "fragmentation"}


def test_oom_killer_advice_names_the_killed_process_and_its_memory() -> None:
    first = advise(corpus("oom_killer_iso_time_perl")).suggestions[0]
    assert "process 1440763 (perl), holding 57.56 GiB" in first.detail
    assert first.code is not None
    assert "free -h" in first.code


def test_host_advice_says_to_load_lazily_and_use_fewer_workers() -> None:
    detail = advise(corpus("errno12_no_space_double_blank")).suggestions[0].detail
    assert "mmap_mode='r'" in detail
    assert "num_workers=0" in detail


def test_paging_file_advice_names_workers_and_the_virtual_memory_setting() -> None:
    first = advise(corpus("os_error_1455_lowercase")).suggestions[0]
    assert "num_workers=0" in first.detail
    assert "Virtual memory" in first.detail


def test_pinned_host_advice_turns_pinning_off() -> None:
    first = advise(corpus("pinned_host_34gib_repeated")).suggestions[0]
    assert "pin_memory=False" in first.detail
    assert "32.00 GiB" in first.detail


def test_tensor_allocation_in_ram_keeps_the_batch_first_when_the_batch_drives_it() -> None:
    info = parse(
        "RuntimeError: [enforce fail at alloc_cpu.cpp:75] err == 0. DefaultCPUAllocator: can't allocate memory: "
        "you tried to allocate 1178729664 bytes. Error code 12 (Cannot allocate memory)"
    )
    ctx = AdviceContext(batch_size=64, batch_dependent=True, measure_code="%find_batch --var bs")
    kinds = [s.kind for s in advise(info, ctx).suggestions]
    assert kinds[0] in ("measure", "batch_size")
    assert "host_memory" in kinds


def test_vllm_startup_advice_lowers_utilization_to_what_is_free() -> None:
    info = corpus("vllm_free_memory_startup_cuda1")  # 19.77 of 22.05 GiB free, 0.9 asked
    first = advise(info, TRAINING_CONTEXT).suggestions[0]
    assert first.title == "Lower gpu_memory_utilization to 0.89"
    assert first.code is not None
    assert first.code.startswith("gpu_memory_utilization=0.89")
    assert info.free is not None
    assert info.total_capacity is not None
    assert 0.89 * info.total_capacity <= info.free  # followed, the reservation fits


@pytest.mark.parametrize(
    "name",
    ["vllm_free_memory_startup_cuda1", "vllm_kv_cache_needed_tpu", "vllm_max_seq_len_colab", "tgi_warmup_vicuna_1024"],
)
def test_serving_engine_advice_has_no_training_batch_suggestion(name: str) -> None:
    kinds = {s.kind for s in advise(corpus(name), TRAINING_CONTEXT).suggestions}
    assert "serving" in kinds
    assert not kinds & TRAINING


def test_vllm_startup_advice_keeps_a_margin_when_the_free_share_is_a_round_number() -> None:
    info = parse(
        "ValueError: Free memory on device cuda:0 (8.90/10.00 GiB) on startup is less than desired GPU memory "
        "utilization (0.9, 9.00 GiB)."
    )
    assert advise(info).suggestions[0].title == "Lower gpu_memory_utilization to 0.88"


def test_serving_engine_advice_states_no_batch_size_and_no_batch_unknowns() -> None:
    advice = advise(corpus("vllm_no_cache_blocks_then_user_code"), TRAINING_CONTEXT)
    assert advice.fits_batch_size is None
    assert advice.unknown == ()


def test_vllm_kv_cache_advice_sets_max_model_len_to_what_fits() -> None:
    first = advise(corpus("vllm_kv_cache_needed_tpu")).suggestions[0]
    assert first.title == "Set max_model_len to 5632 (now 131072)"
    assert first.code is not None
    assert first.code.startswith("max_model_len=5632")


def test_vllm_kv_cache_advice_names_the_engine_knobs_when_no_length_fits() -> None:
    advice = advise(corpus("vllm_kv_cache_needed_wrapped_w100"))  # cut before the length that fits
    detail = advice.suggestions[0].detail
    for knob in ("gpu_memory_utilization", "max_num_seqs", "kv_cache_dtype", "quantised"):
        assert knob in detail


def test_tgi_warmup_advice_halves_the_prefill_tokens() -> None:
    first = advise(corpus("tgi_warmup_runtime_error_then_log")).suggestions[0]
    assert first.code == "--max-batch-prefill-tokens 2048 --max-input-tokens 2047 --max-total-tokens 2048"


def test_model_server_ram_check_advises_a_smaller_or_quantised_model() -> None:
    advice = advise(corpus("ollama_system_memory_cli"), TRAINING_CONTEXT)
    assert [s.kind for s in advice.suggestions] == ["model_size"]
    assert "short by 151.40 GiB" in advice.suggestions[0].detail


def test_nccl_advice_names_its_device_and_buffer_size() -> None:
    first = advise(corpus("nccl_cuda_calloc_repeated")).suggestions[0]
    assert first.title == "Leave device memory for NCCL's buffers on cuda:0"
    assert first.code == "%env NCCL_BUFFSIZE=1048576"


def test_framework_device_oom_advice_is_unchanged_by_the_families() -> None:
    info = corpus("npu_torchrun_npu3_5gib")
    kinds = [s.kind for s in advise(info, TRAINING_CONTEXT).suggestions]
    assert "host_memory" not in kinds
    assert "serving" not in kinds
    assert kinds[0] in ("batch_size", "measure", "allocation", "holders")


@pytest.mark.parametrize(
    ("name", "family", "memory"),
    [
        ("oom_killer_uwsgi_then_journald", "system", "host"),
        ("pinned_host_shrinking_requests", "library", "host"),
        ("nccl_cuda_failure_rem_allocator", "library", "device"),
        ("vllm_max_seq_len_no_class", "serving", "device"),
        ("ollama_system_memory_phi3", "serving", "host"),
        ("npu_old_vllm_ascend", "framework", "device"),
        ("xla_tpu_reserve_less_reservable", "framework", "device"),
    ],
)
def test_family_and_memory_say_who_reported_which_memory(name: str, family: str, memory: str) -> None:
    info = corpus(name)
    assert (info.family, info.memory) == (family, memory)


# --- in a real shell ------------------------------------------------------------------------------


def test_errno_12_exception_is_read_as_host_memory() -> None:
    info = parse(OSError(12, "Cannot allocate memory"))
    assert info is not None
    assert (info.kind, info.memory, info.exception_type) == ("errno_enomem", "host", "OSError")


def test_tgi_warmup_error_in_a_cell_keeps_its_type_and_gets_the_servers_advice(ip, clean_ns) -> None:
    from IPython.utils.capture import capture_output

    from gpumagic.oom import last_advice

    message = "Not enough memory to handle 4096 prefill tokens. You need to decrease `--max-batch-prefill-tokens`"
    with capture_output():
        result = ip.run_cell(f"raise RuntimeError({message!r})")
    assert type(result.error_in_exec) is RuntimeError
    advice = last_advice()
    assert advice is not None
    assert advice.suggestions[0].code is not None
    assert advice.suggestions[0].code.startswith("--max-batch-prefill-tokens 2048")
    assert not {s.kind for s in advice.suggestions} & TRAINING


def test_a_killed_dataloader_worker_in_a_cell_is_not_translated(ip, clean_ns) -> None:
    from IPython.utils.capture import capture_output

    with capture_output() as cap:
        result = ip.run_cell('raise RuntimeError("DataLoader worker (pid 19597) is killed by signal: Killed.")')
    assert type(result.error_in_exec) is RuntimeError
    assert "Out of" not in cap.stdout + cap.stderr + "".join(str(o.data) for o in cap.outputs)


# --- killed without a stated reason ----------------------------------------------------------------

NEGATIVES = Path(__file__).resolve().parents[1] / "oom_corpus" / "negative"


@pytest.mark.parametrize(
    "name",
    [
        "dataloader_worker_killed_signal",
        "dataloader_worker_killed_chained",
        "kernel_died_restart",
        "kernel_died_lowercase_korean_report",
    ],
)
def test_a_killed_worker_or_dead_kernel_gets_a_hint_to_check_host_memory(name: str) -> None:
    from gpumagic.oom._families import killed_hint

    text = next(NEGATIVES.glob(f"*_{name}.txt")).read_text(encoding="utf-8").split("# ---\n", 1)[1]
    assert parse(text) is None
    hint = killed_hint(text)
    assert hint is not None
    assert "dmesg" in hint


def test_a_worker_ended_by_another_signal_gets_no_memory_hint() -> None:
    from gpumagic.oom._families import killed_hint

    assert killed_hint(RuntimeError("DataLoader worker (pid 23616) is killed by signal: Terminated.")) is None
