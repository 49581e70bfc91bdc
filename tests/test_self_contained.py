"""The repository is self-contained: every fixture a test reads lives under the checkout.

A clone outside this project's machines has no ``../shared`` or ``/work``; a test that reached for them would
fail there. Two checks: no test source names a path outside the checkout, and every path the fixture module
exposes is inside ``tests/fixtures`` and present.
"""

from __future__ import annotations

import re
from pathlib import Path

from tests import paths

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent

# A path leaving the checkout: a parent hop out of tests/ or the repo root, an absolute machine path, or an
# environment variable that used to point at the shared fixtures.
_OUTSIDE = [
    re.compile(r"""["'](\.\./)+shared"""),
    re.compile(r"""parents?\[\s*[2-9]\s*\]"""),  # tests/x.py -> parents[1] is the repo; [2] is beyond it
    re.compile(r"""\.parent\.parent\.parent"""),
    re.compile(r"""["']/work/"""),
    re.compile(r"""["']/home/"""),
    re.compile(r"""VIDEO_KTR_SHARED"""),
    re.compile(r"""\bparent\s*/\s*["']shared["']"""),
]


def _test_sources() -> list[Path]:
    return sorted(p for p in TESTS.rglob("*.py") if "fixtures" not in p.parts and p.name != Path(__file__).name)


def test_no_test_source_names_a_path_outside_the_checkout():
    found = []
    for path in _test_sources():
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            for pattern in _OUTSIDE:
                if pattern.search(line):
                    found.append(f"{path.relative_to(REPO)}:{n}: {line.strip()}")
    assert not found, "tests reach outside the checkout:\n" + "\n".join(found)


def test_the_audit_catches_the_old_layout():
    """The patterns above do find the forms the tests used before the fixtures moved in."""
    old = ['candidates += [_REPO.parent / "shared", Path("/work/shared")]', 'env = os.environ.get("VIDEO_KTR_SHARED")',
           'FIX = Path(__file__).parents[2] / "shared"', 'open("../shared/fixtures/real/video1.mp4")']
    for line in old:
        assert any(p.search(line) for p in _OUTSIDE), line
    assert not any(p.search('FIXTURES = Path(__file__).resolve().parent / "fixtures"') for p in _OUTSIDE)


def test_fixture_paths_are_inside_the_checkout_and_present():
    fixtures = (TESTS / "fixtures").resolve()
    for name in ("FIXTURES", "REAL_VIDEO", "BENCHMARK_FIXTURES"):
        p = Path(getattr(paths, name)).resolve()
        assert p == fixtures or fixtures in p.parents, f"{name}={p} is outside tests/fixtures"
        assert p.exists(), f"{name}={p} is missing from the checkout"
    # no symlink inside the fixtures leads out of the checkout
    for p in fixtures.rglob("*"):
        assert REPO.resolve() in p.resolve().parents, f"{p} resolves outside the checkout"
    # each benchmark named by the loaders' tests has its folder
    for bench in ("video_holmes", "videomme", "videommmu", "mmvu", "vsibench", "mvbench", "tempcompass", "video_r1_eval"):
        assert (paths.BENCHMARK_FIXTURES / bench).is_dir(), bench
