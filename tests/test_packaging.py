"""What ``pip install`` gives: the declared requirements agree, and the wheel holds the whole library.

The wheel is built offline from a copy of the sources (``pip wheel --no-build-isolation``, so
the setuptools from requirements-test.txt does the work and nothing is downloaded), installed
into a private folder, and imported there by a separate Python that cannot see this checkout.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

try:
    import tomllib as _toml_reader
except ImportError:  # Python 3.10
    import toml as _toml_reader

REPO_ROOT = Path(__file__).resolve().parent.parent
LIBRARY = "musubi"


def _pyproject() -> dict:
    text = (REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8")
    return _toml_reader.loads(text)


def _name(requirement: str) -> str:
    """The distribution a requirement line names, normalized as PyPI compares names."""
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    assert match, f"not a requirement: {requirement!r}"
    return re.sub(r"[-_.]+", "-", match.group(1)).lower()


def _requirements_file(name: str) -> set[str]:
    names = set()
    for line in (REPO_ROOT / name).read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            assert not line.startswith("-"), f"{name}: options such as {line!r} have no pyproject.toml equivalent"
            names.add(_name(line))
    return names


def test_requirements_txt_and_pyproject_name_the_same_runtime_packages():
    declared = {_name(requirement) for requirement in _pyproject()["project"]["dependencies"]}
    listed = _requirements_file("requirements.txt")
    # torch: ComfyUI installs its own build, so requirements.txt must not ask pip for another.
    assert "torch" in declared and "torch" not in listed
    assert listed == declared - {"torch"}, (
        f"only in requirements.txt: {sorted(listed - declared)}; "
        f"only in pyproject.toml: {sorted(declared - listed - {'torch'})}"
    )


def test_requirements_test_txt_and_the_test_extra_name_the_same_packages():
    extra = {_name(requirement) for requirement in _pyproject()["project"]["optional-dependencies"]["test"]}
    listed = _requirements_file("requirements-test.txt")
    assert listed == extra, f"only in requirements-test.txt: {sorted(listed - extra)}; only in the extra: {sorted(extra - listed)}"


def test_ci_runs_the_readme_test_command_which_installs_the_test_requirements():
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    match = re.search(r"^Tests:\n+```bash\n(.+)\n```", readme, re.MULTILINE)
    assert match, "README.md: no 'Tests:' command block"
    command = match.group(1).strip()
    assert "-r requirements.txt -r requirements-test.txt" in command
    ci = (REPO_ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert any(line.strip().startswith(command + " ") or line.strip() == command for line in ci), (
        f".ci/run does not run the README's test command {command!r}"
    )


def _module_name(relative_path: str) -> str:
    parts = [LIBRARY, *Path(relative_path).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _shipped_files(package: Path) -> set[str]:
    """Source and data files of a package folder, relative to it (no caches)."""
    return {
        path.relative_to(package).as_posix()
        for path in package.rglob("*")
        if path.is_file() and path.suffix in (".py", ".json") and "__pycache__" not in path.parts
    }


# Run by a fresh Python from an empty folder, with only the installed copy ahead of site-packages:
# imports every module found in that copy and reports what it saw as JSON.
_IMPORT_EVERYTHING = r"""
import importlib, importlib.resources, json, os, sys, traceback
site = sys.argv[1]
sys.path.insert(0, site)
root = os.path.join(site, "musubi")
modules = []
for folder, subfolders, files in os.walk(root):
    subfolders[:] = sorted(d for d in subfolders if d != "__pycache__")
    parts = ["musubi", *os.path.relpath(folder, root).split(os.sep)]
    parts = [p for p in parts if p != "."]
    for file in sorted(files):
        if file.endswith(".py"):
            stem = file[:-3]
            modules.append(".".join(parts if stem == "__init__" else [*parts, stem]))
report = {"imported": {}, "failed": {}}
for name in modules:
    if name == "musubi.__main__":
        continue
    try:
        report["imported"][name] = importlib.import_module(name).__file__
    except BaseException:
        report["failed"][name] = traceback.format_exc(limit=4)
defaults = importlib.resources.files("musubi.magcache") / "defaults.json"
report["defaults"] = len(json.loads(defaults.read_text(encoding="utf-8"))) if defaults.is_file() else None
print("REPORT " + json.dumps(report))
"""


def _files_named_by(project: dict) -> list[str]:
    """The files besides the package that pyproject.toml's [project] table points at (readme, licence)."""
    found = []
    readme, license = project.get("readme"), project.get("license")
    if isinstance(readme, str):
        found.append(readme)
    for table in (readme, license):  # {file = "..."}; a licence given as an SPDX string names no file
        if isinstance(table, dict) and "file" in table:
            found.append(table["file"])
    found += [path.relative_to(REPO_ROOT).as_posix() for pattern in project.get("license-files", []) for path in REPO_ROOT.glob(pattern)]
    return found


def _run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(command, capture_output=True, text=True, **kwargs)
    assert result.returncode == 0, f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.mark.slow
def test_the_built_wheel_installs_and_imports_the_whole_library(tmp_path):
    project = _pyproject()["project"]
    # Build from a copy, so the build's scratch folders never land in (or race with) the checkout.
    source = tmp_path / "source"
    source.mkdir()
    shutil.copytree(REPO_ROOT / LIBRARY, source / LIBRARY, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("pyproject.toml", *_files_named_by(project)):
        shutil.copy2(REPO_ROOT / name, source / name)
    expected = _shipped_files(source / LIBRARY)
    assert "magcache/defaults.json" in expected

    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    pip = [sys.executable, "-m", "pip"]
    dist = tmp_path / "dist"
    _run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", str(dist), str(source)], cwd=tmp_path, env=env)
    [wheel] = dist.glob("*.whl")
    site = tmp_path / "site"
    _run([*pip, "install", "--no-deps", "--no-index", "-q", "--target", str(site), str(wheel)], cwd=tmp_path, env=env)

    installed = _shipped_files(site / LIBRARY)
    missing = sorted(expected - installed)
    assert not missing, f"files of musubi/ missing from the wheel (check [tool.setuptools] in pyproject.toml): {missing}"

    empty = tmp_path / "run"
    empty.mkdir()
    result = _run([sys.executable, "-c", _IMPORT_EVERYTHING, str(site)], cwd=empty, env=env, timeout=600)
    [line] = [line for line in result.stdout.splitlines() if line.startswith("REPORT ")]
    report = json.loads(line[len("REPORT "):])
    assert report["failed"] == {}, "\n".join(f"{name}:\n{error}" for name, error in report["failed"].items())
    assert set(report["imported"]) == {_module_name(path) for path in expected if path.endswith(".py")} - {f"{LIBRARY}.__main__"}
    outside = {name: path for name, path in report["imported"].items() if not Path(path).resolve().is_relative_to(site.resolve())}
    assert outside == {}, "modules imported from somewhere other than the installed wheel"
    assert report["defaults"], "musubi/magcache/defaults.json is missing or empty in the installed copy"
