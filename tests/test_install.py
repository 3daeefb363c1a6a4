"""Tests that a fresh machine runs the README: its commands, what .ci/run does with them, and the declared dependencies."""

from __future__ import annotations

import ast
import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
#: Libraries that transformers needs only on a path we take, so nothing pulls them in for us.
TRANSFORMERS_OPTIONAL = {
    "accelerate": "from_pretrained(..., gguf_file=...) refuses to load a GGUF without it",
    "gguf": "reads GGUF checkpoints (the demo pair, SmolLM2)",
    "jinja2": "renders chat templates (apply_chat_template)",
}
#: Versions seen working on the GPU machine (H200, Python 3.12, 2026-11-29): the ranges must hold them.
GPU_MACHINE = {
    "torch": "2.11.0", "transformers": "5.17.0", "triton": "3.6.0", "accelerate": "1.15.0",
    "huggingface-hub": "1.33.0", "safetensors": "0.8.0", "numpy": "2.5.2", "matplotlib": "3.11.2",
    "tqdm": "4.70.1", "jinja2": "3.1.6", "scipy": "1.18.1", "pytest": "9.1.1", "tokenizers": "0.23.2",
}


def readme_commands() -> list[str]:
    """Return the lines of the README's first bash block."""
    match = re.search(r"^```bash\n(.*?)^```$", (ROOT / "README.md").read_text(), re.S | re.M)
    assert match, "README.md has no bash block"
    return match.group(1).splitlines()


def project() -> dict:
    """Return pyproject.toml's [project] table."""
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def requirements(group: str | None = None) -> dict[str, Requirement]:
    """Return the declared requirements by canonical name: the dependencies, or one extra (``sts[x]`` expanded)."""
    listed = project()["dependencies"] if group is None else project()["optional-dependencies"][group]
    found: dict[str, Requirement] = {}
    for requirement in map(Requirement, listed):
        if canonicalize_name(requirement.name) == canonicalize_name(project()["name"]):
            for extra in requirement.extras:
                found.update(requirements(extra))
        else:
            found[canonicalize_name(requirement.name)] = requirement
    return found


def all_requirements() -> list[Requirement]:
    """Return every declared requirement, the extras' included."""
    return [*requirements().values(), *(r for g in project()["optional-dependencies"] for r in requirements(g).values())]


# --- the README's commands and .ci/run -------------------------------------------------------


def test_readme_starts_with_the_demo_and_the_test_command() -> None:
    demo, tests = readme_commands()
    assert demo == "pip install torch==2.13.0 && pip install -e . && sts demo"
    assert tests == 'pip install torch==2.13.0 && pip install -e ".[test]" && python -m pytest -q'


STUB = '''#!{python}
"""Stands in for {name}: logs its argv and environment, then acts as the test asks."""
import json, os, sys
from pathlib import Path

name = Path(sys.argv[0]).name
cache = os.environ.get("STS_CACHE")
entry = {{"argv": [name, *sys.argv[1:]], "venv": os.environ.get("VIRTUAL_ENV"), "cache": cache,
         "cache_entries": len(os.listdir(cache)) if cache and os.path.isdir(cache) else None,
         "constraint": os.environ.get("PIP_CONSTRAINT")}}
with open(os.environ["STUB_LOG"], "a") as log:
    log.write(json.dumps(entry) + "\\n")
if name == "python3":
    assert sys.argv[1:3] == ["-m", "venv"], sys.argv
    venv = Path(sys.argv[3])
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "activate").write_text(f'export VIRTUAL_ENV="{{venv}}"\\nexport PATH="{{venv}}/bin:$PATH"\\n')
    for tool in ("pip", "python", "sts"):
        (venv / "bin" / tool).write_text(Path(__file__).read_text())
        (venv / "bin" / tool).chmod(0o755)
elif name == "python" and sys.argv[1:3] == ["-m", "pytest"]:
    print(os.environ["STUB_PYTEST_OUT"])
    sys.exit(int(os.environ["STUB_PYTEST_RC"]))
elif name == "sts":
    print("demo table")
    sys.exit(int(os.environ["STUB_DEMO_RC"]))
'''


def run_ci(tmp_path: Path, pytest_out: str = "7 passed in 0.10s", pytest_rc: int = 0, demo_rc: int = 0) -> tuple[subprocess.CompletedProcess, list[dict], Path]:
    """Return (the run, the logged calls, the repo) of .ci/run on a copy of the repo whose python3, pip, python and sts are stubs."""
    repo = tmp_path / "repo"
    (repo / ".ci").mkdir(parents=True)
    for name in (".ci/run", "README.md", "constraints.txt"):
        shutil.copy(ROOT / name, repo / name)
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    (stubs / "python3").write_text(STUB.format(python=sys.executable, name="python3, pip, python and sts"))
    (stubs / "python3").chmod(stat.S_IRWXU)
    (tmp_path / "tmp").mkdir()
    log = tmp_path / "calls.jsonl"
    env = {k: v for k, v in os.environ.items() if k not in ("STS_CACHE", "VIRTUAL_ENV", "PIP_CONSTRAINT", "STS_CI_CONSTRAINTS")}
    env.update(PATH=f"{stubs}:{env['PATH']}", STUB_LOG=str(log), TMPDIR=str(tmp_path / "tmp"), CI="true",
               STUB_PYTEST_OUT=pytest_out, STUB_PYTEST_RC=str(pytest_rc), STUB_DEMO_RC=str(demo_rc))
    run = subprocess.run(["bash", str(repo / ".ci" / "run")], cwd=tmp_path, env=env, capture_output=True, text=True,
                         stdin=subprocess.DEVNULL, timeout=60)
    calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return run, calls, repo


def shell_words(command: str) -> list[list[str]]:
    """Return the argv of each part of an ``a && b && c`` command line, as a shell splits them."""
    return [shlex.split(part) for part in command.split("&&")]


def test_ci_runs_the_readme_commands_in_new_venvs(tmp_path: Path) -> None:
    run, calls, repo = run_ci(tmp_path)
    assert run.returncode == 0, run.stderr

    demo, tests = readme_commands()
    venv_calls = [c for c in calls if c["argv"][0] == "python3"]
    assert [c["argv"][:3] for c in venv_calls] == [["python3", "-m", "venv"]] * 2
    tests_venv, demo_venv = (c["argv"][3] for c in venv_calls)
    assert tests_venv != demo_venv
    # Tests first, then the demo, each command exactly as the README has it, each in its venv.
    commands = [c for c in calls if c["argv"][0] != "python3"]
    assert [c["argv"] for c in commands] == shell_words(tests) + shell_words(demo)
    n_tests = len(shell_words(tests))
    assert {c["venv"] for c in commands[:n_tests]} == {tests_venv}
    assert {c["venv"] for c in commands[n_tests:]} == {demo_venv}
    # The tests share a cache in the repo; the demo starts from an empty cache of its own.
    assert commands[n_tests - 1]["cache"] == str(repo / ".cache")
    assert commands[-1]["cache"] not in (str(repo / ".cache"), None)
    assert commands[-1]["cache_entries"] == 0
    assert {c["constraint"] for c in commands} == {str(repo / "constraints.txt")}
    # Nothing of the run is left behind, and its last line is pytest's summary.
    assert list((tmp_path / "tmp").iterdir()) == []
    assert run.stdout.splitlines()[-1] == "7 passed in 0.10s"


@pytest.mark.parametrize(
    ("pytest_out", "pytest_rc"),
    [("no tests ran in 0.01s", 5), ("4 skipped in 0.02s", 0), ("1 failed, 3 passed in 0.05s", 1),
     ("3 passed, 1 error in 0.05s", 1)],
    ids=["no-tests-exit-5", "all-skipped", "a-test-failed", "a-teardown-error"],
)
def test_ci_fails_unless_tests_pass(tmp_path: Path, pytest_out: str, pytest_rc: int) -> None:
    run, calls, _ = run_ci(tmp_path, pytest_out=pytest_out, pytest_rc=pytest_rc)
    assert run.returncode != 0
    assert not any(c["argv"][0] == "sts" for c in calls), "the demo ran after the tests failed"


def test_ci_fails_when_the_demo_fails(tmp_path: Path) -> None:
    run, calls, _ = run_ci(tmp_path, demo_rc=2)
    assert run.returncode == 2
    assert calls[-1]["argv"] == ["sts", "demo"]


# --- declared dependencies -------------------------------------------------------------------


def imported_modules(directory: Path) -> dict[str, set[str]]:
    """Return the top-level modules that the Python files under ``directory`` import, with the files importing each."""
    modules: dict[str, set[str]] = {}
    for path in directory.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                modules.setdefault(name.split(".")[0], set()).add(str(path.relative_to(ROOT)))
    return modules


# The library may import an extra's packages (triton for the GPU kernels) but never the test tools.
LIBRARY_GROUPS = (None, *(g for g in project()["optional-dependencies"] if g != "test"))


@pytest.mark.parametrize(("directory", "groups"), [("src", LIBRARY_GROUPS), ("tests", (None, "test"))])
def test_every_import_is_declared(directory: str, groups: tuple[str | None, ...]) -> None:
    local = {"sts"} | {p.stem for p in (ROOT / "tests").glob("*.py")}
    declared = {name for group in groups for name in requirements(group)}
    providers = metadata.packages_distributions()
    missing = []
    for module, files in sorted(imported_modules(ROOT / directory).items()):
        if module in sys.stdlib_module_names or module in local:
            continue
        dists = {canonicalize_name(d) for d in providers.get(module, [])}
        if not dists & declared:
            missing.append(f"{module} (installed by {sorted(dists) or 'nothing'}; imported in {sorted(files)[0]})")
    assert not missing, f"imported but not declared in pyproject.toml ({groups}): {missing}"


@pytest.mark.parametrize("name", sorted(TRANSFORMERS_OPTIONAL))
def test_transformers_optional_paths_are_declared_and_available(name: str) -> None:
    from transformers.utils import is_accelerate_available, is_gguf_available, is_jinja_available

    assert canonicalize_name(name) in requirements(), f"declare {name}: transformers {TRANSFORMERS_OPTIONAL[name]}"
    available = {"accelerate": is_accelerate_available, "gguf": is_gguf_available, "jinja2": is_jinja_available}[name]
    assert available(), f"transformers does not find {name}: it {TRANSFORMERS_OPTIONAL[name]}"


@pytest.mark.parametrize("requirement", all_requirements(), ids=str)
def test_every_requirement_has_lower_and_upper_bounds(requirement: Requirement) -> None:
    operators = {spec.operator for spec in requirement.specifier}
    assert operators & {">=", ">", "==", "~="}, f"{requirement}: no lower bound"
    assert operators & {"<", "<=", "==", "~="}, f"{requirement}: no upper bound"


def pins(path: Path) -> dict[str, Version]:
    """Return the ``name==version`` pins of a constraints file by canonical name."""
    lines = (line.split("#")[0].strip() for line in path.read_text().splitlines())
    return {canonicalize_name(n): Version(v) for n, v in (line.split("==") for line in lines if line)}


def test_constraints_and_readme_pins_fall_within_the_ranges() -> None:
    pinned = pins(ROOT / "constraints.txt")
    for requirement in all_requirements():
        name = canonicalize_name(requirement.name)
        assert name in pinned, f"constraints.txt pins no {name}"
        assert requirement.specifier.contains(pinned[name]), f"constraints.txt: {name}=={pinned[name]} outside {requirement}"
    readme_torch = {m for line in readme_commands() for m in re.findall(r"torch==([\w.]+)", line)}
    assert readme_torch == {str(pinned["torch"])}
    assert requirements()["torch"].specifier.contains(pinned["torch"])


def test_gpu_machine_versions_fall_within_the_ranges() -> None:
    declared = {canonicalize_name(r.name): r for r in all_requirements()}
    for name, version in GPU_MACHINE.items():
        assert declared[name].specifier.contains(version), f"the GPU machine's {name} {version} is outside {declared[name]}"


def test_installed_versions_fall_within_the_ranges() -> None:
    for requirement in all_requirements():
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue
        try:
            version = metadata.version(requirement.name)
        except metadata.PackageNotFoundError:
            continue  # an extra that is not installed; imports of it are checked above
        assert requirement.specifier.contains(Version(version).public), f"installed {requirement.name} {version} outside {requirement}"
