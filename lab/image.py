"""Building the anchor's container image, `upmt/anchor-node`, with podman and no registry.

Three steps, each skipped when its inputs have not changed:

1. the base: a Debian root file system made by `mmdebstrap` from the mirror
   this machine's apt uses (the host's own release, so that its Python is
   the one the wheels are built for), imported with `podman import` and
   tagged with a hash of its recipe (`localhost/upmt/anchor-base:<hash>`);
2. the wheelhouse `docker/wheels`: the project's wheel and those of its
   dependencies (and pip's), built on the host by `pip wheel`, where the
   package index is reachable; the dependencies are fetched again only when
   their list or the Python version changes, the project's wheel when a
   source file does;
3. the image: `podman build --network none --pull=never` of
   `docker/Dockerfile` with `BASE` set to the base, so nothing is fetched.

Podman runs with `docker/containers.conf` (CONTAINERS_CONF): the settings
these hosts need, leaving the machine's own configuration alone. Used by
`./run image` (`python -m lab.image`) and by the container's end-to-end test.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ground.errors import SetupError

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
DOCKERFILE = DOCKER / "Dockerfile"
CONTAINERS_CONF = DOCKER / "containers.conf"
WHEELS = DOCKER / "wheels"
IMAGE = "upmt/anchor-node:latest"
BASE_REPO = "localhost/upmt/anchor-base"
# What the anchor runs besides Python: nft (the NAT table); iproute2 for
# whoever looks inside. No python3-venv: pip runs from its wheel.
BASE_PACKAGES = ("python3", "nftables", "iproute2")
# Part of the base's hash: changing how the base is made changes its tag.
BASE_RECIPE_VERSION = 1
FALLBACK_MIRROR = "http://deb.debian.org/debian"
# The image records what it was built from; a build with the same inputs is skipped.
INPUTS_LABEL = "org.upmt.build-inputs"

Log = Callable[[str], None]


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- podman -------------------------------------------------------------------


def podman_env() -> dict[str, str]:
    """The environment for podman: the project's containers.conf, nothing global."""
    return {**os.environ, "CONTAINERS_CONF": str(CONTAINERS_CONF)}


def podman(
    *args: str, check: bool = True, timeout: float = 120.0
) -> subprocess.CompletedProcess[str]:
    """Run `podman ARGS` with the project's configuration; SetupError on failure."""
    argv = ["podman", *args]
    try:
        proc = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=podman_env(),
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SetupError(f"{' '.join(argv[:3])}: {exc}") from None
    if check and proc.returncode != 0:
        raise SetupError(
            f"{' '.join(argv[:3])} failed ({proc.returncode}): {_tail(proc.stderr or proc.stdout)}"
        )
    return proc


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def missing_tools() -> str | None:
    """None when this host can build and run the image, else what it lacks."""
    if os.geteuid() != 0:
        return "needs root (podman with a lab namespace, mmdebstrap)"
    for tool in ("podman", "mmdebstrap", "runc"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (./run image installs it)"
    return None


def image_exists(name: str) -> bool:
    return podman("image", "exists", name, check=False).returncode == 0


# -- the base -----------------------------------------------------------------


def os_release() -> dict[str, str]:
    """/etc/os-release as a dict (VERSION_CODENAME names the Debian release)."""
    fields: dict[str, str] = {}
    try:
        text = Path("/etc/os-release").read_text()
    except OSError:
        return fields
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            fields[key.strip()] = value.strip().strip('"')
    return fields


@dataclass(frozen=True)
class AptSource:
    uri: str
    suite: str
    components: tuple[str, ...]

    def line(self) -> str:
        return f"deb {self.uri} {self.suite} {' '.join(self.components)}"


def apt_sources(etc: Path = Path("/etc/apt")) -> list[AptSource]:
    """The binary package sources of apt's configuration (one-line and deb822 formats)."""
    files = [etc / "sources.list"]
    parts = etc / "sources.list.d"
    if parts.is_dir():
        files += sorted(parts.glob("*.list")) + sorted(parts.glob("*.sources"))
    sources: list[AptSource] = []
    for path in files:
        try:
            text = path.read_text()
        except OSError:
            continue
        if path.suffix == ".sources":
            sources += _deb822_sources(text)
        else:
            sources += _one_line_sources(text)
    return sources


def _one_line_sources(text: str) -> list[AptSource]:
    found = []
    for raw in text.splitlines():
        words = raw.split("#", 1)[0].split()
        if words[:1] != ["deb"]:
            continue
        words = words[1:]
        if words and words[0].startswith("["):  # options: [signed-by=... arch=...]
            while words and not words[0].endswith("]"):
                words.pop(0)
            words = words[1:]
        if len(words) >= 3:
            found.append(AptSource(words[0], words[1], tuple(words[2:])))
    return found


def _deb822_sources(text: str) -> list[AptSource]:
    found = []
    for stanza in text.split("\n\n"):
        fields: dict[str, str] = {}
        for raw in stanza.splitlines():
            if raw.startswith("#") or not raw.strip() or raw[0].isspace():
                continue
            key, sep, value = raw.partition(":")
            if sep:
                fields[key.strip().lower()] = value.strip()
        if "deb" not in fields.get("types", "").split() or fields.get("enabled") == "no":
            continue
        components = tuple(fields.get("components", "").split())
        for uri in fields.get("uris", "").split():
            for suite in fields.get("suites", "").split():
                found.append(AptSource(uri, suite, components))
    return found


def base_sources(codename: str, sources: Sequence[AptSource]) -> list[str]:
    """The mirror lines for the base: the release, its updates and security suites, main.

    They are the ones this machine's apt uses (its mirror, or a proxy of
    it), Debian's own mirror when it names none for `codename`.
    """
    wanted = {codename, f"{codename}-updates", f"{codename}-security"}
    lines = []
    for source in sources:
        if source.suite in wanted and "main" in source.components:
            line = AptSource(source.uri, source.suite, ("main",)).line()
            if line not in lines:
                lines.append(line)
    if not any(line.split()[2] == codename for line in lines):
        lines.insert(0, AptSource(FALLBACK_MIRROR, codename, ("main",)).line())
    return lines


@dataclass(frozen=True)
class BaseRecipe:
    codename: str
    mirrors: tuple[str, ...]
    packages: tuple[str, ...] = BASE_PACKAGES
    arch: str = platform.machine()

    @classmethod
    def for_host(cls) -> BaseRecipe:
        codename = os_release().get("VERSION_CODENAME")
        if not codename:
            raise SetupError("cannot tell the Debian release (/etc/os-release: VERSION_CODENAME)")
        return cls(codename, tuple(base_sources(codename, apt_sources())))

    def digest(self) -> str:
        recipe = {
            "version": BASE_RECIPE_VERSION,
            "codename": self.codename,
            "mirrors": list(self.mirrors),
            "packages": list(self.packages),
            "arch": self.arch,
        }
        return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]

    @property
    def tag(self) -> str:
        return f"{BASE_REPO}:{self.codename}-{self.digest()}"

    def mmdebstrap_argv(self, output: Path) -> list[str]:
        return [
            "mmdebstrap",
            "--quiet",
            # Essential packages and what is asked for; no apt, no perl.
            "--variant=essential",
            # A merged /usr set up directly, not by the usrmerge package (which needs perl).
            "--hook-dir=/usr/share/mmdebstrap/hooks/merged-usr",
            f"--include={','.join(self.packages)}",
            # Removed afterwards: dpkg's path-exclude options would put a filter
            # between dpkg-deb and tar for every package, doubling the time.
            '--customize-hook=rm -rf "$1"/usr/share/doc/* "$1"/usr/share/man/* '
            '"$1"/usr/share/locale/*',
            self.codename,
            str(output),
            *self.mirrors,
        ]


def _scratch_dir() -> str | None:
    """Where the root file system is assembled: RAM when there is room, as it is faster."""
    shm = Path("/dev/shm")
    try:
        if shm.is_dir() and shutil.disk_usage(shm).free > 2 << 30:
            return str(shm)
    except OSError:
        pass
    return None


def ensure_base(
    recipe: BaseRecipe | None = None, *, rebuild: bool = False, log: Log = _stderr
) -> str:
    """The base image's tag, built and imported unless an image of that recipe exists."""
    recipe = recipe or BaseRecipe.for_host()
    if not rebuild and image_exists(recipe.tag):
        log(f"image: base {recipe.tag} exists")
        return recipe.tag
    log(f"image: building base {recipe.tag} with mmdebstrap ({', '.join(recipe.packages)})")
    started = time.monotonic()
    scratch = _scratch_dir()
    with tempfile.TemporaryDirectory(prefix="upmt-base-", dir=scratch) as tmp:
        tarball = Path(tmp) / "base.tar"
        env = {**os.environ, **({"TMPDIR": scratch} if scratch else {})}
        proc = subprocess.run(
            recipe.mmdebstrap_argv(tarball),
            capture_output=True,
            text=True,
            timeout=900,
            env=env,
            check=False,
        )
        if proc.returncode != 0:
            raise SetupError(f"mmdebstrap failed ({proc.returncode}): {_tail(proc.stderr)}")
        podman("import", "--quiet", str(tarball), recipe.tag, timeout=300)
    log(f"image: base built in {time.monotonic() - started:.1f} s")
    return recipe.tag


# -- the wheelhouse -----------------------------------------------------------


def _project(root: Path = ROOT) -> dict[str, Any]:
    return tomllib.loads((root / "pyproject.toml").read_text())


def dependencies_digest() -> str:
    """What decides the dependencies' wheels: their requirements, Python, the machine."""
    inputs = {
        "deps": _project()["project"]["dependencies"],
        "python": sys.version_info[:2],
        "arch": platform.machine(),
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def project_digest(root: Path = ROOT) -> str:
    """What decides the project's wheel: pyproject.toml, README.md, the packages' modules."""
    h = hashlib.sha256()
    paths = [root / "pyproject.toml", root / "README.md"]
    for package in _project(root)["tool"]["setuptools"]["packages"]:
        # Only modules go into the wheel (no package data is declared).
        paths += sorted(p for p in (root / package).rglob("*.py") if "__pycache__" not in p.parts)
    for path in paths:
        h.update(str(path.relative_to(root)).encode() + b"\0")
        h.update(hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()


def _pip_wheel(*args: str) -> None:
    argv = [sys.executable, "-m", "pip", "wheel", "--quiet", "--wheel-dir", str(WHEELS), *args]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=900, check=False)
    if proc.returncode != 0:
        raise SetupError(f"pip wheel failed ({proc.returncode}): {_tail(proc.stderr)}")


def ensure_wheelhouse(log: Log = _stderr) -> str:
    """docker/wheels holds the wheels of the project, its dependencies and pip, up to date.

    Returns a digest of what they were built from.
    """
    WHEELS.mkdir(exist_ok=True)
    stamp = WHEELS / ".inputs.json"
    try:
        have = json.loads(stamp.read_text())
    except (OSError, ValueError):
        have = {}
    want = {"deps": dependencies_digest(), "project": project_digest()}
    started = time.monotonic()
    if have.get("deps") != want["deps"]:
        log("image: fetching the dependencies' wheels")
        for old in WHEELS.glob("*.whl"):
            old.unlink()
        have = {}
        _pip_wheel("pip", *_project()["project"]["dependencies"])
    project_wheels = list(WHEELS.glob("upmt-*.whl"))
    if have.get("project") != want["project"] or not project_wheels:
        log("image: building the project's wheel")
        for old in project_wheels:
            old.unlink()
        _pip_wheel("--no-deps", str(ROOT))
    else:
        log("image: wheelhouse up to date")
    stamp.write_text(json.dumps(want) + "\n")
    log(f"image: wheelhouse ready in {time.monotonic() - started:.1f} s")
    return hashlib.sha256(json.dumps(want, sort_keys=True).encode()).hexdigest()


# -- the image ----------------------------------------------------------------


def build_image(tag: str = IMAGE, *, rebuild_base: bool = False, log: Log = _stderr) -> str:
    """Base, wheelhouse, then `podman build` without a network; the image's id.

    The build is skipped when the image under `tag` was built from the same
    base image, wheels, Dockerfile and build context rules (its label).
    """
    # The base is made from Debian's mirror, the wheels come from the package
    # index: at the same time, as neither waits for the other.
    with ThreadPoolExecutor(max_workers=1) as pool:
        wheels = pool.submit(ensure_wheelhouse, log=log)
        base = ensure_base(rebuild=rebuild_base, log=log)
        inputs = wheels.result()
    # The base's id, not its tag: a base made again (--rebuild-base) has the same tag.
    build = hashlib.sha256(f"{_image_id(base)}\0{inputs}".encode())
    for path in (DOCKERFILE, DOCKER / "install-upmt", ROOT / ".dockerignore"):
        build.update(hashlib.sha256(path.read_bytes()).digest())
    digest = build.hexdigest()
    previous = _image_id(tag)
    if previous and _label(tag, INPUTS_LABEL) == digest:
        log(f"image: {tag} is up to date")
        return previous
    log(f"image: podman build {tag} from {base} (--network none)")
    started = time.monotonic()
    podman(
        "build",
        "--network",
        "none",
        "--pull=never",
        # No cached layer images: faster here (one commit per stage) and nothing left over.
        "--layers=false",
        # HEALTHCHECK is part of the docker format only.
        "--format",
        "docker",
        "--build-arg",
        f"BASE={base}",
        "--label",
        f"{INPUTS_LABEL}={digest}",
        "--file",
        str(DOCKERFILE),
        "--tag",
        tag,
        str(ROOT),
        timeout=900,
    )
    log(f"image: built in {time.monotonic() - started:.1f} s")
    image_id = _image_id(tag)
    if image_id is None:
        raise SetupError(f"podman build did not tag {tag}")
    if previous and previous != image_id:
        # The image the tag named before, now nameless; kept while a container uses it.
        podman("rmi", previous, check=False)
    return image_id


def _image_id(name: str) -> str | None:
    proc = podman("image", "inspect", "--format", "{{.Id}}", name, check=False)
    return (proc.stdout.strip() or None) if proc.returncode == 0 else None


def _label(name: str, label: str) -> str | None:
    proc = podman("image", "inspect", "--format", "{{json .Labels}}", name, check=False)
    if proc.returncode != 0:
        return None
    labels = json.loads(proc.stdout or "null") or {}
    value = labels.get(label)
    return value if isinstance(value, str) else None


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="./run image", description="Build the anchor's container image with podman, offline."
    )
    parser.add_argument("--tag", default=IMAGE, help=f"image name (default {IMAGE})")
    parser.add_argument(
        "--rebuild-base",
        action="store_true",
        help="make the Debian base again even if one of the same recipe exists",
    )
    args = parser.parse_args(argv)
    reason = missing_tools()
    if reason:
        _stderr(f"./run image: {reason}")
        return 1
    started = time.monotonic()
    try:
        image_id = build_image(args.tag, rebuild_base=args.rebuild_base)
    except SetupError as exc:
        _stderr(f"./run image: {exc}")
        return 1
    _stderr(f"image: {args.tag} ready in {time.monotonic() - started:.1f} s")
    print(image_id)
    return 0


if __name__ == "__main__":
    sys.exit(main())
