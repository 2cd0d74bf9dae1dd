"""The repository's image built and run without a Docker engine.

buildah builds the Dockerfile daemonless (chroot isolation) on a Python 3.11 base that
debootstrap makes from Debian bookworm's own packages (its python3 is 3.11), since no
container registry is reachable; pip inside the build is given this machine's package
sources (the host's pip settings, its local wheel folders mounted read-only). The image then
runs as a container would: its own command, user, environment and working directory, the
compose file's volumes, in a network namespace of its own (its port 8000 is its own, reached
from here through a veth pair, as Docker publishes a port).

Everything lives in one storage folder that the caller deletes; the debootstrap base is
kept between runs on the same machine for one day (a tarball keyed by suite, packages, date).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import importlib.metadata
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SUITE = "bookworm"  # Debian 12: python3 is 3.11, the Python the Dockerfile is written for
MIRROR = "http://deb.debian.org/debian"
BASE_PACKAGES = ("python3", "python3-venv", "ca-certificates")
PYPI = "https://pypi.org/simple"
PYTORCH_INDEX = "https://download.pytorch.org/whl"
BASE_CACHE = (
    Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "midserve-tests" / "image"
)
NICE = ["nice", "-n", "10"]  # the build shares the machine's cores with everything else


def run(cmd: Sequence[str], timeout_s: float = 120, **kw: Any) -> str:
    """``cmd``'s stdout; a failure raises with its stderr."""
    res = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout_s, **kw)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited with {res.returncode}: {res.stderr[-3000:]}")
    return res.stdout.strip()


def storage_driver(folder: Path) -> str:
    """overlay where the kernel has it and the folder is not on overlayfs itself (inside a
    container): layers are then shared, not copied; else vfs, which copies every layer."""
    kernel = Path("/proc/filesystems").read_text()
    fs_type = run(["stat", "-f", "-c", "%T", str(folder)])
    return "overlay" if "overlay" in kernel and fs_type != "overlayfs" else "vfs"


class Buildah:
    """buildah on a storage folder of its own (nothing touches the machine's image store)."""

    def __init__(self, exe: str, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.driver = storage_driver(folder)
        self.prefix = [exe, "--root", str(folder / "storage"), "--runroot", str(folder / "run"),
                       "--storage-driver", self.driver]  # fmt: skip

    def cmd(self, *args: str) -> list[str]:
        return [*self.prefix, *args]

    def __call__(self, *args: str, timeout_s: float = 300) -> str:
        return run(self.cmd(*args), timeout_s=timeout_s)

    def remove_everything(self) -> None:
        """Containers unmounted and removed, then the whole storage folder deleted, in the
        background: tens of thousands of files, a minute of disk time the suite need not
        wait for (nothing reads the folder again)."""
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
            self("rm", "--all")
        mounts = [ln.split()[1] for ln in Path("/proc/mounts").read_text().splitlines()]
        for point in sorted((m for m in mounts if m.startswith(str(self.folder))), reverse=True):
            subprocess.run(["umount", "--lazy", point], check=False)
        trash = self.folder.with_name(self.folder.name + ".deleting")
        self.folder.rename(trash)
        # sh returns at once; rm goes on as an orphan, so no Popen is left unwaited
        run(["sh", "-c", 'nice -n 10 rm -rf "$1" >/dev/null 2>&1 &', "sh", str(trash)])


def make_base(buildah: Buildah, debootstrap: str, tag: str, log: Path) -> str:
    """A Debian ``SUITE`` minbase with python3 (3.11) and venv, committed as ``tag``; from
    today's cached tarball when there is one. Returns where it came from."""
    key = f"debian-{SUITE}-{'+'.join(BASE_PACKAGES)}-{dt.date.today():%Y%m%d}.tar"
    cached = BASE_CACHE / key
    ctr = buildah("from", "scratch")
    rootfs = Path(buildah("mount", ctr))
    try:
        if cached.is_file():
            run(["tar", "--numeric-owner", "-C", str(rootfs), "-xf", str(cached)])
            origin = f"cached {cached}"
        else:
            with open(log, "wb") as out:
                res = subprocess.run(
                    [*NICE, debootstrap, "--variant=minbase",
                     f"--include={','.join(BASE_PACKAGES)}", SUITE, str(rootfs), MIRROR],
                    stdout=out, stderr=subprocess.STDOUT, timeout=900,
                )  # fmt: skip
            if res.returncode != 0:
                raise RuntimeError(f"debootstrap failed ({res.returncode}): see {log}")
            # what python:3.11-slim leaves out too: downloaded packages and package lists
            for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
                for path in (rootfs / junk).glob("*"):
                    if path.is_file():
                        path.unlink()
            BASE_CACHE.mkdir(parents=True, exist_ok=True)
            for old in BASE_CACHE.glob(f"debian-{SUITE}-*.tar"):
                old.unlink()
            partial = cached.with_suffix(".partial")
            run(["tar", "--numeric-owner", "-C", str(rootfs), "-cf", str(partial), "."])
            partial.replace(cached)
            origin = f"debootstrap {SUITE} from {MIRROR}"
    finally:
        buildah("umount", ctr)
    buildah("commit", "--quiet", ctr, tag)
    buildah("rm", ctr)
    return origin


def pip_settings() -> dict[str, str]:
    """This interpreter's effective pip settings, as ``section.key``: the config files'
    values, then the ``PIP_*`` environment's (which win, as in pip) under ``global``."""
    out = run([sys.executable, "-m", "pip", "config", "list"])
    files: dict[str, str] = {}
    env: dict[str, str] = {}
    for line in out.splitlines():
        name, _, value = line.partition("=")
        value = value.strip().strip("'\"")
        if name.startswith(":env:."):
            env["global." + name.removeprefix(":env:.")] = value
        elif "." in name:
            files[name] = value
    return {**files, **env}


def pip_conf(settings: dict[str, str]) -> tuple[str, list[str]]:
    """A pip.conf with ``settings``, and the local paths they name (folders of wheels, a
    local index with its files beside it, a constraints file, a CA bundle), to mount
    read-only at the same place in the build."""
    sections: dict[str, list[str]] = {}
    paths: set[str] = set()
    for name, value in settings.items():
        section, _, key = name.partition(".")
        sections.setdefault(section, []).append(f"{key} = {value}")
        for token in value.split():
            path = Path(token.removeprefix("file://"))
            if not (token.startswith(("/", "file://")) and path.exists()):
                continue
            # a local index's pages link to ../../files: mount the folder above .../simple
            paths.add(str(path.parent if path.name == "simple" else path))
    text = "".join(f"[{s}]\n" + "\n".join(lines) + "\n" for s, lines in sections.items())
    return text, sorted(paths)


def torch_build_args(settings: dict[str, str]) -> dict[str, str]:
    """The torch and torchvision this checkout runs, from where pip finds them here.

    torchvision's compiled ops need the torch build they were made for (a CPU torch with a
    CUDA torchvision does not import), so the image gets the pair known to work together.
    A local label (2.x+cpu, +cu128) names PyTorch's own index; a plain version is on PyPI
    (or this machine's index), next to which the host's local wheel folders are searched.
    """
    torch_v = importlib.metadata.version("torch")
    vision_v = importlib.metadata.version("torchvision")
    local = torch_v.partition("+")[2]
    index = f"{PYTORCH_INDEX}/{local}" if local else settings.get("global.index-url", PYPI)
    return {"TORCH_INDEX_URL": index, "TORCH_VERSION": torch_v, "TORCHVISION_VERSION": vision_v}


@dataclass
class Built:
    tag: str
    seconds: float
    size: str
    config: dict[str, Any]  # the image's Docker config: Cmd, User, Env, Healthcheck, ...


def build(
    buildah: Buildah,
    context: Path,
    tag: str,
    build_args: dict[str, str],
    mounts: Sequence[tuple[str, str]],
    log: Path,
) -> Built:
    """``buildah bud`` of ``context``'s Dockerfile in Docker's image format (the OCI format
    has no HEALTHCHECK), one layer per stage, with ``mounts`` (host path, path in the
    build) read-only in every RUN; its output goes to ``log``."""
    cmd = buildah.cmd(
        "bud", "--format", "docker", "--isolation", "chroot", "--layers=false", "--tag", tag,
        *(f"--build-arg={k}={v}" for k, v in build_args.items()),
        *(f"--volume={src}:{dst}:ro" for src, dst in mounts),
        str(context),
    )  # fmt: skip
    start = time.monotonic()
    with open(log, "wb") as out:
        res = subprocess.run([*NICE, *cmd], stdout=out, stderr=subprocess.STDOUT, timeout=1800)
    seconds = time.monotonic() - start
    if res.returncode != 0:
        tail = log.read_text(errors="replace")[-4000:]
        raise AssertionError(f"the image build failed ({res.returncode}), {log}:\n{tail}")
    size = buildah("images", "--format", "{{.Size}}", tag)
    info = json.loads(buildah("inspect", "--type", "image", tag))
    return Built(tag, seconds, size, info["Docker"]["config"])


def compose_service(compose: dict[str, Any], name: str) -> tuple[dict[str, str], list[str]]:
    """A compose service's environment (``${VAR:-default}`` read as its default) and
    volumes, as ``docker compose up`` gives them with nothing set in the caller's shell."""
    svc = compose["services"][name]

    def default(text: str) -> str:
        return re.sub(r"\$\{[A-Z0-9_]+:-([^}]*)\}", r"\1", text)

    env = {k: default(str(v)) for k, v in (svc.get("environment") or {}).items()}
    return env, [default(v) for v in svc.get("volumes", [])]


class Netns:
    """A network namespace with loopback and one veth to this one: the container's network.
    Its address and this side's are a /30 of 10.213.0.0/16 picked by this process's id."""

    def __init__(self, ip: str) -> None:
        pid = os.getpid()
        self.ip, self.name = ip, f"midserve-image-{pid}"
        self.host_if, self.ctr_if = f"msi{pid}h", f"msi{pid}c"
        slot = pid % 16384  # 16384 /30 networks in 10.213.0.0/16
        third, fourth = slot // 64, (slot % 64) * 4
        self.host_addr, self.address = (
            f"10.213.{third}.{fourth + 1}",
            f"10.213.{third}.{fourth + 2}",
        )

    def create(self) -> None:
        ip = self.ip
        run([ip, "netns", "add", self.name])
        run([ip, "link", "add", self.host_if, "type", "veth", "peer", "name", self.ctr_if])
        run([ip, "link", "set", self.ctr_if, "netns", self.name])
        run([ip, "addr", "add", f"{self.host_addr}/30", "dev", self.host_if])
        run([ip, "link", "set", self.host_if, "up"])
        run([ip, "-n", self.name, "addr", "add", f"{self.address}/30", "dev", self.ctr_if])
        run([ip, "-n", self.name, "link", "set", self.ctr_if, "up"])
        run([ip, "-n", self.name, "link", "set", "lo", "up"])

    def delete(self) -> None:
        """The namespace, and with it both ends of the veth."""
        subprocess.run([self.ip, "netns", "delete", self.name], capture_output=True, check=False)
        subprocess.run([self.ip, "link", "delete", self.host_if], capture_output=True, check=False)

    def exec(self, cmd: Sequence[str]) -> list[str]:
        return [self.ip, "netns", "exec", self.name, *cmd]


@contextlib.contextmanager
def network(ip: str) -> Iterator[Netns]:
    ns = Netns(ip)
    try:
        ns.create()
        yield ns
    finally:
        ns.delete()


def container_run(
    buildah: Buildah,
    netns: Netns,
    ctr: str,
    cmd: Sequence[str],
    *,
    env: dict[str, str] | None = None,
    volumes: Sequence[str] = (),
) -> list[str]:
    """The command line that runs ``cmd`` in ``ctr`` in the namespace, as the image's user
    and in its working directory (buildah run's defaults: the container's config)."""
    return netns.exec(buildah.cmd(
        "run", "--isolation", "chroot",
        *(f"--env={k}={v}" for k, v in (env or {}).items()),
        *(f"--volume={v}" for v in volumes),
        ctr, "--", *cmd,
    ))  # fmt: skip
