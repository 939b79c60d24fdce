"""Options of the magics as a user types them, in a real IPython shell: quotes, negative and huge
values, units, fractional bytes, and values shown back with the digits they have."""

import sys

import pytest
from IPython.core.error import UsageError
from IPython.utils.capture import capture_output

from gpumagic.batchmath import accumulation_plan
from gpumagic.report import BatchSearchResult, MemoryReport
from gpumagic.units import format_percent, parse_size

SETUP = """
torch.manual_seed(0)
X, Y = torch.randn(512, 16), torch.randint(0, 4, (512,))
model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4))
opt = torch.optim.SGD(model.parameters(), 0.1)
batch_size = 8
def train(tag):
    record_tag(tag)
    for i in range(0, 64, batch_size):
        loss = F.cross_entropy(model(X[i:i + batch_size]), Y[i:i + batch_size])
        opt.zero_grad(); loss.backward(); opt.step()
"""
LOOP = """
for i in range(0, 64, batch_size):
    loss = F.cross_entropy(model(X[i:i + batch_size]), Y[i:i + batch_size])
    opt.zero_grad(); loss.backward(); opt.step()
"""


# a module global, out of a search's reach (it puts back every list or deque the namespace reaches)
TAGS: list[str] = []


@pytest.fixture
def shell(ip, clean_ns):
    TAGS.clear()
    ip.push({"record_tag": TAGS.append})
    r = ip.run_cell(SETUP, store_history=True)
    assert r.error_in_exec is None
    return ip


def usage_error(ip, src: str) -> str:
    with capture_output():
        r = ip.run_cell(src, store_history=True)
    assert isinstance(r.error_in_exec, UsageError), r.error_in_exec
    return str(r.error_in_exec)


def test_quotes_around_an_option_value_are_removed_as_a_shell_does(shell):
    with capture_output():
        r = shell.run_cell("%%gpumem -d 'cpu' --budget \"64 MiB\" -q -o\ny = model(X)", store_history=True)
    assert r.error_in_exec is None, r.error_in_exec
    assert isinstance(r.result, MemoryReport)
    assert r.result.device == "cpu"
    assert r.result.capacity_bytes == 64 * 2**20


def test_an_unclosed_quote_is_a_usage_error_naming_the_options(shell):
    assert "could not split options" in usage_error(shell, "%%gpumem -d 'cpu\ny = 1")


@pytest.mark.parametrize("flag", ["--budget -5MiB", "--budget=-5MiB"])
def test_a_negative_budget_names_the_value(shell, flag):
    msg = usage_error(shell, f"%%gpumem -d cpu {flag}\ny = 1")
    assert msg == "--budget must be > 0 bytes, got '-5MiB'"


@pytest.mark.parametrize("value", ["0.5", "1e-3", "1.5B"])
def test_a_fractional_byte_count_is_refused_by_one_rule(shell, value):
    msg = usage_error(shell, f"%%gpumem -d cpu --budget {value}\ny = 1")
    assert msg.startswith(f"--budget must be a whole number of bytes, got '{value}'")


def test_a_size_in_a_larger_unit_rounds_down_to_whole_bytes():
    assert parse_size("1.3MiB") == 1363148  # 1363148.8 bytes
    assert parse_size("1e-3KiB") == 1
    assert parse_size("0.1e1GB") == 10**9


@pytest.mark.parametrize(("value", "unit", "instead"), [("5Mb", "Mb", "MB"), ("2Gib", "Gib", "GiB"), ("64b", "b", "B")])
def test_a_unit_of_bits_is_refused_and_named(shell, value, unit, instead):
    msg = usage_error(shell, f"%%gpumem -d cpu --budget {value}\ny = 1")
    assert msg == f"--budget: {unit!r} counts bits, not bytes; write {instead!r} for bytes, got {value!r}"


@pytest.mark.parametrize("flag", ["--min", "--max", "--start", "--effective"])
def test_a_batch_size_above_sys_maxsize_is_refused_by_name(shell, flag):
    huge = 10**20
    msg = usage_error(shell, f"%%find_batch --var batch_size -d cpu --budget 4MiB {flag} {huge}\n{LOOP}")
    assert msg == f"{flag} must be <= {sys.maxsize} (sys.maxsize), got {huge}"
    assert shell.user_ns["batch_size"] == 8  # refused before any trial


def test_a_negative_min_is_refused_by_name(shell):
    msg = usage_error(shell, f"%%find_batch --var batch_size -d cpu --budget 4MiB --min -3\n{LOOP}")
    assert msg == "--min must be >= 1, got -3"


def test_accumulation_steps_of_a_huge_effective_batch_are_exact():
    effective = 10**18 + 1  # (10**18 + 1) / 3 is not a float
    micro, steps = accumulation_plan(effective, 3 * 10**17)
    assert steps == 4
    assert micro == 250000000000000001  # ceil(effective / 4), exactly
    assert micro * steps >= effective > micro * steps - steps


def test_a_margin_is_shown_with_the_digits_it_has():
    assert [format_percent(m) for m in (0.05, 0.499, 0.125, 0.0)] == ["5%", "49.9%", "12.5%", "0%"]


def test_the_search_result_states_the_margin_given(shell):
    with capture_output():
        r = shell.run_cell(f"%%find_batch --var batch_size -d cpu --budget 4MiB --margin 0.125 -q -o\n{LOOP}",
                           store_history=True)
    assert r.error_in_exec is None, r.error_in_exec
    res = r.result
    assert isinstance(res, BatchSearchResult)
    from gpumagic.render.text import search_text

    shown = [res.reason, res.to_text(), search_text(res, color=False)]
    assert all("12.5%" in text for text in shown[1:]), shown
    assert not any("13%" in text for text in shown), shown


def test_the_statement_after_two_dashes_runs_as_typed(shell):
    with capture_output():
        r = shell.run_cell(
            "%find_batch --var batch_size -d cpu --budget 4MiB -q -o -- train('a  \"b\"  c')", store_history=True
        )
    assert r.error_in_exec is None, r.error_in_exec
    assert set(TAGS) == {'a  "b"  c'}


def test_quiet_search_does_not_show_the_trials_prints(shell):
    with capture_output() as out:
        r = shell.run_cell(f"%%find_batch --var batch_size -d cpu --budget 4MiB -q -o\n{LOOP}print('step', i)\n",
                           store_history=True)
    assert r.error_in_exec is None, r.error_in_exec
    assert "step" not in out.stdout
    assert out.outputs == []
