"""pyproject.toml's bounds and the lowest-version check agree (issue 18: every lower bound is one that ran).

scripts/check_lowest_versions.sh installs each dependency's lower bound and runs tests; these checks keep it
meaningful without running it: every dependency has a lower bound it can install, the pinned versions that
`make setup` installs satisfy the declared ranges, and the tests the script names exist.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

tomllib = pytest.importorskip("tomllib")  # Python 3.11+ (the check script needs it too)

REPO = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
SCRIPT = (REPO / "scripts" / "check_lowest_versions.sh").read_text()


def _lowest(req: Requirement) -> Version | None:
    bounds = [Version(s.version) for s in req.specifier if s.operator in (">=", "==")]
    return min(bounds) if bounds else None


def test_every_checked_requirement_has_a_lower_bound_inside_its_range():
    checked = PROJECT["dependencies"] + PROJECT["optional-dependencies"]["peft"]
    for line in checked:
        req = Requirement(line)
        low = _lowest(req)
        assert low is not None, f"{req.name}: no lower bound, so the lowest-version check cannot install it"
        assert req.specifier.contains(low, prereleases=True), f"{req.name}: {low} is outside {req.specifier}"


def test_the_pinned_versions_satisfy_the_declared_ranges():
    declared = {}
    for line in PROJECT["dependencies"] + [x for extra in PROJECT["optional-dependencies"].values() for x in extra]:
        req = Requirement(line)
        declared.setdefault(req.name.lower().replace("_", "-"), []).append(req.specifier)
    pins = re.findall(r"^([A-Za-z0-9_.\-]+)==(\S+)", (REPO / "requirements-cpu.txt").read_text(), re.M)
    assert len(pins) > 10
    for name, version in pins:
        for spec in declared.get(name.lower().replace("_", "-"), []):
            assert spec.contains(Version(version), prereleases=True), f"requirements-cpu.txt: {name}=={version} not in {spec}"


def test_the_script_runs_tests_that_exist():
    named = re.findall(r"tests/(test_\w+\.py)(?:::(\w+))?", SCRIPT)
    assert len(named) >= 8
    for file, func in named:
        source = (REPO / "tests" / file).read_text()
        assert not func or re.search(rf"^def {func}\(", source, re.M), f"{file}::{func} is gone"
