"""constraints.txt pins what pyproject.toml asks for, at versions its ranges admit, and the
environment the suite runs in is the locked one (unless `make test-latest` says otherwise)."""

from __future__ import annotations

import os

import pytest
from packaging.utils import canonicalize_name

from tests.lockfile import LOCK, installed_closure, is_unpinned, project_requirements, read_lock


@pytest.mark.timeout(30)
def test_every_requirement_of_pyproject_is_pinned_inside_its_range():
    pins = read_lock()
    problems = []
    for req in project_requirements():
        name = canonicalize_name(req.name)
        if is_unpinned(name):
            assert name not in pins, f"{req.name} must stay out of {LOCK.name}: the Makefile chooses it"
            continue
        if name not in pins:
            problems.append(f"{req.name} is not pinned")
        elif not req.specifier.contains(pins[name], prereleases=True):
            problems.append(f"{req.name}=={pins[name]} is outside pyproject's {req.specifier}")
    assert not problems, f"{LOCK.name} disagrees with pyproject.toml (run `make lock`): {problems}"


@pytest.mark.timeout(30)
def test_the_lock_pins_nothing_it_must_not():
    pins = read_lock()
    assert not [name for name in pins if is_unpinned(name)]
    assert list(pins) == sorted(pins)


@pytest.mark.timeout(60)
@pytest.mark.skipif(bool(os.environ.get("FTDIFF_UNPINNED")), reason="make test-latest: newest releases")
def test_the_suite_runs_on_the_locked_versions():
    """Every package the project and its extras reach is locked, and installed at its pin."""
    pins = read_lock()
    installed = installed_closure(project_requirements())
    missing = sorted(set(installed) - set(pins))
    assert not missing, f"installed but not in {LOCK.name} (run `make lock`): {missing}"
    off = {n: (v, pins[n]) for n, v in installed.items() if v != pins[n]}
    assert not off, f"installed versions differ from {LOCK.name} (reinstall with `make install-test`): {off}"
