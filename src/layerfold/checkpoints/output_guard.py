"""Where layerfold writes: one guard for every output, atomic folders and files, and cleaning up after killed runs.

The rules (the README states them for users):

- ``--out`` may not equal, contain or lie inside any input of the command (model, teacher, student, data,
  plan, cache), after resolving symlinks and ``.``/``..``: replacing it would delete or corrupt an input.
- ``--overwrite`` replaces only what layerfold wrote (a folder holding the marker file ``.layerfold-output.json``,
  a folded checkpoint of an earlier version, a plan file, a report layerfold wrote) or an empty folder. Anything
  else is refused with a line naming what is there.
- Output is built in a hidden temporary folder beside ``--out`` (``.layerfold-XXXXXXXX.partial``, a short name so
  that any valid ``--out`` name works) and renamed into place only when complete. A run killed with SIGKILL
  leaves that folder behind; the next run writing into the same parent folder removes it and says so (and puts back
  an earlier output that a run killed in the middle of its ``--overwrite`` swap had moved aside).
- SIGTERM is handled like Ctrl-C: the run unwinds, removes its temporary folder and exits with 143.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import socket
import sys
from pathlib import Path
from typing import Iterator, Mapping, Sequence

from .. import __version__
from ..core.errors import LayerfoldError
from ..operations.plan import FoldPlan

MARKER_NAME = ".layerfold-output.json"
OWNER_NAME = ".layerfold-partial.json"
_PREFIX = ".layerfold-"
_PARTIAL = ".partial"
_OLD = ".old"
# First line of every Markdown report layerfold writes as a file of its own (plan's side file).
REPORT_HEADER = "<!-- written by layerfold -->"
# The file a heal run keeps in OUT.checkpoints (heal.py writes it): what marks that folder as layerfold's.
HEAL_SETTINGS_NAME = "heal_settings.json"


def resolved(path: str | Path) -> Path:
    """The absolute path with symlinks and ``..`` resolved (the path need not exist)."""
    return Path(os.path.abspath(os.fspath(path))).resolve()


def _describe_contents(folder: Path) -> str:
    names = sorted(p.name for p in folder.iterdir())
    shown = ", ".join(repr(n) for n in names[:3])
    return shown + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def is_layerfold_folder(folder: Path) -> bool:
    """A folder layerfold wrote: it holds the marker, or it is a folded checkpoint (earlier versions wrote no
    marker), or a heal run's checkpoint folder."""
    if (folder / MARKER_NAME).is_file() or (folder / HEAL_SETTINGS_NAME).is_file():
        return True
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(config, dict) and config.get("model_type") == "layerfold"


def is_layerfold_file(path: Path) -> bool:
    """A file layerfold wrote: a plan (YAML or JSON that parses as a FoldPlan) or a Markdown report with its header."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    if not text.strip():
        return True  # an empty file holds nothing to lose
    if text.startswith(REPORT_HEADER):
        return True
    if path.suffix in (".yaml", ".yml", ".json"):
        try:
            FoldPlan.from_json(text) if path.suffix == ".json" else FoldPlan.from_yaml(text)
        except LayerfoldError:
            return False
        return True
    return False


def check_inputs(
    out: str | Path, inputs: Mapping[str, str | Path | Sequence[str | Path] | None], *, flag: str = "--out"
) -> None:
    """Refuse an output that equals, contains or lies inside an input (each file of a list: a mix of data)."""
    target = resolved(out)
    pairs = [(role, p) for role, path in inputs.items() for p in (path if isinstance(path, (list, tuple)) else [path])]
    for role, path in pairs:
        if path is None:
            continue
        source = resolved(path)
        if target == source:
            raise LayerfoldError(f"{flag} {out} is the {role} ({path}); write somewhere else")
        if source in target.parents:
            raise LayerfoldError(f"{flag} {out} lies inside the {role} {path}; write somewhere else")
        if target in source.parents:
            raise LayerfoldError(
                f"{flag} {out} contains the {role} {path}; replacing it would delete the {role}, write somewhere else"
            )


def check_replaceable(out: str | Path, *, overwrite: bool, kind: str = "folder", flag: str = "--out") -> None:
    """Refuse an existing ``out`` unless ``overwrite`` and it is layerfold's own output (or empty)."""
    out = Path(out)
    if not (out.exists() or out.is_symlink()):
        return
    if kind == "folder":
        if not out.is_dir():
            raise LayerfoldError(f"{flag} {out} exists and is not a folder")
        if not overwrite:
            raise LayerfoldError(f"output directory already exists: {out} (pass --overwrite to replace it)")
        if any(out.iterdir()) and not is_layerfold_folder(out):
            raise LayerfoldError(
                f"{flag} {out} holds files layerfold did not write ({_describe_contents(out)}); --overwrite replaces "
                "only an empty folder or one layerfold wrote"
            )
    else:
        if out.is_dir():
            raise LayerfoldError(f"{flag} {out} is a folder; give a file name")
        if not overwrite:
            raise LayerfoldError(f"output file already exists: {out} (pass --overwrite to replace it)")
        if not is_layerfold_file(out):
            raise LayerfoldError(
                f"{flag} {out} is a file layerfold did not write; --overwrite replaces only files layerfold wrote"
            )


def check_output(
    out: str | Path,
    inputs: Mapping[str, str | Path | Sequence[str | Path] | None],
    *,
    overwrite: bool,
    kind: str = "folder",
    flag: str = "--out",
) -> Path:
    """The one output guard: fail before any slow work if ``out`` cannot be written as asked. Leftovers of killed
    runs beside ``out`` are cleaned up first (an output a killed swap moved aside is put back, and then counts)."""
    clean_stale(Path(os.path.abspath(os.fspath(out))).parent)
    check_inputs(out, inputs, flag=flag)
    check_replaceable(out, overwrite=overwrite, kind=kind, flag=flag)
    return Path(out)


# ---- leftovers of killed runs --------------------------------------------------------------------------------
def _alive(owner: dict) -> bool:
    """Whether the process that made a temporary folder may still run (on another host: assume it does)."""
    if owner.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(owner.get("pid", -1)), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True
    return True


def _owner(partial: Path) -> dict | None:
    try:
        owner = json.loads((partial / OWNER_NAME).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return owner if isinstance(owner, dict) else None


def clean_stale(parent: Path) -> list[Path]:
    """Remove the temporary folders that killed layerfold runs left in ``parent``; say so on stderr. A run killed
    between moving the old output aside and moving the new one in gets its old output back."""
    removed: list[Path] = []
    if not parent.is_dir():
        return removed
    try:
        entries = list(parent.iterdir())
    except OSError:
        return removed
    for entry in entries:
        name = entry.name
        if not (name.startswith(_PREFIX) and entry.is_dir() and not entry.is_symlink()):
            continue
        if name.endswith(_PARTIAL):
            owner = _owner(entry)
            if owner is None or _alive(owner):
                continue  # not ours, or still being written
            old = entry.with_name(name[: -len(_PARTIAL)] + _OLD)
            target = parent / str(owner.get("target", ""))
            if old.is_dir() and owner.get("target") and not target.exists():
                os.replace(old, target)  # killed mid-swap: the earlier output is still whole
                print(f"layerfold: restored {target}, which a killed run had moved aside", file=sys.stderr)
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
        elif name.endswith(_OLD):
            partial = entry.with_name(name[: -len(_OLD)] + _PARTIAL)
            if not partial.exists():  # the swap had finished; this is the replaced output
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry)
    for entry in removed:
        print(f"layerfold: removed {entry}, left by an earlier run that was killed", file=sys.stderr)
    return removed


def _temporary(parent: Path, target: str) -> Path:
    token = secrets.token_hex(4)
    tmp = parent / f"{_PREFIX}{token}{_PARTIAL}"
    tmp.mkdir()
    (tmp / OWNER_NAME).write_text(json.dumps({"target": target, "pid": os.getpid(), "host": socket.gethostname()}))
    return tmp


def write_marker(folder: Path, command: str | None = None) -> None:
    (folder / MARKER_NAME).write_text(json.dumps({"written_by": f"layerfold {__version__}", "command": command}) + "\n")


# ---- atomic outputs ------------------------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_output_dir(
    out: str | Path, *, overwrite: bool = False, inputs: Mapping[str, str | Path | None] | None = None
) -> Iterator[Path]:
    """Yield a temporary folder beside ``out`` that replaces ``out`` only when the block succeeds. ``out`` is
    checked by the output guard first (against ``inputs`` too)."""
    out = Path(out)
    check_output(out, inputs or {}, overwrite=overwrite)  # which also cleans up after killed runs
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = _temporary(out.parent, out.name)
    except OSError as err:
        raise LayerfoldError(f"cannot write output directory {out}: {err.strerror or err}") from None
    try:
        yield tmp
        check_replaceable(out, overwrite=overwrite)  # something may have appeared there meanwhile
        write_marker(tmp)
        if out.exists():
            # The owner record stays in tmp until tmp is out: a run killed between the two renames leaves tmp with
            # it beside the moved-aside output, and the next run's clean_stale puts that output back.
            old = tmp.with_name(tmp.name[: -len(_PARTIAL)] + _OLD)
            os.replace(out, old)
            try:
                os.replace(tmp, out)
            except BaseException:
                os.replace(old, out)
                raise
            (out / OWNER_NAME).unlink(missing_ok=True)
            if old.is_symlink():  # --out was a link to a folder: the link is replaced, its target left alone
                old.unlink()
            else:
                shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
            (out / OWNER_NAME).unlink(missing_ok=True)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, OSError):
            raise LayerfoldError(f"cannot write output directory {out}: {err.strerror or err}") from None
        raise


def write_files_atomically(files: Mapping[Path, str]) -> None:
    """Write several text files so that each appears whole: temporary files first, then renames."""
    temporaries: list[tuple[Path, Path]] = []
    try:
        for path, text in files.items():
            tmp = path.with_name(f"{_PREFIX}{secrets.token_hex(4)}.tmp")
            temporaries.append((tmp, path))
            tmp.write_text(text)
        for tmp, path in temporaries:
            os.replace(tmp, path)
    except OSError as err:
        raise LayerfoldError(f"cannot write {path}: {err.strerror or err}") from None
    finally:
        for tmp, _ in temporaries:
            tmp.unlink(missing_ok=True)
