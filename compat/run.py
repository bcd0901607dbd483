"""``make compat``: Dramatiq's own test suite, unchanged, on dramaturg's brokers.

Code written for Dramatiq must keep working on dramaturg except where dramaturg says
otherwise; Dramatiq's test suite, which nobody on this project wrote, checks that.

1. The sdist of the installed Dramatiq version is downloaded once into ``.compat/``
   (``pip download dramatiq==<version> --no-binary :all: --no-deps``).
2. Its ``tests/`` are unpacked afresh into ``.compat/dramatiq-<version>/tests``, and
   ``compat/conftest.py`` and ``compat/common.py`` (the project's: the sdist ships
   neither) are copied beside them, with ``compat/pytest.ini``.
3. pytest runs them, leaving out what ``compat/differences.toml`` lists under
   ``left_out``, and records each test's outcome.
4. The failures are compared with the ``differs`` entries of that list. Any other
   failure is run once more (some of Dramatiq's tests time what they test, and may fail
   once on a busy machine): if it fails again, the run fails (exit 1); if it passes, it
   is reported. A listed test that passes, or is no longer there, is reported so that
   the list shrinks.

Usage: ``python compat/run.py [PYTEST_ARG ...]`` (``make compat COMPAT_ARGS=...``), e.g.
``tests/test_actors.py`` or ``-k retries`` to run a part while working on it; then only
the tests that ran are compared. Exit codes: 0 as listed, 1 an unlisted failure, 2
the suite could not be fetched or run.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CACHE = ROOT / ".compat"
LIST = HERE / "differences.toml"

EXIT_OK, EXIT_UNLISTED, EXIT_BROKEN = 0, 1, 2


@dataclass
class Expectations:
    """``compat/differences.toml``: tests left out of the run, and tests that fail by design."""

    left_out: dict[str, str] = field(default_factory=dict)  # node id or file -> reason
    differs: dict[str, tuple[str, str]] = field(default_factory=dict)  # node id -> (reason, docs section)

    @classmethod
    def load(cls, path: Path) -> Expectations:
        data = tomllib.loads(path.read_text())
        expectations = cls()
        for group in data.get("left_out", []):
            for test in group["tests"]:
                expectations.left_out[test] = group["reason"]
        for group in data.get("differs", []):
            for test in group["tests"]:
                if test in expectations.differs:
                    raise SystemExit(f"compat: {path.name}: {test} is listed twice")
                expectations.differs[test] = (group["reason"], group["docs"])
        for _, docs in expectations.differs.values():
            check_docs_section(docs)
        return expectations


def check_docs_section(reference: str) -> None:
    """``docs/page.md#section`` must name a heading of that page (GitHub's anchors)."""
    page, _, anchor = reference.partition("#")
    path = ROOT / page
    if not path.is_file():
        raise SystemExit(f"compat: {LIST.name}: {reference}: no such page")
    headings = [line.lstrip("#").strip() for line in path.read_text().splitlines() if line.startswith("#")]
    anchors = {re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-") for heading in headings}
    if anchor not in anchors:
        raise SystemExit(f"compat: {LIST.name}: {reference}: no such section in {page}")


def fetch_tests(version: str) -> Path:
    """A fresh copy of the sdist's tests with the project's conftest; the directory to run in."""
    CACHE.mkdir(exist_ok=True)
    sdist = CACHE / f"dramatiq-{version}.tar.gz"
    if not sdist.exists():
        print(f"compat: downloading the sdist of dramatiq {version} into {CACHE.relative_to(ROOT)}/", flush=True)
        command = [sys.executable, "-m", "pip", "download", f"dramatiq=={version}", "--no-binary", ":all:"]
        command += ["--no-deps", "--quiet", "--dest", str(CACHE)]
        if subprocess.run(command, check=False).returncode != 0 or not sdist.exists():
            raise SystemExit(f"compat: could not download the sdist of dramatiq {version} (is PyPI reachable?)")
    run_dir = CACHE / f"dramatiq-{version}"
    shutil.rmtree(run_dir, ignore_errors=True)
    prefix = f"dramatiq-{version}/tests/"
    with tarfile.open(sdist) as archive:
        members = [m for m in archive.getmembers() if m.name.startswith(prefix) and m.isfile()]
        if not members:
            raise SystemExit(f"compat: {sdist.name} has no tests/ directory")
        for member in members:
            member.name = "tests/" + member.name[len(prefix) :]
            archive.extract(member, run_dir, filter="data")
    tests = run_dir / "tests"
    (tests / "__init__.py").touch()  # its test files import ``.common``
    shutil.copy(HERE / "conftest.py", tests / "conftest.py")
    shutil.copy(HERE / "common.py", tests / "common.py")
    shutil.copy(HERE / "pytest.ini", run_dir / "pytest.ini")
    return run_dir


def run_suite(run_dir: Path, expectations: Expectations, pytest_args: list[str]) -> dict[str, str]:
    """Run pytest in ``run_dir``; each test's outcome by node id."""
    command = []
    for test in expectations.left_out:
        command += ["--ignore", test] if test.endswith(".py") else ["--deselect", test]
    return run_pytest(run_dir, command + pytest_args)


def run_pytest(run_dir: Path, pytest_args: list[str]) -> dict[str, str]:
    results = run_dir / "outcomes.json"
    results.unlink(missing_ok=True)
    command = [sys.executable, "-m", "pytest", "-q", "--tb=short", "--continue-on-collection-errors", *pytest_args]
    # The project's own settings stay out: the fixtures say exactly which broker each test gets.
    env = {key: value for key, value in os.environ.items() if not key.startswith("DRAMATURG_")}
    env["DRAMATURG_COMPAT_RESULTS"] = str(results)
    code = subprocess.run(command, cwd=run_dir, env=env, check=False).returncode
    if code not in (0, 1) or not results.exists():  # 0 all passed, 1 some failed; else pytest broke
        raise SystemExit(f"compat: pytest could not run Dramatiq's suite (exit code {code})")
    outcomes: dict[str, str] = json.loads(results.read_text())
    return outcomes


def compare(outcomes: dict[str, str], expectations: Expectations, *, whole_suite: bool, flaky: list[str]) -> int:
    """Print how the run compares with the list; the exit code."""
    failed = {test for test, outcome in outcomes.items() if outcome == "failed"}
    unlisted = sorted(failed - set(expectations.differs))
    passing = sorted(test for test in expectations.differs if outcomes.get(test) == "passed")
    missing = sorted(test for test in expectations.differs if test not in outcomes) if whole_suite else []
    counts = {kind: sum(1 for o in outcomes.values() if o == kind) for kind in ("passed", "failed", "skipped")}
    print(
        f"\ncompat: {counts['passed']} passed, {counts['failed']} failed"
        f" ({len(failed) - len(unlisted)} as listed in compat/differences.toml), {counts['skipped']} skipped"
    )
    if passing:
        print("compat: listed as differing but passed now; remove them from compat/differences.toml (and the docs):")
        print("".join(f"  {test}\n" for test in passing), end="")
    if missing:
        print("compat: listed but not in this version's suite; remove them from compat/differences.toml:")
        print("".join(f"  {test}\n" for test in missing), end="")
    if flaky:
        print("compat: failed, then passed when run again (timing-sensitive on a busy machine; watch them):")
        print("".join(f"  {test}\n" for test in flaky), end="")
    if unlisted:
        print("compat: FAILED: these fail on dramaturg and are not listed as differences by design:")
        print("".join(f"  {test}\n" for test in unlisted), end="")
        return EXIT_UNLISTED
    return EXIT_OK


def rerun_unlisted_failures(run_dir: Path, outcomes: dict[str, str], expectations: Expectations) -> list[str]:
    """Run the unlisted failures once more; those that pass count as passed, and are returned.

    Some of Dramatiq's tests time what they test (a retry due within 200 ms of its
    backoff); on a busy machine they may fail once. A failure that repeats fails the run.
    """
    unlisted = [t for t, o in outcomes.items() if o == "failed" and t not in expectations.differs and "::" in t]
    if not unlisted:
        return []
    print(f"\ncompat: running the {len(unlisted)} unlisted failures once more", flush=True)
    again = run_pytest(run_dir, unlisted)
    flaky = sorted(test for test in unlisted if again.get(test) == "passed")
    outcomes.update({test: "passed" for test in flaky})
    return flaky


def selects_tests(pytest_args: list[str]) -> bool:
    """Whether the arguments run a part of the suite (paths, node ids, ``-k``, ``-m``)."""
    return any(not arg.startswith("-") or arg in ("-k", "-m") for arg in pytest_args)


def main(argv: list[str]) -> int:
    started = time.monotonic()
    try:
        expectations = Expectations.load(LIST)
        version = importlib.metadata.version("dramatiq")
        run_dir = fetch_tests(version)
        print(f"compat: Dramatiq {version}'s tests on dramaturg's brokers, in {run_dir.relative_to(ROOT)}", flush=True)
        outcomes = run_suite(run_dir, expectations, argv)
        flaky = rerun_unlisted_failures(run_dir, outcomes, expectations)
    except SystemExit as error:
        print(error, file=sys.stderr)
        return EXIT_BROKEN
    code = compare(outcomes, expectations, whole_suite=not selects_tests(argv), flaky=flaky)
    print(f"compat: {time.monotonic() - started:.0f} s")
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
