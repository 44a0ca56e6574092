"""Are `events`, `store`, `actors` and `adapters` here microtune's own? Checked on import.

microtune installs these four as top-level packages, and PyPI has distributions that install
the same names (Events, store, actors, adapters). pip does not check for conflicting files:
both are written into the same folder, the one installed last overwrites the other's files,
and uninstalling either deletes files of the other. A module or folder of the same name that
comes first on sys.path (a script's own `events.py`) shadows microtune's instead. Either way
the first symptom used to be an unrelated `cannot import name ...` far from the cause, or
none at all. Each of the four packages imports this module first, so the import fails at once
with an error that names the other distribution or file and says what to do.

Importing this module runs the check once per process; it costs about 0.2 ms where the names
are not installed into site-packages (an editable install) and about 1-2 ms where they are
(README "Installed names"). It reads no metadata of path entries that hold none of the names.
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
from collections.abc import Iterable, Sequence
from typing import Literal, NamedTuple

NAMES = ("events", "store", "actors", "adapters")
DISTRIBUTION = "microtune"
# the folder that holds the four packages: site-packages, or the repository for an
# editable install
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# what a path entry holds if one of the names is installed there: a package or a module
_FILES = [f for n in NAMES for f in (n, n + ".py")]
# a RECORD line installing one of the names: a package folder, a module or an extension
_RECORD_CLAIM = re.compile(
    rb"\n(" + b"|".join(n.encode() for n in NAMES) + rb")(?:/|\.py,|\.[^,/]*\.(?:so|pyd),)"
)


class InstalledNameError(ImportError):
    """One of microtune's top-level names is provided, overwritten or shadowed by another."""


class Collision(NamedTuple):  # not a dataclass: that costs 0.6 ms more at import
    name: str
    # "distribution": another distribution installs the name; "shadowed": another module or
    # package is imported under it; "missing": microtune's __init__.py is gone
    kind: Literal["distribution", "shadowed", "missing"]
    where: str  # the other distribution's metadata folder, or the path imported instead


def _spec_origin(name: str) -> tuple[str | None, list[str]]:
    """Where the import system takes `name` from now: its file and its search locations."""
    module = sys.modules.get(name)
    try:
        spec = (
            getattr(module, "__spec__", None)
            if module is not None
            else importlib.util.find_spec(name)
        )
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        return None, []
    return spec.origin, list(spec.submodule_search_locations or [])


def _same_file(path: str, expected: str) -> bool:
    if path == expected:
        return True
    try:  # the same file through a symlinked site-packages (lib64 -> lib)
        return os.path.samefile(path, expected)
    except OSError:
        return False


def shadowed(root: str = ROOT) -> list[Collision]:
    """Names that import from somewhere other than microtune's folder beside this one."""
    found = []
    for name in NAMES:
        own = os.path.join(root, name)
        origin, locations = _spec_origin(name)
        if origin is None and any(_same_file(p, own) for p in locations):
            found.append(Collision(name, "missing", os.path.join(own, "__init__.py")))
        elif origin is None or not _same_file(origin, os.path.join(own, "__init__.py")):
            found.append(Collision(name, "shadowed", origin or ", ".join(locations) or "-"))
    return found


def _claimed(meta: str) -> set[str]:
    """The names among NAMES that the distribution with metadata folder `meta` installs."""
    # top_level.txt (setuptools) is short and also names what an editable install maps;
    # otherwise RECORD, the list of installed files that every wheel install writes
    for filename in ("top_level.txt", "RECORD"):
        try:
            with open(os.path.join(meta, filename), "rb") as f:
                data = f.read()
        except OSError:
            continue
        if filename == "top_level.txt":
            return {n for n in data.decode("utf-8", "replace").split() if n in NAMES}
        return {m.group(1).decode() for m in _RECORD_CLAIM.finditer(b"\n" + data)}
    return set()


def _project(meta: str) -> str:
    """The normalized project name of `{name}-{version}.dist-info`, `{name}.egg-info`..."""
    stem = os.path.basename(meta).removesuffix(".dist-info").removesuffix(".egg-info")
    return stem.split("-")[0].replace("_", "-").replace(".", "-").lower()


def claimed_elsewhere(paths: Iterable[str] | None = None) -> list[Collision]:
    """Names that another installed distribution also installs.

    Only path entries that hold one of the names are read: a distribution can only have
    written over microtune's files, or be shadowed by them, there.
    """
    found = []
    for entry in sys.path if paths is None else paths:
        folder = entry or "."
        # a few stat calls, cheaper than listing site-packages, which is done only here
        if not any(os.path.exists(os.path.join(folder, f)) for f in _FILES):
            continue
        try:
            with os.scandir(folder) as it:
                metas = [e.path for e in it if e.name.endswith((".dist-info", ".egg-info"))]
        except OSError:  # a zip file
            continue
        for meta in metas:
            if _project(meta) != DISTRIBUTION:
                found.extend(Collision(n, "distribution", meta) for n in sorted(_claimed(meta)))
    return found


def _describe(meta: str) -> str:
    """`Events 0.5` from a metadata folder (only on the error path, so the cost is moot)."""
    from importlib.metadata import PathDistribution
    from pathlib import Path

    try:
        dist = PathDistribution(Path(meta))
        return f"{dist.metadata['Name'] or _project(meta)} {dist.version}"
    except Exception:  # a broken metadata folder still names a distribution
        return _project(meta)


def message(collisions: Sequence[Collision], root: str = ROOT) -> str:
    names = "`, `".join(NAMES)
    lines = [
        "microtune cannot be imported here: the top-level names it installs "
        f"(`{names}`) are used by something else too:"
    ]
    advice = []
    for c in collisions:
        own = os.path.join(root, c.name)
        if c.kind == "distribution":
            other = _describe(c.where)
            lines.append(
                f"  - `{c.name}` is also installed by {other} ({c.where}). pip does not check "
                "for this: files the two share are overwritten by the one installed last, and "
                "uninstalling either deletes them."
            )
            advice.append(
                "Give microtune a virtual environment of its own (python -m venv DIR, then "
                f"DIR/bin/pip install microtune). Uninstalling {other} here deletes the files "
                "microtune shares with it: reinstall microtune afterwards (pip install "
                "--force-reinstall microtune)."
            )
        elif c.kind == "missing":
            lines.append(
                f"  - {c.where} is missing: uninstalling another distribution that installed "
                f"`{c.name}` into the same folder deletes it."
            )
            advice.append("Reinstall microtune: pip install --force-reinstall microtune.")
        else:
            lines.append(
                f"  - `{c.name}` is imported from {c.where}, not from microtune's {own}: it "
                "comes first on sys.path."
            )
            advice.append("Rename that module or folder, or start Python from another directory.")
    lines.extend(dict.fromkeys(advice))  # each piece of advice once, in order
    lines.append('README "Installed names" says more.')
    return "\n".join(lines)


def check(paths: Iterable[str] | None = None, root: str = ROOT) -> None:
    collisions = shadowed(root) + claimed_elsewhere(paths)
    if collisions:
        raise InstalledNameError(message(collisions, root), name=DISTRIBUTION)


check()
