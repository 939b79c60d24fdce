"""Opt-in autoload: load gpumagic in every IPython kernel (or terminal) of one environment.

Nothing is installed into IPython's config at ``pip install`` time: IPython reads a single
``ipython_kernel_config.json`` per folder, which other packages may own too. This command merges
``"gpumagic"`` into ``InteractiveShellApp.extra_extensions`` of that file, keeping everything
else, and takes only that entry out again::

    python -m gpumagic.autoload enable              # Jupyter kernels of this environment
    python -m gpumagic.autoload enable --terminal   # plain `ipython` here (kernels read it too)
    python -m gpumagic.autoload status
    python -m gpumagic.autoload disable

The files are ``{prefix}/etc/ipython/ipython_kernel_config.json`` (kernels) and
``{prefix}/etc/ipython/ipython_config.json`` (terminal), ``prefix`` being ``sys.prefix`` unless
given. ``disable`` leaves the file in place: it removes ``"gpumagic"``, then the list if it became
empty, then the ``InteractiveShellApp`` section if it became empty, possibly leaving ``{}``, so a
file that was there before ``enable`` is back to its old settings and one that ``enable`` created
is harmless. An existing file that is not a JSON object is never overwritten.

The same as a Python API::

    >>> from gpumagic import autoload
    >>> autoload.enable(prefix="/opt/conda/envs/train")   # doctest: +SKIP
    PosixPath('/opt/conda/envs/train/etc/ipython/ipython_kernel_config.json')
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shlex
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["AutoloadStatus", "ConfigError", "config_path", "disable", "enable", "main", "status"]

EXTENSION = "gpumagic"
SECTION = "InteractiveShellApp"
KEY = "extra_extensions"
KERNEL_CONFIG = "ipython_kernel_config.json"
TERMINAL_CONFIG = "ipython_config.json"


class ConfigError(Exception):
    """An existing config file that gpumagic refuses to edit; the message names the file."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}; fix or remove the file by hand, gpumagic will not overwrite it")
        self.path = path
        self.reason = reason


@dataclass(frozen=True)
class AutoloadStatus:
    """Whether gpumagic autoloads in the kernels (or terminals) of one environment, and why.

    ``autoloads`` is judged from every JSON config file IPython reads, in its order; Python
    config files (``*.py``) cannot be judged without running them and are not looked at.
    """

    path: Path
    """The file that ``enable``/``disable`` edit."""
    terminal: bool
    exists: bool
    listed: bool
    """``path`` lists gpumagic in ``InteractiveShellApp.extra_extensions``."""
    autoloads: bool
    source: Path | None
    """The file that decides: the one listing gpumagic when ``autoloads``, else the one whose
    ``extra_extensions`` IPython uses (``None`` when no file sets it)."""
    problem: str | None = None
    """Why ``path`` cannot be read; ``listed`` and ``autoloads`` are then False."""


def config_path(prefix: str | os.PathLike[str] | None = None, terminal: bool = False) -> Path:
    """The file that an IPython kernel (or with ``terminal``, ``ipython``) of ``prefix`` reads.

    >>> config_path("/env")
    PosixPath('/env/etc/ipython/ipython_kernel_config.json')
    """
    base = Path(sys.prefix if prefix is None else prefix)
    return base / "etc" / "ipython" / (TERMINAL_CONFIG if terminal else KERNEL_CONFIG)


def enable(prefix: str | os.PathLike[str] | None = None, terminal: bool = False) -> Path:
    """Add gpumagic to the environment's kernel (or terminal) config; returns the file.

    Idempotent; creates folders and the file as needed; raises ConfigError on a file that is
    not a JSON object (left untouched).
    """
    path = config_path(prefix, terminal)
    _edit(path, add=True)
    return path


def disable(prefix: str | os.PathLike[str] | None = None, terminal: bool = False) -> Path:
    """Remove gpumagic from the environment's kernel (or terminal) config; returns the file.

    Only gpumagic's entry goes (and the list or section it leaves empty); the file stays.
    """
    path = config_path(prefix, terminal)
    _edit(path, add=False)
    return path


def status(prefix: str | os.PathLike[str] | None = None, terminal: bool = False) -> AutoloadStatus:
    """Whether gpumagic autoloads in kernels (or terminals) of ``prefix``; never raises ConfigError."""
    path = config_path(prefix, terminal)
    try:
        config = _read(path)
    except ConfigError as e:
        return AutoloadStatus(path, terminal, True, False, False, None, e.reason)
    except OSError as e:
        return AutoloadStatus(path, terminal, True, False, False, None, e.strerror or str(e))
    autoloads, source = _resolve(_search_order(path.parent, terminal))
    return AutoloadStatus(path, terminal, path.exists(), EXTENSION in _extensions(config, path), autoloads, source)


# --- reading and writing one file ---------------------------------------------------------


def _read(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except UnicodeDecodeError as e:
        raise ConfigError(path, f"not UTF-8 text ({e.reason} at byte {e.start})") from e
    if not text.strip():
        return {}  # an empty file holds no settings to lose
    try:
        config = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(path, f"not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from e
    if not isinstance(config, dict):
        raise ConfigError(path, f"the top level is a JSON {_json_type(config)}, expected an object")
    _extensions(config, path)  # validate the part we edit before anyone writes
    return config


def _extensions(config: dict[str, Any], path: Path) -> list[str]:
    section = config.get(SECTION, {})
    if not isinstance(section, dict):
        raise ConfigError(path, f"{SECTION} is a JSON {_json_type(section)}, expected an object")
    extensions = section.get(KEY, [])
    if not isinstance(extensions, list) or not all(isinstance(x, str) for x in extensions):
        raise ConfigError(path, f"{SECTION}.{KEY} must be a list of module names, got {json.dumps(extensions)}")
    return extensions


def _edit(path: Path, *, add: bool) -> bool:
    """Add or remove gpumagic in ``path``; returns whether the file changed."""
    config = _read(path)
    extensions = _extensions(config, path)
    if add:
        if EXTENSION in extensions:
            return False
        config.setdefault(SECTION, {})[KEY] = [*extensions, EXTENSION]
    else:
        if EXTENSION not in extensions:
            return False
        section = config[SECTION]
        section[KEY] = [x for x in extensions if x != EXTENSION]
        # an empty list would still override lower-priority files (a kernel reads ipython_config.json too)
        if not section[KEY]:
            del section[KEY]
        if not section:
            del config[SECTION]
    _refuse_read_only(path)
    _write_atomic(path, json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    return True


def _refuse_read_only(path: Path) -> None:
    """A file its owner made read-only is a decision, not an obstacle: replacing it (a rename in a
    writable folder would succeed, even for root) would undo that decision silently."""
    target = path.resolve() if path.is_symlink() else path
    try:
        mode = target.stat().st_mode
    except FileNotFoundError:
        return
    if not mode & 0o222 or not os.access(target, os.W_OK):
        raise ConfigError(path, f"read-only (mode {mode & 0o777:o}); make it writable (chmod u+w) to change it")


def _write_atomic(path: Path, text: str) -> None:
    target = path.resolve() if path.is_symlink() else path  # edit the file a link points to, keep the link
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "x", encoding="utf-8") as f:  # "x" honours the umask, unlike mkstemp's 0600
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        if target.exists():
            shutil.copymode(target, tmp)
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _json_type(value: object) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


# --- what IPython will do: every JSON file it reads, in its order ------------------------


def _search_order(env_dir: Path, terminal: bool) -> list[Path]:
    """JSON config files an IPython app reads, highest priority first.

    Mirrors IPython.core.application: the profile folder, then ``{sys.prefix}/etc/ipython``, then
    the system folders; a kernel reads ``ipython_config`` and then ``ipython_kernel_config``, whose
    settings replace the first's.
    """
    ipython_dir = os.environ.get("IPYTHONDIR")
    profile = (Path(ipython_dir).expanduser() if ipython_dir else Path.home() / ".ipython") / "profile_default"
    if os.name == "nt":
        programdata = os.environ.get("PROGRAMDATA")
        system = [Path(programdata) / "ipython"] if programdata else []
    else:
        system = [Path("/usr/local/etc/ipython"), Path("/etc/ipython")]
    dirs = [profile, *([] if env_dir in system else [env_dir]), *system]
    names = [TERMINAL_CONFIG] if terminal else [KERNEL_CONFIG, TERMINAL_CONFIG]
    return [d / name for name in names for d in dirs]


def _resolve(files: list[Path]) -> tuple[bool, Path | None]:
    """(autoloads, deciding file): each list trait takes its value from the first file setting it."""
    decided: dict[str, tuple[list[str], Path]] = {}
    for path in files:
        try:
            section = _read(path).get(SECTION, {})
        except (ConfigError, OSError):
            continue  # IPython logs such a file and goes on without it
        for key in (KEY, "extensions"):
            value = section.get(key)
            if key not in decided and isinstance(value, list):
                decided[key] = (value, path)
    for values, path in decided.values():
        if EXTENSION in values:
            return True, path
    return False, decided[KEY][1] if KEY in decided else None


# --- command line -----------------------------------------------------------------------------


def _command(args: argparse.Namespace, action: str, terminal: bool) -> str:
    python = sys.executable
    on_path = shutil.which("python")
    if on_path and os.path.exists(python) and os.path.samefile(on_path, python):
        python = "python"
    words = [python, "-m", "gpumagic.autoload", action]
    if terminal:
        words.append("--terminal")
    if args.prefix is not None:
        words += ["--prefix", str(args.prefix)]
    return shlex.join(words)


def _where(terminal: bool) -> str:
    return "IPython terminals" if terminal else "Jupyter kernels"


def _advice(st: AutoloadStatus, args: argparse.Namespace) -> str:
    """The exact step that flips ``st``."""
    ours = {config_path(args.prefix, False): False, config_path(args.prefix, True): True}
    if st.autoloads and st.source is not None:
        if st.source in ours:
            return f"to turn off: {_command(args, 'disable', ours[st.source])}"
        return f'to turn off: remove "{EXTENSION}" from {SECTION} in {st.source}'
    order = _search_order(st.path.parent, st.terminal)
    if st.source is None or order.index(st.path) <= order.index(st.source):
        return f"to turn on: {_command(args, 'enable', st.terminal)}"
    return f'to turn on: add "{EXTENSION}" to {SECTION}.{KEY} in {st.source}, which IPython reads before {st.path}'


def _describe(st: AutoloadStatus, args: argparse.Namespace) -> list[str]:
    where = _where(st.terminal)
    if st.problem is not None:
        return [f"{where}: unknown, {st.path} cannot be read: {st.problem}"]
    if st.autoloads:
        head = f"{where}: gpumagic autoloads"
        if st.source == st.path:
            head += f" (listed in {st.path})"
        else:
            head += f", through {st.source}"
            if not st.terminal and st.source is not None and st.source.name == TERMINAL_CONFIG:
                head += " (kernels read the terminal's config too)"
    else:
        head = f"{where}: gpumagic does not autoload"
        if st.source is not None and st.source != st.path:
            head += f": {st.source} sets {SECTION}.{KEY} without it"
            if st.listed:
                head += f" and overrides {st.path}"
        else:
            head += f" ({st.path} {'does not list it' if st.exists else 'does not exist'})"
    return [head, f"    {_advice(st, args)}"]


def _existing_dir(value: str) -> Path:
    path = Path(value).expanduser().absolute()  # printed commands then work from any folder
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"must be an existing environment folder (a sys.prefix), got {value!r}")
    return path


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--prefix",
        type=_existing_dir,
        metavar="PATH",
        default=None,
        help=f"environment to configure (default: this Python's, {sys.prefix})",
    )
    terminal = argparse.ArgumentParser(add_help=False)
    terminal.add_argument(
        "--terminal",
        action="store_true",
        help=f"edit {TERMINAL_CONFIG}, read by the `ipython` terminal and by kernels, instead of {KERNEL_CONFIG}",
    )
    parser = argparse.ArgumentParser(
        prog="python -m gpumagic.autoload",
        description="Load gpumagic automatically in every IPython kernel (or terminal) of an environment.",
        epilog=f"Files: PREFIX/etc/ipython/{KERNEL_CONFIG} and PREFIX/etc/ipython/{TERMINAL_CONFIG}. "
        "Restart running kernels to apply a change.",
    )
    sub = parser.add_subparsers(dest="action", required=True, metavar="{enable,disable,status}")
    sub.add_parser("enable", parents=[terminal, common], help=f'add "{EXTENSION}" to {SECTION}.{KEY}')
    sub.add_parser("disable", parents=[terminal, common], help=f'remove "{EXTENSION}" from {SECTION}.{KEY}')
    sub.add_parser("status", parents=[common], help="show whether kernels and terminals autoload gpumagic")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry; returns the exit code: 0 done, 1 cannot write, 2 usage or refused file."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:  # argparse has printed usage or help already
        return 0 if e.code is None else e.code if isinstance(e.code, int) else 2
    if args.action == "status":
        statuses = [status(args.prefix, terminal) for terminal in (False, True)]
        for st in statuses:
            print("\n".join(_describe(st, args)))
        return 2 if any(st.problem is not None for st in statuses) else 0

    add = args.action == "enable"
    path = config_path(args.prefix, args.terminal)
    try:
        changed = _edit(path, add=add)
    except ConfigError as e:
        print(f"gpumagic.autoload: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"gpumagic.autoload: error: cannot update {path}: {e.strerror or e}", file=sys.stderr)
        return 1
    verb = ("added to" if add else "removed from") if changed else ("already in" if add else "not in")
    print(f'"{EXTENSION}" {verb} {SECTION}.{KEY} in {path}' + ("" if changed else " (nothing changed)"))
    st = status(args.prefix, args.terminal)
    if st.autoloads != add:
        print("\n".join(["note: another config file decides it:", *_describe(st, args)]))
    elif changed:
        state = "now autoloads" if add else "no longer autoloads"
        print(f"{_where(args.terminal)}: gpumagic {state}; restart running ones to apply")
    return 0


if __name__ == "__main__":
    sys.exit(main())
