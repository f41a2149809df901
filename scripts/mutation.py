"""Mutation testing of the maths: apply each one-line mutation of `scripts/mutants.toml` to a
scratch copy of the repository, run the test files (or test ids) it names (`pytest -x`, a
per-mutant time limit) and record which test kills it. `make mutation` runs them all and
writes the report docs/mutation.md; not part of `make test`.

    python scripts/mutation.py [--only ID,...] [--timeout S] [--report PATH] [--list]

A mutant whose tests still pass has survived: the catalogue must then give an argument that it
is equivalent (`equivalent = "..."`), or a test must be added. A mutant with `equivalent` that
is killed anyway is reported as such. Before the mutants, every test file in the catalogue must
pass on the unmutated copy (else a kill would mean nothing).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CATALOGUE = os.path.join(ROOT, "scripts", "mutants.toml")
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "WANDB_MODE": "disabled", "PYTHONWARNINGS": "ignore"}  # fmt: skip
FAILED = re.compile(r"^(?:FAILED|ERROR) (\S+)", re.MULTILINE)


@dataclasses.dataclass(frozen=True)
class Mutant:
    id: str
    file: str
    find: str
    replace: str
    tests: tuple[str, ...]
    equivalent: str | None = None


def load_catalogue(path: str = CATALOGUE) -> list[Mutant]:
    with open(path, "rb") as f:
        entries = tomllib.load(f)["mutant"]
    mutants = [Mutant(**{**e, "tests": tuple(e["tests"])}) for e in entries]
    ids = [m.id for m in mutants]
    duplicates = {i for i in ids if ids.count(i) > 1}
    if duplicates:
        raise SystemExit(f"error: duplicate mutant ids {sorted(duplicates)}")
    return mutants


def check_anchors(mutants: list[Mutant], root: str) -> None:
    """Every `find` occurs exactly once in its file, and the mutation changes it."""
    for m in mutants:
        with open(os.path.join(root, m.file)) as f:
            count = f.read().count(m.find)
        if count != 1 or m.find == m.replace:
            raise SystemExit(f"error: mutant {m.id}: {m.find!r} occurs {count} times in {m.file}")


def scratch_copy() -> str:
    """The tracked and untracked-not-ignored files of the repository (tests, scripts and
    configs included: subprocess tests run them) in a temporary directory; .venv is linked."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    target = tempfile.mkdtemp(prefix="bd3lms-mutation-")
    for name in listed:
        source = os.path.join(ROOT, name)
        if os.path.isfile(source):
            os.makedirs(os.path.dirname(os.path.join(target, name)), exist_ok=True)
            shutil.copy2(source, os.path.join(target, name))
    os.symlink(os.path.join(ROOT, ".venv"), os.path.join(target, ".venv"))
    return target


def run_tests(root: str, tests: tuple[str, ...], timeout: int, env: dict) -> tuple[str, str]:
    """-> (outcome, detail): passed | failed (detail: the first failing test) | timeout."""
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    try:
        proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True,
                              timeout=timeout)  # fmt: skip
    except subprocess.TimeoutExpired:
        return "timeout", f"no result within {timeout} s"
    if proc.returncode == 0:
        return "passed", ""
    found = FAILED.search(proc.stdout)
    if found:
        return "failed", found.group(1)
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-1:] or ["?"]
    return "failed", f"exit {proc.returncode}: {tail[0][:120]}"


def apply(root: str, mutant: Mutant) -> str:
    path = os.path.join(root, mutant.file)
    with open(path) as f:
        original = f.read()
    with open(path, "w") as f:
        f.write(original.replace(mutant.find, mutant.replace, 1))
    return original


def report(results: list[tuple[Mutant, str, str]], seconds: float, path: str) -> None:
    killed = sum(1 for m, o, _ in results if o != "passed")
    survived = [m for m, o, _ in results if o == "passed"]
    unexplained = [m for m in survived if not m.equivalent]
    lines = [
        "# Mutation testing of the maths",
        "",
        "`make mutation` (scripts/mutation.py over scripts/mutants.toml): each mutant is one",
        "line of a formula changed in a scratch copy of the repository; the test files named for",
        "it run with `-x`. *Killed* names the first failing test. A surviving mutant carries an",
        "argument that it is equivalent (it cannot change any number the project computes).",
        "",
        f"{len(results)} mutants: {killed} killed, {len(survived)} survived "
        f"({len(survived) - len(unexplained)} argued equivalent, {len(unexplained)} not); "
        f"{seconds / 60:.1f} minutes on this machine's 2 cores.",
        "",
        "| id | file | mutation | result | killed by / why equivalent |",
        "|---|---|---|---|---|",
    ]
    for m, outcome, detail in results:
        change = f"`{_cell(m.find)}` -> `{_cell(m.replace)}`"
        if outcome == "passed":
            result, why = ("equivalent", m.equivalent) if m.equivalent else ("SURVIVED", "")
        else:
            result, why = ("killed" if outcome == "failed" else "killed (timeout)"), detail
            if m.equivalent:
                why += " (listed as equivalent, killed anyway)"
        lines.append(f"| {m.id} | {m.file} | {change} | {result} | {_cell(why)} |")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", default=None, help="comma-separated mutant ids")
    parser.add_argument("--timeout", type=int, default=240, help="seconds per mutant")
    parser.add_argument("--report", default=os.path.join(ROOT, "docs", "mutation.md"))
    parser.add_argument("--list", action="store_true", help="print the catalogue and stop")
    args = parser.parse_args(argv)
    mutants = load_catalogue()
    check_anchors(mutants, ROOT)
    if args.only:
        wanted = set(args.only.split(","))
        mutants = [m for m in mutants if m.id in wanted]
    if args.list:
        for m in mutants:
            print(f"{m.id}: {m.file}: {m.find!r} -> {m.replace!r}")
        return 0
    start = time.perf_counter()
    root = scratch_copy()
    cache = tempfile.mkdtemp(prefix="bd3lms-mutation-cache-")
    env = {**os.environ, **OFFLINE, "BD3LMS_TEST_CACHE": cache}
    try:
        files = sorted({t for m in mutants for t in m.tests})
        outcome, detail = run_tests(root, tuple(files), 20 * args.timeout, env)
        if outcome != "passed":
            print(f"error: the tests fail without any mutation: {detail}", file=sys.stderr)
            return 2
        results = []
        for i, mutant in enumerate(mutants, 1):
            original = apply(root, mutant)
            try:
                outcome, detail = run_tests(root, mutant.tests, args.timeout, env)
            finally:
                with open(os.path.join(root, mutant.file), "w") as f:
                    f.write(original)
            results.append((mutant, outcome, detail))
            print(f"[{i}/{len(mutants)}] {mutant.id}: {outcome} {detail}", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(cache, ignore_errors=True)
    seconds = time.perf_counter() - start
    if not args.only:
        os.makedirs(os.path.dirname(args.report), exist_ok=True)
        report(results, seconds, args.report)
        print(f"wrote {args.report}")
    survivors = [m.id for m, o, _ in results if o == "passed" and not m.equivalent]
    if survivors:
        print(f"surviving mutants without an equivalence argument: {', '.join(survivors)}")
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
