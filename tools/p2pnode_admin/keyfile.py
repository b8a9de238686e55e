"""Private keys at rest, optionally encrypted with a passphrase.

Plain: the libp2p PrivateKey protobuf (what nodes use). Encrypted: MAGIC, then CBOR
{kdf: "argon2id", salt, opslimit, memlimit, box}, where box is a pynacl SecretBox of the
protobuf under a key derived from the passphrase with pwhash (Argon2id). Both are written 0600.
"""

from __future__ import annotations

import getpass
import os
import sys
from pathlib import Path

import nacl.exceptions
import nacl.pwhash
import nacl.secret
import nacl.utils

from p2pnode import codec
from p2pnode.errors import DecodeError
from p2pnode.fsutil import atomic_write
from p2pnode.identity import KeyFileError, KeyPair, load_key

MAGIC = b"P2PNODE-ENCRYPTED-KEY-V1\n"
DEFAULT_PASSPHRASE_ENV = "P2PNODE_ADMIN_PASSPHRASE"
KDF = nacl.pwhash.argon2id
OPSLIMIT = KDF.OPSLIMIT_MODERATE
MEMLIMIT = KDF.MEMLIMIT_MODERATE


class PassphraseError(KeyFileError):
    pass


def passphrase(env_name: str, *, confirm: bool, what: str) -> str | None:
    """The passphrase from $env_name, else asked on the terminal; None if neither is possible."""
    value = os.environ.get(env_name)
    if value is not None:
        return value
    if not sys.stdin.isatty():
        return None
    first = getpass.getpass(f"passphrase for {what}: ")
    if confirm and getpass.getpass("again: ") != first:
        raise PassphraseError("the two passphrases differ")
    return first


def save(path: Path, key: KeyPair, secret: str | None) -> None:
    """Write `key`; encrypted when `secret` is not None."""
    if path.exists():
        raise KeyFileError(f"{path} already exists; refusing to overwrite a key")
    if secret is None:
        atomic_write(path, key.to_protobuf(), mode=0o600)
        return
    ops, mem = OPSLIMIT, MEMLIMIT
    salt = nacl.utils.random(KDF.SALTBYTES)
    box_key = KDF.kdf(nacl.secret.SecretBox.KEY_SIZE, secret.encode(), salt, opslimit=ops, memlimit=mem)
    box = nacl.secret.SecretBox(box_key).encrypt(key.to_protobuf())
    body = codec.encode({"kdf": "argon2id", "salt": salt, "opslimit": ops, "memlimit": mem, "box": bytes(box)})
    atomic_write(path, MAGIC + body, mode=0o600)


def is_encrypted(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(len(MAGIC)) == MAGIC


def load(path: Path, env_name: str = DEFAULT_PASSPHRASE_ENV) -> KeyPair:
    path = Path(path)
    if not path.exists():
        raise KeyFileError(f"key file {path} does not exist")
    if not is_encrypted(path):
        return load_key(path)
    load_key_mode_check(path)
    secret = passphrase(env_name, confirm=False, what=str(path))
    if secret is None:
        raise PassphraseError(f"{path} is encrypted: set ${env_name} or run on a terminal to be asked")
    try:
        f = codec.Fields(codec.decode_map(path.read_bytes()[len(MAGIC):], "encrypted key"), "encrypted key")
        salt, box = f.blob("salt"), f.blob("box")
        assert salt is not None and box is not None  # not optional: Fields raised if absent
        box_key = KDF.kdf(nacl.secret.SecretBox.KEY_SIZE, secret.encode(), salt,
                          opslimit=f.integer("opslimit"), memlimit=f.integer("memlimit"))
        return KeyPair.from_protobuf(nacl.secret.SecretBox(box_key).decrypt(box))
    except nacl.exceptions.CryptoError:
        raise PassphraseError(f"wrong passphrase for {path}") from None
    except (DecodeError, ValueError) as exc:
        raise KeyFileError(f"{path} is not a valid encrypted key: {exc}") from None


def load_key_mode_check(path: Path) -> None:
    mode = path.stat().st_mode & 0o077
    if mode:
        raise KeyFileError(f"key file {path} is readable by group or others — fix with: chmod 600 {path}")
