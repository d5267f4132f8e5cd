"""diffserve/envs.py is the one place that reads the environment: every variable declared there with its
type and default, the README's table the same list, and nothing else in the package reading os.environ."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from diffserve import envs

ROOT = Path(__file__).resolve().parents[2]


def test_readme_table_lists_every_diffserve_variable():
    readme = (ROOT / "README.md").read_text()
    table = set(re.findall(r"^\| `(DIFFSERVE_[A-Z_]+)` \|", readme, re.M))
    declared = {name for name in envs.VARIABLES if name.startswith("DIFFSERVE_")}
    assert table == declared
    mentioned = set(re.findall(r"DIFFSERVE_[A-Z_]+", readme))
    assert mentioned <= declared, mentioned - declared  # no documented variable that nothing reads


def test_only_envs_reads_the_environment():
    offenders = []
    for path in (ROOT / "diffserve").rglob("*.py"):
        if path.name == "envs.py" and path.parent.name == "diffserve":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#")[0]
            if "getenv" in code:
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
            elif "os.environ" in code:
                # Writes that configure a third-party library are allowed, each with a comment saying why.
                write = re.search(r"os\.environ(\[[^]]+\]\s*=[^=]|\.update\()", code)
                commented = "#" in line or "# " in path.read_text().splitlines()[number - 2]
                if not (write and commented):
                    offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_booleans_parse_one_way(monkeypatch):
    for text, value in (("1", True), ("TRUE", True), ("on", True), ("0", False), ("No", False), ("", True)):
        monkeypatch.setenv("DIFFSERVE_CUDA_GRAPHS", text)
        assert envs.DIFFSERVE_CUDA_GRAPHS is value, text
    monkeypatch.setenv("DIFFSERVE_CUDA_GRAPHS", "maybe")
    with pytest.raises(envs.EnvError, match="DIFFSERVE_CUDA_GRAPHS='maybe'"):
        envs.check_all()
    monkeypatch.delenv("DIFFSERVE_CUDA_GRAPHS")
    assert envs.DIFFSERVE_CUDA_GRAPHS is True  # the declared default


def test_choices_and_integers(monkeypatch):
    monkeypatch.setenv("DIFFSERVE_PLATFORM", "ROCm")
    assert envs.DIFFSERVE_PLATFORM == "rocm"
    monkeypatch.setenv("DIFFSERVE_PLATFORM", "tpu")
    with pytest.raises(envs.EnvError, match="choose one of cuda, rocm, xpu, cpu"):
        envs.get("DIFFSERVE_PLATFORM")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert envs.WORLD_SIZE == 4
    monkeypatch.setenv("WORLD_SIZE", "four")
    with pytest.raises(envs.EnvError, match="expected an integer"):
        envs.get("WORLD_SIZE")
    with pytest.raises(AttributeError):
        _ = envs.DIFFSERVE_NOT_DECLARED
