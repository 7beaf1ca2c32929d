"""The container image's recipe: apt sources, the base's tag, the build context."""

import tomllib
from pathlib import Path

from lab.image import (
    DOCKERFILE,
    ROOT,
    AptSource,
    BaseRecipe,
    apt_sources,
    base_sources,
    project_digest,
)

DEB822 = """\
Types: deb
# http://snapshot.debian.org/archive/debian/20250520T000000Z
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main contrib
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm
Components: main
"""

NODESOURCE = """\
Types: deb
URIs: https://deb.nodesource.com/node_20.x
Suites: nodistro
Components: main
"""


def write_apt(tmp_path: Path) -> Path:
    etc = tmp_path / "apt"
    (etc / "sources.list.d").mkdir(parents=True)
    (etc / "sources.list.d" / "debian.sources").write_text(DEB822)
    (etc / "sources.list.d" / "nodesource.sources").write_text(NODESOURCE)
    (etc / "sources.list.d" / "google.list").write_text(
        "deb [signed-by=/usr/share/keyrings/cloud.google.gpg arch=amd64] "
        "https://packages.cloud.google.com/apt cloud-sdk-bookworm main\n"
        "# deb http://old.example/debian bookworm main\n"
    )
    return etc


def test_sources_of_both_formats_are_read_and_source_stanzas_skipped(tmp_path: Path) -> None:
    sources = apt_sources(write_apt(tmp_path))
    assert AptSource("http://deb.debian.org/debian", "bookworm", ("main",)) in sources
    assert (
        AptSource("http://deb.debian.org/debian-security", "bookworm-security", ("main", "contrib"))
        in sources
    )
    assert (
        AptSource("https://packages.cloud.google.com/apt", "cloud-sdk-bookworm", ("main",))
        in sources
    )
    assert len(sources) == 5  # deb-src and the commented line are not sources of packages


def test_the_base_uses_the_release_its_updates_and_security_from_apt_s_mirror(
    tmp_path: Path,
) -> None:
    lines = base_sources("bookworm", apt_sources(write_apt(tmp_path)))
    assert lines == [
        "deb http://deb.debian.org/debian bookworm main",
        "deb http://deb.debian.org/debian bookworm-updates main",
        "deb http://deb.debian.org/debian-security bookworm-security main",
    ]


def test_without_a_mirror_for_the_release_debian_s_own_is_used() -> None:
    proxy = AptSource("http://proxy.example/debian", "trixie", ("main",))
    assert base_sources("bookworm", [proxy]) == ["deb http://deb.debian.org/debian bookworm main"]


def test_the_base_s_tag_names_its_recipe() -> None:
    mirrors = ("deb http://deb.debian.org/debian bookworm main",)
    recipe = BaseRecipe("bookworm", mirrors)
    assert recipe.tag == BaseRecipe("bookworm", mirrors).tag
    assert recipe.tag.startswith("localhost/upmt/anchor-base:bookworm-")
    assert BaseRecipe("bookworm", mirrors, packages=("python3",)).tag != recipe.tag
    assert BaseRecipe("bookworm", (*mirrors, "deb http://x/debian bookworm main")).tag != recipe.tag
    argv = recipe.mmdebstrap_argv(Path("/tmp/base.tar"))
    assert argv[0] == "mmdebstrap" and argv[-2:] == ["/tmp/base.tar", mirrors[0]]
    assert "--include=python3,nftables,iproute2" in argv


def test_the_build_context_holds_every_package_of_the_project() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    allowed = {
        line[1:]
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.startswith("!")
    }
    tops = {p.rstrip("*") for p in project["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert tops - {"upmt"} <= allowed and "upmt_client" in allowed and "upmt" in allowed
    assert {"pyproject.toml", "README.md", "docker/install-upmt", "docker/wheels"} <= allowed


def test_the_dockerfile_builds_from_a_registry_base_unless_told_otherwise() -> None:
    text = DOCKERFILE.read_text()
    assert text.index("ARG BASE=python:3.11-slim-bookworm") < text.index("FROM ${BASE}")
    assert "CMD anchor-node status" in text  # the healthcheck
    assert 'ENTRYPOINT ["anchor-node"]' in text  # exec form: the daemon is PID 1


def test_the_project_digest_follows_the_modules_only(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text('[tool.setuptools]\npackages = ["pkg"]\n')
    (tmp_path / "README.md").write_text("readme\n")
    (tmp_path / "pkg" / "__pycache__").mkdir(parents=True)
    module = tmp_path / "pkg" / "mod.py"
    module.write_text("x = 1\n")
    before = project_digest(tmp_path)
    (tmp_path / "pkg" / "__pycache__" / "mod.cpython-311.pyc").write_bytes(b"\0")
    (tmp_path / "pkg" / "notes.txt").write_text("not in the wheel\n")
    assert project_digest(tmp_path) == before
    module.write_text("x = 2\n")
    assert project_digest(tmp_path) != before
    assert len(project_digest()) == 64
