"""Opt-in autoload: the config merge on temporary prefixes, the command line, and real kernels."""

from __future__ import annotations

import json
import os
import site
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

import gpumagic
from gpumagic import autoload

OTHER = {
    "InteractiveShellApp": {"extra_extensions": ["otherpkg"], "exec_lines": ["import os"]},
    "IPKernelApp": {"matplotlib": "inline"},
}
MAGICS = {"line": ["gpumem", "find_batch", "batch_sweep", "gpumon", "gpumagic"],
          "cell": ["gpumem", "find_batch", "batch_sweep"]}


@pytest.fixture(autouse=True)
def _no_user_profile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # status() also reads the user's profile folder; keep the developer's ~/.ipython out of it
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython-dir"))


def kernel_file(prefix: Path) -> Path:
    return prefix / "etc" / "ipython" / "ipython_kernel_config.json"


def terminal_file(prefix: Path) -> Path:
    return prefix / "etc" / "ipython" / "ipython_config.json"


def write_json(path: Path, data: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=4) + "\n", encoding="utf-8")


def read_json(path: Path) -> object:
    return json.loads(path.read_text(encoding="utf-8"))


# --- the merge ----------------------------------------------------------------------------------


def test_enable_creates_the_kernel_config_and_its_folders(tmp_path: Path) -> None:
    path = autoload.enable(prefix=tmp_path)

    assert path == kernel_file(tmp_path)
    assert read_json(path) == {"InteractiveShellApp": {"extra_extensions": ["gpumagic"]}}


def test_enable_defaults_to_this_environment() -> None:
    assert autoload.config_path() == Path(sys.prefix) / "etc" / "ipython" / "ipython_kernel_config.json"


def test_the_jupyter_config_snippet_is_what_enable_writes(tmp_path: Path) -> None:
    snippet = Path(__file__).resolve().parents[2] / "jupyter-config" / "ipython_kernel_config.json"

    assert read_json(autoload.enable(prefix=tmp_path)) == read_json(snippet)


def test_enable_keeps_other_settings_and_other_extensions(tmp_path: Path) -> None:
    write_json(kernel_file(tmp_path), OTHER)

    autoload.enable(prefix=tmp_path)

    assert read_json(kernel_file(tmp_path)) == {
        "InteractiveShellApp": {"extra_extensions": ["otherpkg", "gpumagic"], "exec_lines": ["import os"]},
        "IPKernelApp": {"matplotlib": "inline"},
    }


def test_enable_twice_leaves_the_file_untouched(tmp_path: Path) -> None:
    path = autoload.enable(prefix=tmp_path)
    before = path.read_bytes(), path.stat().st_mtime_ns

    autoload.enable(prefix=tmp_path)

    assert (path.read_bytes(), path.stat().st_mtime_ns) == before


def test_enable_keeps_the_file_mode_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    path = kernel_file(tmp_path)
    write_json(path, OTHER)
    path.chmod(0o640)

    autoload.enable(prefix=tmp_path)

    assert path.stat().st_mode & 0o777 == 0o640
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]


def test_disable_removes_only_gpumagic(tmp_path: Path) -> None:
    write_json(kernel_file(tmp_path), OTHER)
    autoload.enable(prefix=tmp_path)

    autoload.disable(prefix=tmp_path)

    assert read_json(kernel_file(tmp_path)) == OTHER


def test_disable_leaves_an_empty_object_where_enable_created_the_file(tmp_path: Path) -> None:
    path = autoload.enable(prefix=tmp_path)

    autoload.disable(prefix=tmp_path)

    assert read_json(path) == {}


def test_disable_without_a_config_creates_nothing(tmp_path: Path) -> None:
    autoload.disable(prefix=tmp_path)

    assert not (tmp_path / "etc").exists()


def test_an_empty_file_counts_as_no_settings(tmp_path: Path) -> None:
    kernel_file(tmp_path).parent.mkdir(parents=True)
    kernel_file(tmp_path).write_text("\n", encoding="utf-8")

    autoload.enable(prefix=tmp_path)

    assert read_json(kernel_file(tmp_path)) == {"InteractiveShellApp": {"extra_extensions": ["gpumagic"]}}


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        ('{"InteractiveShellApp": {"extra_extensions": ["otherpkg"],}}', "not valid JSON"),
        ('["gpumagic"]', "the top level is a JSON array, expected an object"),
        ('{"InteractiveShellApp": []}', "InteractiveShellApp is a JSON array, expected an object"),
        ('{"InteractiveShellApp": {"extra_extensions": "otherpkg"}}', "must be a list of module names"),
    ],
    ids=["invalid-json", "array", "section-not-object", "extensions-not-list"],
)
@pytest.mark.parametrize("action", [autoload.enable, autoload.disable])
def test_a_file_that_is_not_a_config_object_is_refused_untouched(
    tmp_path: Path, content: str, reason: str, action: Callable[..., Path]
) -> None:
    path = kernel_file(tmp_path)
    path.parent.mkdir(parents=True)
    path.write_text(content, encoding="utf-8")

    with pytest.raises(autoload.ConfigError, match=reason) as info:
        action(prefix=tmp_path)

    assert str(path) in str(info.value)
    assert path.read_text(encoding="utf-8") == content
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]


def test_terminal_edits_ipython_config_json_only(tmp_path: Path) -> None:
    path = autoload.enable(prefix=tmp_path, terminal=True)

    assert path == terminal_file(tmp_path)
    assert read_json(path) == {"InteractiveShellApp": {"extra_extensions": ["gpumagic"]}}
    assert not kernel_file(tmp_path).exists()


# --- status ---------------------------------------------------------------------------------


def test_status_after_enable_says_kernels_autoload_from_that_file(tmp_path: Path) -> None:
    path = autoload.enable(prefix=tmp_path)

    st = autoload.status(prefix=tmp_path)

    assert (st.listed, st.autoloads, st.source, st.problem) == (True, True, path, None)


def test_status_counts_the_terminal_config_for_kernels(tmp_path: Path) -> None:
    # a kernel reads ipython_config.json too; the real kernel test below checks this claim
    path = autoload.enable(prefix=tmp_path, terminal=True)

    st = autoload.status(prefix=tmp_path)

    assert (st.listed, st.autoloads, st.source) == (False, True, path)


def test_status_sees_a_profile_list_that_overrides_the_environment(tmp_path: Path) -> None:
    autoload.enable(prefix=tmp_path)
    profile = Path(os.environ["IPYTHONDIR"]) / "profile_default" / "ipython_kernel_config.json"
    write_json(profile, {"InteractiveShellApp": {"extra_extensions": ["otherpkg"]}})

    st = autoload.status(prefix=tmp_path)

    assert (st.listed, st.autoloads, st.source) == (True, False, profile)


def test_status_reports_an_unreadable_file_instead_of_raising(tmp_path: Path) -> None:
    kernel_file(tmp_path).parent.mkdir(parents=True)
    kernel_file(tmp_path).write_text("{", encoding="utf-8")

    st = autoload.status(prefix=tmp_path)

    assert st.problem is not None
    assert "not valid JSON" in st.problem
    assert not st.autoloads


# --- command line -------------------------------------------------------------------------------


def test_cli_enable_names_the_file_and_exits_0(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert autoload.main(["enable", "--prefix", str(tmp_path)]) == 0

    out = capsys.readouterr().out
    assert f'"gpumagic" added to InteractiveShellApp.extra_extensions in {kernel_file(tmp_path)}' in out
    assert "Jupyter kernels: gpumagic now autoloads" in out


def test_cli_enable_twice_says_nothing_changed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    autoload.main(["enable", "--prefix", str(tmp_path)])
    capsys.readouterr()

    assert autoload.main(["enable", "--prefix", str(tmp_path)]) == 0

    assert "(nothing changed)" in capsys.readouterr().out


def test_cli_disable_terminal_exits_0(tmp_path: Path) -> None:
    autoload.enable(prefix=tmp_path, terminal=True)

    assert autoload.main(["disable", "--terminal", "--prefix", str(tmp_path)]) == 0

    assert read_json(terminal_file(tmp_path)) == {}


def test_cli_disable_warns_when_another_file_still_autoloads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    autoload.enable(prefix=tmp_path, terminal=True)

    assert autoload.main(["disable", "--prefix", str(tmp_path)]) == 0

    out = capsys.readouterr().out
    assert f"Jupyter kernels: gpumagic autoloads, through {terminal_file(tmp_path)}" in out
    assert "gpumagic.autoload disable --terminal --prefix" in out


def test_cli_refuses_invalid_json_with_exit_2_and_the_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = kernel_file(tmp_path)
    path.parent.mkdir(parents=True)
    path.write_text("{'single': 'quotes'}", encoding="utf-8")

    assert autoload.main(["enable", "--prefix", str(tmp_path)]) == 2

    err = capsys.readouterr().err
    assert err.startswith(f"gpumagic.autoload: error: {path}: not valid JSON")
    assert "will not overwrite it" in err
    assert path.read_text(encoding="utf-8") == "{'single': 'quotes'}"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "the following arguments are required"),
        (["reload"], "invalid choice: 'reload'"),
        (["status", "--terminal"], "unrecognized arguments: --terminal"),
        (["enable", "--prefix", "/no/such/env"], "--prefix: must be an existing environment folder"),
    ],
)
def test_cli_usage_errors_exit_2_with_a_message(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert autoload.main(argv) == 2

    err = capsys.readouterr().err
    assert err.startswith("usage: python -m gpumagic.autoload")
    assert message in err


def test_cli_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert autoload.main(["enable", "--help"]) == 0

    assert "--terminal" in capsys.readouterr().out


def test_cli_status_shows_both_files_and_the_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    autoload.enable(prefix=tmp_path)

    assert autoload.main(["status", "--prefix", str(tmp_path)]) == 0

    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"Jupyter kernels: gpumagic autoloads (listed in {kernel_file(tmp_path)})"
    assert lines[1].endswith(f"-m gpumagic.autoload disable --prefix {tmp_path}")
    assert lines[2] == f"IPython terminals: gpumagic does not autoload ({terminal_file(tmp_path)} does not exist)"
    assert lines[3].endswith(f"-m gpumagic.autoload enable --terminal --prefix {tmp_path}")


def test_cli_status_exits_2_on_an_unreadable_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_json(terminal_file(tmp_path), ["not", "an", "object"])

    assert autoload.main(["status", "--prefix", str(tmp_path)]) == 2

    out = capsys.readouterr().out
    assert f"IPython terminals: unknown, {terminal_file(tmp_path)} cannot be read" in out


def test_module_runs_as_a_command(tmp_path: Path) -> None:
    autoload.enable(prefix=tmp_path)

    done = subprocess.run(
        [sys.executable, "-m", "gpumagic.autoload", "status", "--prefix", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout.startswith("Jupyter kernels: gpumagic autoloads")


# --- real kernels and a real terminal ------------------------------------------------------------
#
# The kernel runs in a throwaway environment: a venv at a temporary prefix that reaches this
# interpreter's packages through a .pth file. Its sys.prefix is therefore the temporary one, so it
# reads {prefix}/etc/ipython exactly as a user's kernel does, and `enable(prefix=...)` edits the very
# file it reads; IPYTHONDIR points at an empty folder so no personal profile takes part.


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Path:
    prefix = tmp_path_factory.mktemp("env")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(prefix)], check=True, timeout=120)
    done = subprocess.run(
        [prefix / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    ours = [*site.getsitepackages(), *([site.getusersitepackages()] if site.ENABLE_USER_SITE else [])]
    lines = [f"import site; site.addsitedir({d!r})" for d in ours if os.path.isdir(d)]
    lines.append(str(Path(gpumagic.__file__).resolve().parents[1]))  # a checkout on PYTHONPATH works too
    Path(done.stdout.strip(), "_gpumagic_tests.pth").write_text("\n".join(lines) + "\n", encoding="utf-8")

    spec = prefix / "share" / "jupyter" / "kernels" / "gpumagic-autoload-test" / "kernel.json"
    spec.parent.mkdir(parents=True)
    argv = [str(prefix / "bin" / "python"), "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    ipython_dir = tmp_path_factory.mktemp("kernel-ipython-dir")
    spec.write_text(
        json.dumps(
            {
                "argv": argv,
                "display_name": "gpumagic autoload test",
                "language": "python",
                "env": {"IPYTHONDIR": str(ipython_dir)},
            }
        ),
        encoding="utf-8",
    )
    return prefix


def kernel_view(env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, object]:
    """Run a one-cell notebook in a fresh kernel of ``env`` and return what it saw."""
    monkeypatch.setenv("JUPYTER_PATH", str(env / "share" / "jupyter"))
    source = (
        "import json, sys\n"
        "ip = get_ipython()\n"
        "print(json.dumps({'prefix': sys.prefix,\n"
        "    'loaded': 'gpumagic' in ip.extension_manager.loaded,\n"
        f"    'line': [n for n in {MAGICS['line']!r} if ip.find_line_magic(n) is not None],\n"
        f"    'cell': [n for n in {MAGICS['cell']!r} if ip.find_cell_magic(n) is not None]}}))"
    )
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(source)])
    client = NotebookClient(
        nb, kernel_name="gpumagic-autoload-test", timeout=120, resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()
    outputs = nb.cells[0].outputs
    assert [o.get("name") for o in outputs] == ["stdout"], outputs
    seen: dict[str, object] = json.loads(outputs[0]["text"])
    assert Path(str(seen.pop("prefix"))).resolve() == env.resolve()  # the isolation really holds
    return seen


def test_kernel_has_the_magics_without_load_ext_once_enabled(
    env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    autoload.enable(prefix=env)
    try:
        seen = kernel_view(env, tmp_path, monkeypatch)
    finally:
        autoload.disable(prefix=env)

    assert seen == {"loaded": True, **MAGICS}


def test_kernel_lacks_the_magics_once_disabled(env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_json(kernel_file(env), {"InteractiveShellApp": {"exec_lines": ["import os"]}})
    autoload.enable(prefix=env)
    autoload.disable(prefix=env)

    seen = kernel_view(env, tmp_path, monkeypatch)

    assert seen == {"loaded": False, "line": [], "cell": []}


def test_kernel_autoloads_from_the_terminal_config_as_status_says(
    env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_json(kernel_file(env), {})
    autoload.enable(prefix=env, terminal=True)
    try:
        claimed = autoload.status(prefix=env).autoloads
        seen = kernel_view(env, tmp_path, monkeypatch)
    finally:
        autoload.disable(prefix=env, terminal=True)

    assert claimed is True
    assert seen["loaded"] is True


def test_terminal_ipython_autoloads_once_enabled_with_terminal(env: Path, tmp_path: Path) -> None:
    autoload.enable(prefix=env, terminal=True)
    try:
        done = subprocess.run(
            [
                env / "bin" / "python",
                "-m",
                "IPython",
                "--no-banner",
                "--colors=nocolor",
                "-c",
                "print(sorted(get_ipython().extension_manager.loaded))",
            ],
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            timeout=120,
            env={**os.environ, "IPYTHONDIR": str(tmp_path / "ipython-dir")},
            cwd=tmp_path,
            check=False,
        )
    finally:
        autoload.disable(prefix=env, terminal=True)

    assert done.returncode == 0, done.stderr
    assert "'gpumagic'" in done.stdout
