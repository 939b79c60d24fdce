"""The magics' help (``%gpumem?``, ``%find_batch?``, ``%gpumon?``) is complete and agrees with README.md.

The help is what IPython shows: the docstring that ``@magic_arguments`` rewrote with the argparse
usage and options. README.md documents the options in the "Magics" section, in the options
tables and in the usage lines (`` `%%gpumem [-d DEVICE] ...` ``); the two must name the same
options, with the same defaults and choices, and every example in either must parse.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from IPython.core import magic_arguments
from IPython.core.error import UsageError

if TYPE_CHECKING:
    from IPython.core.interactiveshell import InteractiveShell

README = Path(__file__).resolve().parents[2] / "README.md"
MAGICS = ("gpumem", "find_batch", "batch_sweep", "gpumon")  # %gpumagic takes words (oom on|off), not options


# --- README.md, read once ------------------------------------------------------------------------


@dataclass
class Documented:
    """What README.md's "Magics" section says about one magic."""

    table: set[str] = field(default_factory=set)
    """Options named in the first column of its options table (``statement`` for ``-- STATEMENT``)."""
    usage: set[str] = field(default_factory=set)
    """Options in its usage lines, e.g. ``--free`` from `` `%gpumem [-d DEVICE] [--free] [-o]` ``."""
    rows: list[tuple[list[str], str]] = field(default_factory=list)
    """(options, meaning) per table row."""

    @property
    def options(self) -> set[str]:
        return self.table | self.usage


_OPTION = re.compile(r"(?<![\w-])(--?[A-Za-z][\w-]*)")
_USAGE_OPTION = re.compile(r"\[(--?[A-Za-z][\w-]*)")
_MAGIC_LINE = re.compile(r"^`%%?(\w+)")


def magics_section(text: str) -> list[str]:
    lines = text.splitlines()
    start = lines.index("## Magics")
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    return lines[start + 1 : end]


def table_cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def row_options(first_cell: str) -> list[str]:
    out = []
    for span in re.findall(r"`([^`]+)`", first_cell):
        positional = re.fullmatch(r"-- ([A-Z]+)", span)
        if positional:  # `-- STATEMENT`: what follows `--` on the line
            out.append(positional.group(1).lower())
        else:
            out.extend(_OPTION.findall(span))
    return out


def read_readme(text: str) -> dict[str, Documented]:
    docs: dict[str, Documented] = {}
    current: str | None = None
    for line in magics_section(text):
        magic = _MAGIC_LINE.match(line)
        if line.startswith("#"):  # a sub-heading ends the options tables of the magic above it
            current = None
        elif magic:
            current = magic.group(1)
            usage = docs.setdefault(current, Documented()).usage
            first_span = re.match(r"`([^`]+)`", line)
            usage.update(_USAGE_OPTION.findall(first_span.group(1) if first_span else ""))
        elif line.startswith("|") and current is not None:
            cells = table_cells(line)
            if cells[0] == "option" or set(cells[0]) <= set("-: "):
                continue  # header and separator rows
            opts = row_options(cells[0])
            docs[current].table.update(opts)
            docs[current].rows.append((opts, cells[1] if len(cells) > 1 else ""))
    return docs


@pytest.fixture(scope="module")
def readme() -> dict[str, Documented]:
    return read_readme(README.read_text(encoding="utf-8"))


# --- the magics, from the session's shell --------------------------------------------------------


def magic(ip: InteractiveShell, name: str) -> Any:
    fn = ip.find_line_magic(name) or ip.find_cell_magic(name)
    assert fn is not None, f"%{name} is not registered"
    return fn


def parser(ip: InteractiveShell, name: str) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = magic(ip, name).__func__.parser
    return p


def actions(ip: InteractiveShell, name: str) -> list[argparse.Action]:
    return [a for a in parser(ip, name)._actions if not isinstance(a, argparse._HelpAction)]


def names(action: argparse.Action) -> list[str]:
    """How README and help refer to an action: its option strings, or a positional's dest."""
    return list(action.option_strings) or [action.dest]


def help_text(ip: InteractiveShell, name: str) -> str:
    doc: str = magic(ip, name).__doc__
    return doc


def parses(ip: InteractiveShell, name: str, line: str) -> None:
    magic_arguments.parse_argstring(magic(ip, name), line)  # raises UsageError when it does not


# --- the help is complete -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", MAGICS)
def test_every_option_has_help_and_appears_in_the_help_text(ip: InteractiveShell, name: str) -> None:
    text = help_text(ip, name)

    for action in actions(ip, name):
        assert (action.help or "").strip(), f"%{name} {names(action)} has no help"
        for option in names(action):
            assert option in text, f"%{name}? does not mention {option}"


@pytest.mark.parametrize("name", MAGICS)
def test_help_has_a_summary_and_examples(ip: InteractiveShell, name: str) -> None:
    text = help_text(ip, name)
    _, usage, summary, *_ = re.split(r"\n\s*\n", text.strip())  # "::", the usage, then the docstring

    assert usage.strip().startswith(f"%{name} ")
    assert summary.strip().endswith("."), summary
    assert "Examples::" in text


@pytest.mark.parametrize("name", MAGICS)
def test_defaults_stated_in_the_help_are_the_parser_defaults(ip: InteractiveShell, name: str) -> None:
    for action in actions(ip, name):
        stated = re.search(r"default (-?\d+(?:\.\d+)?)\b", action.help or "")
        if stated:
            assert float(stated.group(1)) == action.default, f"%{name} {names(action)}: help says {stated.group(0)}"


@pytest.mark.parametrize("name", MAGICS)
def test_every_example_in_the_help_parses(ip: InteractiveShell, name: str) -> None:
    examples = help_text(ip, name).split("Examples::", 1)[1]
    lines = [m.group(2) for m in re.finditer(r"^\s*%%?(\w+)(.*)$", examples, re.MULTILINE) if m.group(1) == name]

    assert lines, f"%{name}? has no example of itself"
    for line in lines:
        parses(ip, name, line.split("#", 1)[0].strip())


def test_find_batch_help_names_the_cell_magic_it_reruns(ip: InteractiveShell) -> None:
    # argparse %-formats help strings: "%%gpumem" in the source prints as "%gpumem", a line magic
    text = help_text(ip, "find_batch")

    assert re.search(r"(?<!%)%gpumem cell", text) is None, "the re-run cell is a %%gpumem cell"


# --- the help agrees with README.md ------------------------------------------------------------------


def test_readme_documents_the_three_magics(readme: dict[str, Documented]) -> None:
    assert set(MAGICS) <= set(readme)
    assert readme["gpumem"].table
    assert readme["find_batch"].table


@pytest.mark.parametrize("name", MAGICS)
def test_every_option_of_the_magic_is_in_the_readme(
    ip: InteractiveShell, readme: dict[str, Documented], name: str
) -> None:
    documented = readme[name].options

    missing = [names(a) for a in actions(ip, name) if not documented & set(names(a))]

    assert not missing, f"README.md's Magics section does not document %{name} {missing}"


@pytest.mark.parametrize("name", MAGICS)
def test_every_option_in_the_readme_exists(ip: InteractiveShell, readme: dict[str, Documented], name: str) -> None:
    known = {n for a in actions(ip, name) for n in names(a)}

    unknown = sorted(readme[name].options - known)

    assert not unknown, f"README.md documents options %{name} does not have: {unknown}"


@pytest.mark.parametrize("name", ["gpumem", "find_batch"])
def test_defaults_in_the_readme_tables_are_the_parser_defaults(
    ip: InteractiveShell, readme: dict[str, Documented], name: str
) -> None:
    by_name = {n: a for a in actions(ip, name) for n in names(a)}
    checked = 0
    for options, meaning in readme[name].rows:
        stated = re.search(r"\((\d+(?:\.\d+)?)\)", meaning)  # "first size tried (2)", "(0.05)"
        if stated and options:
            action = by_name[options[0]]
            assert float(stated.group(1)) == action.default, f"README: {options[0]} ({stated.group(1)})"
            checked += 1
    assert checked or name == "gpumem"


@pytest.mark.parametrize("name", ["gpumem", "find_batch"])
def test_choices_in_the_readme_tables_are_the_parser_choices(
    ip: InteractiveShell, readme: dict[str, Documented], name: str
) -> None:
    by_name = {n: a for a in actions(ip, name) for n in names(a)}
    for options, meaning in readme[name].rows:
        action = by_name[options[0]]
        if action.choices is not None:
            assert set(re.findall(r"`([^`]+)`", meaning)) == set(action.choices), options


def test_every_magic_line_in_the_readme_parses(ip: InteractiveShell) -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.DOTALL)
    lines = [
        (m.group(1), m.group(2))
        for block in blocks
        for m in re.finditer(r"^%%?(\w+)(.*)$", block, re.MULTILINE)
        if m.group(1) in MAGICS
    ]

    assert len(lines) >= 2
    for name, line in lines:
        try:
            parses(ip, name, line.strip())
        except UsageError as e:  # pragma: no cover - the message is the point
            pytest.fail(f"README.md: %{name}{line} does not parse: {e}")
