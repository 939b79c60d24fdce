"""The renderer registry: results ask it for their rich views, renderers register for result types."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from gpumagic import views


@dataclass(frozen=True)
class Result:
    value: int

    def __repr__(self) -> str:
        return f"<Result {self.value}>"

    def _repr_html_(self) -> str:
        return f"<b>{self.value}</b>"

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, Any]:
        return views.mimebundle(self, include, exclude)


@pytest.fixture
def clean_registry() -> Iterator[None]:
    saved = {k: list(v) for k, v in views._RENDERERS.items()}
    yield
    views._RENDERERS.clear()
    views._RENDERERS.update(saved)


def test_a_renderer_registered_for_a_type_adds_its_entries(clean_registry: None) -> None:
    views.register(Result, lambda r: {"text/markdown": f"**{r.value}**"})
    assert Result(3)._repr_mimebundle_() == {
        "text/plain": "<Result 3>", "text/html": "<b>3</b>", "text/markdown": "**3**",
    }


def test_a_failing_renderer_leaves_the_text_and_html(clean_registry: None) -> None:
    def broken(r: Result) -> dict[str, Any]:
        raise RuntimeError("no display here")

    views.register(Result, broken)
    assert set(Result(1)._repr_mimebundle_()) == {"text/plain", "text/html"}


def test_include_and_exclude_apply_to_the_rendered_entries(clean_registry: None) -> None:
    views.register(Result, lambda r: {"image/png": "iVBOR"})
    assert set(Result(1)._repr_mimebundle_(include={"image/png", "text/plain"})) == {"image/png", "text/plain"}
    assert set(Result(1)._repr_mimebundle_(exclude={"image/png"})) == {"text/plain", "text/html"}


def test_include_applies_when_the_widgets_module_cannot_be_imported() -> None:
    code = textwrap.dedent("""
        import sys
        sys.modules["gpumagic.render.widgets"] = None  # a broken install
        from gpumagic.report import MemoryReport
        rep = MemoryReport("cpu", "cpu", 100, 300, 200, 120, None, None, 0.1)
        print(sorted(rep._repr_mimebundle_(include={"text/plain"})), sorted(rep._repr_mimebundle_()))
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "['text/plain'] ['text/html', 'text/plain']"
