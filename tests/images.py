"""Test images: Debian's static busybox in an image FROM scratch, tagged with the names the
site's default image table uses, so jobs find them without a pull (and without a network).

Every image runs ``/bin/sh`` with the action's arguments, so a test action such as
``python:v2 -c "echo hi > output/a.csv"`` runs a shell command.

Run ``python tests/images.py`` to build them; the test suite builds them when missing.
"""

from __future__ import annotations

import io
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import docker

BUSYBOX = Path("/bin/busybox")
REGISTRY = "ghcr.io/opensafely-core"
TAGS = [
    "python:v2", "python:latest", "r:latest", "r:v2", "ehrql:v1", "sqlrunner:v1",
    "stata-mp:latest", "cohortextractor:latest", "jupyter:latest", "databuilder:v0.36.0",
]  # fmt: skip
IMAGES = [f"{REGISTRY}/{tag}" for tag in TAGS]
DOCKERFILE = b"""FROM scratch
COPY bin /bin
ENV PATH=/bin
ENTRYPOINT ["/bin/sh"]
"""


def _busybox() -> Path:
    path = BUSYBOX if BUSYBOX.exists() else Path(shutil.which("busybox") or "")
    if not path.is_file():
        raise SystemExit("busybox not found: install Debian's busybox-static")
    return path


def _context() -> bytes:
    busybox = _busybox()
    applets = subprocess.run([busybox, "--list"], capture_output=True, text=True, check=True)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("Dockerfile")
        info.size = len(DOCKERFILE)
        tar.addfile(info, io.BytesIO(DOCKERFILE))
        tar.add(busybox, arcname="bin/busybox")
        for applet in applets.stdout.split():
            if applet == "busybox":
                continue
            link = tarfile.TarInfo(f"bin/{applet}")
            link.type = tarfile.SYMTYPE
            link.linkname = "busybox"
            tar.addfile(link)
    return buf.getvalue()


def missing_images(client: docker.DockerClient) -> list[str]:
    missing = []
    for name in IMAGES:
        try:
            client.images.get(name)
        except docker.errors.ImageNotFound:
            missing.append(name)
    return missing


def build_test_images(client: docker.DockerClient | None = None) -> None:
    client = client or docker.from_env()
    if not missing_images(client):
        return
    image, _ = client.images.build(
        fileobj=io.BytesIO(_context()), custom_context=True, tag=IMAGES[0], rm=True
    )
    for name in IMAGES[1:]:
        repository, tag = name.rsplit(":", 1)
        image.tag(repository, tag)


if __name__ == "__main__":
    build_test_images()
    print("built test images:", *IMAGES, sep="\n  ", file=sys.stderr)
