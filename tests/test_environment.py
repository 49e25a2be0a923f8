"""The environment the tests run in is the lock, and pyproject's ranges agree with it.

`make test` (and so CI) passes the lock it installed from in MIDTUNE_LOCK; run by hand without it, the comparison
with the lock is skipped (an embedder's `pip install .` environment need not be the lock).
"""

from __future__ import annotations

import os
import re
from importlib import metadata
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]


def lock_pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9._-]+)==([^ \\]+)", line)
        if m:
            pins[canonicalize_name(m[1])] = m[2]
    return pins


def installed() -> dict[str, str]:
    return {canonicalize_name(d.metadata["Name"]): d.version for d in metadata.distributions()}


def project_requirements(extras: tuple[str, ...] = ("dev",)) -> list[Requirement]:
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    for extra in extras:
        reqs += [Requirement(r) for r in project["optional-dependencies"][extra]]
    env = default_environment()
    return [r for r in reqs if r.marker is None or r.marker.evaluate(env)]


def the_lock() -> Path:
    """The lock under test: `make test` names it (under `make lock`, the candidate), else the repository's."""
    return Path(os.environ.get("MIDTUNE_LOCK", ROOT / "requirements.lock"))


def test_lock_pins_every_package_with_hashes():
    text = the_lock().read_text()
    pins = lock_pins(the_lock())
    # every entry is `name==version \` followed by at least one hash line
    entries = re.findall(r"^([A-Za-z0-9._-]+)==\S+ \\\n((?:    --hash=sha256:[0-9a-f]{64}(?: \\)?\n)+)", text, re.M)
    assert len(entries) == len(pins) > 100
    for req in project_requirements():
        assert canonicalize_name(req.name) in pins, f"{req.name} (pyproject) is missing from requirements.lock"


def test_pyproject_ranges_accept_the_locked_versions():
    # `pip install .` without the lock must be able to pick what the tests passed with
    pins = lock_pins(the_lock())
    for req in project_requirements():
        version = pins[canonicalize_name(req.name)]
        assert req.specifier.contains(version, prereleases=True), f"pyproject's {req} excludes the locked {version}"


def test_pyproject_excludes_the_known_broken_filelock():
    # lmms-eval 0.7.3's evaluator imports filelock._api, which filelock 4.3 removed
    filelock = next(r for r in project_requirements(()) if r.name == "filelock")
    assert not filelock.specifier.contains("4.3.0") and not filelock.specifier.contains("4.3.1")
    assert filelock.specifier.contains("4.2.12")


def test_lmms_eval_evaluator_imports():
    # the import that filelock 4.3 broke: every lmms-eval run died on it before evaluating anything
    import lmms_eval.evaluator  # noqa: F401


@pytest.mark.skipif("MIDTUNE_LOCK" not in os.environ, reason="run through `make test`, which names the lock")
def test_environment_is_exactly_the_lock():
    pins = lock_pins(Path(os.environ["MIDTUNE_LOCK"]))
    if "MIDTUNE_MODELS_LOCK" in os.environ:  # weights shipped as packages, installed without their dependencies
        pins.update(lock_pins(Path(os.environ["MIDTUNE_MODELS_LOCK"])))
    have = installed()
    wrong = {name: (have.get(name), version) for name, version in pins.items() if have.get(name) != version}
    extra = sorted(set(have) - set(pins) - {"midtune"})
    assert not wrong, f"installed vs locked: {wrong}"
    assert not extra, f"installed but not in the lock: {extra}"
