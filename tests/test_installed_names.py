"""The check at import that `events`, `store`, `actors` and `adapters` are microtune's own.

Real collisions, offline: a copy of the four packages in a temporary folder stands for
site-packages, beside the metadata of a distribution that installs the same name (as Events,
store, actors and adapters on PyPI do), and a fresh interpreter imports from it.
README "Installed names".
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from events import _distribution

REPO = Path(__file__).resolve().parent.parent


def _site(tmp_path: Path) -> Path:
    """A stand-in for site-packages holding a copy of microtune's four packages."""
    site = tmp_path / "site-packages"
    for name in _distribution.NAMES:
        shutil.copytree(REPO / name, site / name, ignore=shutil.ignore_patterns("__pycache__"))
    return site


def _fake_dist(
    site: Path, name: str, version: str, files: dict[str, str], top_level: bool = True
) -> None:
    """Install a distribution the way pip leaves it: its files, then its metadata folder."""
    meta = site / f"{name}-{version}.dist-info"
    meta.mkdir()
    (meta / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    for path, text in files.items():
        (site / path).parent.mkdir(parents=True, exist_ok=True)
        (site / path).write_text(text)
    record = [f"{path},sha256=x,{len(text)}" for path, text in files.items()]
    (meta / "RECORD").write_text("\n".join([*record, f"{meta.name}/RECORD,,"]) + "\n")
    if top_level:
        tops = sorted({p.split("/")[0].removesuffix(".py") for p in files})
        (meta / "top_level.txt").write_text("\n".join(tops) + "\n")


def _run(code: str, *path: Path, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`code` in a fresh interpreter whose sys.path starts with `path`."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(p) for p in path)}
    return subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        cwd=cwd or path[0],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_this_environment_has_no_collision():
    assert _distribution.shadowed() == []
    assert _distribution.claimed_elsewhere() == []


def test_a_distribution_installed_over_microtune_is_named(tmp_path: Path):
    # Events 0.5 ships events/__init__.py (overwriting microtune's), events/events.py and
    # events/tests/; microtune's library code would still import, `from events import Event`
    # would fail with "cannot import name 'Event'"
    site = _site(tmp_path)
    _fake_dist(
        site,
        "Events",
        "0.5",
        {
            "events/__init__.py": "from .events import Events\n",
            "events/events.py": "class Events: ...\n",
            "events/tests/__init__.py": "",
        },
    )
    for code in ("import actors", "import store", "import adapters.cli"):
        run = _run(code, site)
        assert run.returncode != 0, code
        err = run.stderr
        assert "InstalledNameError" in err, err
        assert "`events` is also installed by Events 0.5" in err, err
        assert str(site / "Events-0.5.dist-info") in err
        assert "virtual environment of its own" in err
        assert "--force-reinstall" in err
        assert "cannot import name" not in err


def test_a_distribution_installed_before_microtune_is_named(tmp_path: Path):
    # microtune installed last: its files won, the other distribution is broken and
    # uninstalling it would delete microtune's store/__init__.py. Metadata from RECORD only
    # (no top_level.txt), as wheels built by other back ends than setuptools have.
    site = _site(tmp_path)
    _fake_dist(
        site, "store", "2020.2.10", {"store/__init__.py": "", "store/database.py": ""}, False
    )
    run = _run("import events", site)
    assert run.returncode != 0
    assert "`store` is also installed by store 2020.2.10" in run.stderr, run.stderr


def test_a_module_earlier_on_sys_path_is_named(tmp_path: Path):
    # a script's own events.py beside it: sys.path[0] is the working directory here
    (tmp_path / "events.py").write_text("EVENTS = []\n")
    run = _run("import actors", tmp_path, REPO)
    assert run.returncode != 0
    assert "microtune cannot import its own `events`" in run.stderr, run.stderr
    assert str(tmp_path / "events.py") in run.stderr
    assert "comes first on sys.path" in run.stderr

    # the same for a sibling: `events` is microtune's, `store` is not
    (tmp_path / "events.py").unlink()
    (tmp_path / "store").mkdir()
    (tmp_path / "store" / "__init__.py").write_text("")
    run = _run("import events", tmp_path, REPO)
    assert run.returncode != 0
    assert f"`store` is imported from {tmp_path / 'store' / '__init__.py'}" in run.stderr
    assert "Rename that module or folder" in run.stderr


def test_an_init_deleted_by_another_uninstall_is_named(tmp_path: Path):
    # `pip uninstall Events` deletes events/__init__.py, which both installed: what is left
    # of microtune's `events` imports as a namespace package
    site = _site(tmp_path)
    (site / "actors" / "__init__.py").unlink()
    run = _run("import events", site)
    assert run.returncode != 0
    assert f"{site / 'actors' / '__init__.py'} is missing" in run.stderr, run.stderr


def test_a_clean_copy_imports(tmp_path: Path):
    site = _site(tmp_path)
    _fake_dist(site, "eventsourcing", "9.0", {"eventsourcing/__init__.py": ""})
    run = _run("import events, store; print(events.__file__)", site)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == str(site / "events" / "__init__.py")


@pytest.mark.parametrize(
    ("line", "claimed"),
    [
        ("events/__init__.py,sha256=x,1", {"events"}),
        ("store.py,sha256=x,1", {"store"}),
        ("adapters.cpython-311-x86_64-linux-gnu.so,sha256=x,1", {"adapters"}),
        ("actors/internal/cell.py,sha256=x,1", {"actors"}),
        # not these: another name that starts alike, a metadata folder, a nested package
        ("events_extra/__init__.py,sha256=x,1", set()),
        ("store.backends-1.0.dist-info/RECORD,,", set()),
        ("storage.py,sha256=x,1", set()),
        ("pkg/events/__init__.py,sha256=x,1", set()),
    ],
)
def test_record_lines(tmp_path: Path, line: str, claimed: set[str]):
    meta = tmp_path / "other-1.0.dist-info"
    meta.mkdir()
    (meta / "RECORD").write_text(f"other/__init__.py,sha256=x,1\n{line}\n")
    assert _distribution._claimed(str(meta)) == claimed


def test_the_check_is_cheap():
    # once per process at import; a generous bound that a scan of every installed
    # distribution's file list (importlib.metadata.packages_distributions, ~70 ms) breaks
    best = min(_timed(_distribution.check) for _ in range(5))
    assert best < 0.02, f"{best * 1e3:.1f} ms"


def _timed(f: Callable[[], object]) -> float:
    t = time.perf_counter()
    f()
    return time.perf_counter() - t
