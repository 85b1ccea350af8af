"""This install's software versions, as a node reports them (info replies) and `swarmd doctor` compares them."""

from __future__ import annotations

from importlib import metadata

PACKAGES = ("swarmd", "torch", "hivemind")


def software_versions() -> dict[str, str]:
    """{package: version} of the packages that must agree across a run ("unknown" where not installed)."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "unknown"
    return versions


def encode_versions(versions: dict[str, str]) -> list[str]:
    """For an info reply: ["swarmd=0.1.0", ...]."""
    return [f"{name}={version}" for name, version in sorted(versions.items())]


def decode_versions(items: list[str]) -> dict[str, str]:
    """An info reply's versions, back as {package: version}; items without "=" are ignored."""
    return dict(item.split("=", 1) for item in items if "=" in item)
