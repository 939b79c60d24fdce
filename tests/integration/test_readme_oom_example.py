"""README's "Out of memory, before and after" block is what the demo shows, so they cannot drift."""

import re
from pathlib import Path

from IPython.utils.capture import capture_output

from gpumagic import demo

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_block() -> str:
    text = README.read_text(encoding="utf-8")
    m = re.search(r"### Out of memory, before and after\n.*?```\n(.*?)```", text, re.S)
    assert m, "README has no 'Out of memory, before and after' code block"
    return m.group(1).rstrip("\n")


def test_readme_oom_block_is_what_the_demo_prints(ip, clean_ns):
    with capture_output():
        exc = demo.measure_and_fail(ip, title=False)
    assert exc is not None
    assert readme_block() == demo.oom_text(exc)
