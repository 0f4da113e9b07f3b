"""The distribution: build the wheel, check the folder mapping, install it away from the repo.

``passes/`` and ``backends/`` live at the top of the repository but install as
``graphpeft.passes`` and ``graphpeft.backends``; this test proves the wheel gets that right by
importing the installed copy in a subprocess that cannot see the source tree.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# source folder -> package it installs as (mirrors [tool.setuptools.package-dir] in pyproject.toml)
MAPPING = {"graphpeft": "graphpeft", "passes": "graphpeft/passes", "backends": "graphpeft/backends"}
IGNORE = shutil.ignore_patterns(".venv", ".git", "*.egg-info", "build", "dist", "demo_out", "out",
                                "__pycache__", "*.onnx", "*.onnx.data", ".pytest_cache")


def _wheel_tooling() -> list[str] | None:
    """The command that builds a wheel without network access, or None if the tooling is missing."""
    try:
        import setuptools  # noqa: F401
    except ImportError:
        return None
    has_bdist_wheel = (importlib.util.find_spec("setuptools.command.bdist_wheel") is not None
                       or importlib.util.find_spec("wheel") is not None)
    if not has_bdist_wheel:
        return None
    if importlib.util.find_spec("build") is not None:
        return [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir"]
    if importlib.util.find_spec("pip") is not None:
        return [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                "--wheel-dir"]
    return None


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kw)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    build_cmd = _wheel_tooling()
    if build_cmd is None:
        pytest.skip("wheel tooling missing (needs setuptools with bdist_wheel, and build or pip)")
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    # build from a copy: the shared working tree gets no build/ or egg-info side effects
    shutil.copytree(REPO, src, ignore=IGNORE)
    dist = tmp / "dist"
    if "build" in build_cmd:
        _run(build_cmd + [str(dist)], cwd=src)
    else:
        _run(build_cmd + [str(dist), str(src)], cwd=tmp)
    wheels = list(dist.glob("graphpeft-*.whl"))
    assert len(wheels) == 1, f"expected one wheel, got {wheels}"
    return wheels[0]


def test_wheel_contents(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    for must in ("graphpeft/__init__.py", "graphpeft/cli.py", "graphpeft/passes/adapters/insert_lora.py",
                 "graphpeft/backends/onnx/export.py"):
        assert must in names, f"{must} missing from the wheel"
    # every module of the three source folders is shipped under its package name (a new
    # sub-package that pyproject.toml does not list fails here)
    missing = []
    for folder, package in MAPPING.items():
        for path in (REPO / folder).rglob("*.py"):
            if "__pycache__" in path.parts:
                continue
            rel = path.relative_to(REPO / folder).as_posix()
            if f"{package}/{rel}" not in names:
                missing.append(f"{folder}/{rel}")
    assert not missing, f"not in the wheel (add the package to pyproject.toml): {missing}"
    assert not any(n.startswith(("passes/", "backends/", "tests/", "examples/")) for n in names)
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "graphpeft = graphpeft.cli:main" in text


def test_installed_wheel_imports_outside_the_repo(wheel: Path, tmp_path: Path) -> None:
    target = tmp_path / "site"
    _run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--quiet",
          "--target", str(target), str(wheel)])
    # the dependencies come from this interpreter's paths (site-packages and any .pth-added
    # folders), minus the repository's source folders (a venv inside the repository is fine)
    prefix = Path(sys.prefix).resolve()

    def is_source(p: str) -> bool:
        rp = Path(p).resolve()
        return rp.is_relative_to(REPO) and not rp.is_relative_to(prefix)

    deps = [p for p in dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], *sys.path])
            if p and os.path.isdir(p) and not is_source(p)]
    code = textwrap.dedent(f"""
        import json, sys
        sys.path[:0] = {[str(target)] + deps!r}
        import graphpeft as gp
        import graphpeft.passes, graphpeft.backends.onnx
        from graphpeft.registry import BACKENDS, RULES, get_method
        from graphpeft.cli import main
        print(json.dumps({{
            "files": [gp.__file__, graphpeft.passes.__file__, graphpeft.backends.onnx.__file__],
            "lora_rule": RULES.get("lora") is gp.LoRA,
            "lora_method": get_method("lora") is not None,
            "onnx_backend": "onnx" in BACKENDS,
            "repo_on_path": any(p.rstrip("/") == {str(REPO)!r} for p in sys.path),
            "cli": main(["version"]),
        }}))
    """)
    # -I: no PYTHONPATH, no user site, no script folder; -S: no site-packages .pth files, so the
    # repository's editable install cannot shadow the installed copy
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    proc = _run([sys.executable, "-I", "-S", "-c", code], cwd=tmp_path, env=env)
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    for f in info["files"]:
        assert Path(f).resolve().is_relative_to(target.resolve()), f"{f} was not imported from the installed wheel"
    assert info["lora_rule"] and info["lora_method"] and info["onnx_backend"]
    assert not info["repo_on_path"]
    assert info["cli"] == 0
