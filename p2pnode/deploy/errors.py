"""Errors of the deploy engine; each message says what was refused and why."""

from __future__ import annotations

from ..errors import P2PNodeError


class DeployError(P2PNodeError):
    """A deploy step failed; the message is shown to the operator as the deploy's reason."""


class RootNotAllowed(DeployError):
    """The command's application root lies outside the node's `deploy.allowed_roots`."""


class UnsafeArchive(DeployError):
    """A tar entry was refused (escaping path, device, setuid bit, link out of the release, limits)."""

    def __init__(self, entry: str, reason: str):
        super().__init__(f"archive entry {entry!r}: {reason}")
        self.entry = entry
        self.reason = reason


class ReleaseError(DeployError):
    """A release directory operation was refused (unknown version, existing version, no previous release)."""


class QueueFull(DeployError):
    """Too many deploys are waiting for one application on this node."""
