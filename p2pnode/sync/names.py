"""File names inside a synced folder: validation, NFC normalisation, collision detection.

A name is a relative POSIX path in Unicode NFC, components joined by "/". This is the first line
of defence against writes escaping a receiver's `target_path`: a name that is absolute, has an
empty, "." or ".." component, a NUL, a component longer than the receiver's filesystem allows,
a lone surrogate (an undecodable byte on the source) or the shape of our own temporary files is
refused here, before any path is built from it. `apply` checks again, component by component,
with O_NOFOLLOW (a valid name can still meet a symlink on the receiver).
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable

from ..errors import DecodeError

MAX_NAME_BYTES = 4095  # PATH_MAX minus the NUL
MAX_COMPONENT_BYTES = 255  # NAME_MAX on Linux filesystems
MAX_DEPTH = 256
TEMP_PREFIX = ".p2psync."
TEMP_SUFFIX = ".tmp"
_DOTS = ("", ".", "..")


class BadName(DecodeError):
    """A file name that must never be written on a receiver."""


def is_temp_name(component: str) -> bool:
    """Our own temporary files (`.p2psync.<name>.tmp`): never indexed, never synced."""
    return component.startswith(TEMP_PREFIX) and component.endswith(TEMP_SUFFIX)


def validate(name: str) -> str:
    """Return `name` if it is a valid, already-normalised folder-relative name; raise BadName otherwise.

    Used on input from the network: a name that is not NFC is refused rather than silently changed,
    so two peers can never disagree about which file an entry means."""
    if not isinstance(name, str):
        raise BadName(f"file name must be text, got {type(name).__name__}")
    if name == "":
        raise BadName("empty file name")
    if "\x00" in name:
        raise BadName(f"file name {name!r} contains NUL")
    if name.startswith("/"):
        raise BadName(f"file name {name!r} is absolute")
    try:
        encoded = name.encode("utf-8")
    except UnicodeEncodeError:
        raise BadName(f"file name {name!r} is not valid UTF-8 (undecodable bytes on the source)") from None
    if len(encoded) > MAX_NAME_BYTES:
        raise BadName(f"file name {name[:64]!r}... is longer than {MAX_NAME_BYTES} bytes")
    parts = name.split("/")
    if len(parts) > MAX_DEPTH:
        raise BadName(f"file name {name[:64]!r}... is nested deeper than {MAX_DEPTH} directories")
    for part in parts:
        if part == "":
            raise BadName(f"file name {name!r} has an empty component")
        if part in (".", ".."):
            raise BadName(f"file name {name!r} has a {part!r} component")
        if len(part.encode("utf-8")) > MAX_COMPONENT_BYTES:
            raise BadName(f"file name {name[:64]!r}... has a component longer than {MAX_COMPONENT_BYTES} bytes")
        if is_temp_name(part):
            raise BadName(f"file name {name!r} has the shape of a sync temporary file ({TEMP_PREFIX}*{TEMP_SUFFIX})")
    if not unicodedata.is_normalized("NFC", name):
        raise BadName(f"file name {name!r} is not in Unicode NFC form")
    return name


def normalize(name: str) -> str:
    """NFC-normalise a name read from a local filesystem, then validate it."""
    return validate(unicodedata.normalize("NFC", name))


def child(parent_name: str, component: str) -> str:
    """The name of directory entry `component` (as listed on disk) inside directory `parent_name`.

    Plain ASCII components (the common case, on the scanner's hot path) skip normalisation."""
    if component.isascii() and component not in _DOTS and "\x00" not in component and not component.startswith(TEMP_PREFIX):
        name = f"{parent_name}/{component}" if parent_name else component
        if 0 < len(component) <= MAX_COMPONENT_BYTES and len(name) <= MAX_NAME_BYTES and name.count("/") < MAX_DEPTH:
            return name
    nfc = unicodedata.normalize("NFC", component)
    return validate(f"{parent_name}/{nfc}" if parent_name else nfc)


def parent(name: str) -> str:
    """The directory a name lives in; "" for the folder root."""
    head, _, _ = name.rpartition("/")
    return head


def ancestors(name: str) -> list[str]:
    """Every directory above `name`, outermost first ("a/b/c" -> ["a", "a/b"])."""
    parts = name.split("/")
    return ["/".join(parts[:i]) for i in range(1, len(parts))]


def collision_key(name: str) -> str:
    """Names with the same key are one file on a case-insensitive or normalising filesystem."""
    return unicodedata.normalize("NFC", name).casefold()


def find_collisions(names: Iterable[str]) -> dict[str, list[str]]:
    """Groups of two or more names that differ only by case or Unicode normalisation.

    Maps the first name seen to every later name that collides with it."""
    first: dict[str, str] = {}
    out: dict[str, list[str]] = {}
    for name in names:
        key = collision_key(name)
        seen = first.setdefault(key, name)
        if seen != name:
            out.setdefault(seen, []).append(name)
    return out
