"""gpumagic where widgets don't run: terminal IPython on a pseudo-terminal and through a pipe, the
demo in a log, and a notebook executed headless with the command examples/README.md gives.

Each session is a real ``python -m IPython`` subprocess, driven like a user would: lines typed at
the prompt (pexpect on a pseudo-terminal of 80 columns) or fed on stdin with the output piped to
a file, as in CI. IPython's own colours are off (``--colors=nocolor``): every escape code left in
the text is gpumagic's.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pexpect
import pytest

ROOT = Path(__file__).resolve().parents[2]
COLUMNS = 80
ESC = re.compile(r"\x1b")
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")  # what a terminal turns into colour or cursor moves
PROGRESS = re.compile(r"find_batch trials: \d")  # a frame of the terminal bar
PROMPT = r"In \[\d+\]: "
TIMEOUT = 240

SETUP = (
    "import torch, torch.nn as nn, torch.nn.functional as F; torch.manual_seed(0); "
    "model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10)); "
    "opt = torch.optim.Adam(model.parameters(), 1e-3); bs = 64"
)
# one training step per line, so that a single line at the prompt is a whole cell
TRAIN = ("exec('for i in range(4):\\n x = torch.randn(bs, 64); loss = F.cross_entropy(model(x), "
         "torch.randint(0, 10, (bs,)))\\n opt.zero_grad(); loss.backward(); opt.step()')")
DEEP = "def grow(n):\n    return torch.randn(n, 1024, 1024).sum()\n"

# (what is typed, whether it is a cell magic whose body follows on the next lines)
SESSION = [
    "%load_ext gpumagic",
    SETUP,
    f"%%gpumem -d cpu\n{TRAIN}\n",
    f"%find_batch --var bs -d cpu --budget 4MiB -- {TRAIN}",
    f"%find_batch --var bs -d cpu --budget 4MiB -q -o -- {TRAIN}",
    DEEP,
    "%%gpumem -d cpu --budget 4MiB\ngrow(bs)\n",
    "%tb",
    f"%%gpumem -d cpu -o\n{TRAIN}\n",
    "%gpumem -d cpu --free",
    "%gpumon",
]


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    env.pop("NO_COLOR", None)
    env.update(COLUMNS=str(COLUMNS), LINES="40", TERM="xterm-256color", GPUMAGIC_OOM="on", **extra)
    return env


def _ipython_args() -> list[str]:
    return ["-m", "IPython", "--no-banner", "--colors=nocolor", "--simple-prompt", "--no-confirm-exit",
            "--HistoryManager.enabled=False", "--TerminalInteractiveShell.term_title=False"]


def _typed(cell: str) -> str:
    """The keys a user types for ``cell``: a multi-line cell ends with blank lines, as at the prompt."""
    return cell.rstrip("\n") + ("\n\n\n" if "\n" in cell.rstrip("\n") else "\n")


@pytest.fixture(scope="module")
def tty_session(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Outputs of SESSION typed into terminal IPython on an 80-column pseudo-terminal."""
    home = tmp_path_factory.mktemp("ipython-tty")
    child = pexpect.spawn(sys.executable, _ipython_args(), env=_env(IPYTHONDIR=str(home)), encoding="utf-8",
                          dimensions=(40, COLUMNS), timeout=TIMEOUT, cwd=str(home))
    outputs = []
    try:
        child.expect(PROMPT)
        for number, cell in enumerate(SESSION, start=2):
            child.send(_typed(cell))
            child.expect(rf"In \[{number}\]: ")  # the next cell's prompt: this one has finished
            outputs.append(child.before)
        child.sendline("exit")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    return outputs


@pytest.fixture(scope="module")
def piped_session(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Everything terminal IPython writes (stdout and stderr) when SESSION comes on stdin and goes to a pipe."""
    home = tmp_path_factory.mktemp("ipython-pipe")
    stdin = "".join(_typed(cell) for cell in SESSION)
    proc = subprocess.run([sys.executable, *_ipython_args()], input=stdin, capture_output=True, text=True,
                          env=_env(IPYTHONDIR=str(home)), timeout=TIMEOUT, cwd=str(home), check=False)
    return proc.stdout + "\n" + proc.stderr


CONTINUATION = re.compile(r"^(\s*\.\.\.: ?)+")  # the simple prompt's "   ...: " before the output


def _lines(text: str) -> list[str]:
    """Lines as a reader sees them: a carriage return rewrites the line, so only its last frame shows."""
    return [CONTINUATION.sub("", line.split("\r")[-1]) for line in text.replace("\r\n", "\n").split("\n")]


# --- on a terminal ------------------------------------------------------------------------------


@pytest.mark.slow
def test_gpumem_in_a_terminal_prints_a_headline_and_a_table(tty_session: list[str]) -> None:
    text = "\n".join(_lines(ANSI.sub("", tty_session[2])))

    assert re.search(r"^gpumem: peak \d", text, re.MULTILINE)
    for label in ("at the peak", "loss", "slowest", "step peak"):
        assert re.search(rf"^  {label} +\S", text, re.MULTILINE), label


@pytest.mark.slow
def test_find_batch_in_a_terminal_marks_the_pick_among_the_trials(tty_session: list[str]) -> None:
    text = "\n".join(_lines(ANSI.sub("", tty_session[3])))

    assert re.search(r"^find_batch: recommended \d+", text, re.MULTILINE)
    assert re.search(r"^ +trial +batch +peak", text, re.MULTILINE)  # right-aligned over "plan N" numbers
    assert "← pick" in text


@pytest.mark.slow
def test_no_output_line_is_wider_than_the_terminal(tty_session: list[str]) -> None:
    typed = {line for cell in SESSION for line in cell.splitlines()}
    too_wide = [line for out in tty_session for line in _lines(ANSI.sub("", out))
                if len(line) > COLUMNS and line.strip() not in typed]

    assert not too_wide


@pytest.mark.slow
def test_the_terminal_progress_bar_is_erased_before_the_result(tty_session: list[str]) -> None:
    out = tty_session[3]
    frames = PROGRESS.findall(out)
    before_result = out.split("find_batch: recommended")[0]

    assert frames
    assert not [line for line in _lines(before_result) if PROGRESS.search(line)]  # every frame was erased
    assert "0trial" not in out


@pytest.mark.slow
def test_quiet_find_batch_shows_no_progress(tty_session: list[str]) -> None:
    out = tty_session[4]

    assert not PROGRESS.search(out)
    assert "find_batch: recommended" in out  # -o: the result is the cell's value


@pytest.mark.slow
def test_oom_short_form_shows_the_whole_first_line(tty_session: list[str]) -> None:
    text = " ".join(line.strip() for line in _lines(ANSI.sub("", tty_session[6])))

    assert "(simulated by gpumagic: cpu with a 4.00 MiB budget)" in text
    assert "(full traceback: %tb)" in text


@pytest.mark.slow
def test_tb_after_an_oom_shows_the_user_frames_with_their_arguments(tty_session: list[str]) -> None:
    tb = ANSI.sub("", tty_session[7])

    assert "in grow(n)" in tb
    assert "grow(bs)" in tb
    assert re.search(r"Cell In\[(\d+)\], line 1\n----> 1 grow\(bs\)", tb.replace("\r", ""))
    assert "failed resolving arguments" not in tb
    assert "gpumagic" not in tb.replace("(simulated by gpumagic", "")
    assert "run_cell_source" not in tb
    assert "_raise_oom" not in tb


@pytest.mark.slow
def test_gpumem_o_in_a_terminal_prints_the_report_once_as_the_value(tty_session: list[str]) -> None:
    text = "\n".join(_lines(ANSI.sub("", tty_session[8])))

    assert len(re.findall(r"gpumem: peak \d", text)) == 1, text
    assert re.search(r"Out\[\d+\]:\s+gpumem: peak \d", text), text


@pytest.mark.slow
def test_gpumem_free_in_a_terminal_lists_the_names_holding_memory(tty_session: list[str]) -> None:
    text = " ".join(line.strip() for line in _lines(ANSI.sub("", tty_session[9])))

    assert "gpumem: cpu: allocated" in text  # the status's headline, then its rows
    assert "still held by 'model'" in text


@pytest.mark.slow
def test_gpumon_in_a_terminal_prints_a_text_panel(tty_session: list[str]) -> None:
    text = "\n".join(_lines(ANSI.sub("", tty_session[10])))

    assert "VBox" not in text
    assert "HBox" not in text
    assert re.search(r"^gpumon: the devices now", text, re.MULTILINE), text
    assert re.search(r"^  cpu.*used \d", text, re.MULTILINE), text


# --- through a pipe (a log, CI) ------------------------------------------------------------------


@pytest.mark.slow
def test_a_piped_session_has_no_escape_codes(piped_session: str) -> None:
    assert "find_batch: recommended" in piped_session
    assert not ESC.search(piped_session)


@pytest.mark.slow
def test_a_piped_search_logs_one_line_per_trial(piped_session: str) -> None:
    trial_lines = re.findall(r"^find_batch: trial (\d+): batch \d+: .*$", piped_session, re.MULTILINE)

    assert trial_lines
    assert trial_lines == [str(i) for i in range(1, len(trial_lines) + 1)], piped_session  # -q logged none
    assert "\r" not in piped_session


@pytest.mark.slow
def test_a_piped_tb_hides_gpumagic_frames(piped_session: str) -> None:
    tb = piped_session.split("(full traceback: %tb)", 1)[1]

    assert "in grow(n)" in tb
    assert "run_cell_source" not in tb
    assert "backends/cpu_exact.py" not in tb


# --- the demo and headless notebooks -------------------------------------------------------------


@pytest.mark.slow
def test_the_demo_writes_no_escape_codes_into_a_pipe() -> None:
    proc = subprocess.run([sys.executable, "-m", "gpumagic.demo"], capture_output=True, text=True,
                          env=_env(), timeout=TIMEOUT, cwd=str(ROOT), check=False)

    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "1. Measure a training cell" in proc.stdout
    assert not ESC.search(proc.stdout + proc.stderr)


def _headless_command() -> str:
    readme = (ROOT / "examples" / "README.md").read_text(encoding="utf-8")
    (command,) = re.findall(r"^\.venv/bin/(jupyter nbconvert .*)$", readme, re.MULTILINE)
    return command


@pytest.mark.slow
def test_the_headless_command_of_the_examples_readme_runs_a_notebook(tmp_path: Path) -> None:
    command = _headless_command().split()
    notebook = Path(command[-1])
    (tmp_path / notebook.parent).mkdir(parents=True)
    shutil.copy(ROOT / notebook, tmp_path / notebook)
    jupyter = Path(sys.executable).parent / command[0]
    # a personal python3 kernelspec must not point the run at another interpreter
    env = _env(JUPYTER_DATA_DIR=str(tmp_path / "jupyter-data"))

    proc = subprocess.run([str(jupyter), *command[1:]], capture_output=True, text=True, env=env,
                          timeout=600, cwd=str(tmp_path), check=False)

    assert proc.returncode == 0, proc.stderr[-3000:]
    executed = (tmp_path / "executed" / notebook.name).read_text(encoding="utf-8")
    assert "gpumagic memory report" in executed
