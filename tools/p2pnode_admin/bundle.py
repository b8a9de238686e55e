"""The admin bundle: everything an admin needs in one string, `p2pnode-admin://<base64url JSON>`
(the P2POS Web Admin's single-input form). The admin's private key is inside: treat the string
like the key itself."""

from __future__ import annotations

import base64
import json

from p2pnode.errors import DecodeError

PREFIX = "p2pnode-admin://"


def export(fields: dict) -> str:
    raw = json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()
    return PREFIX + base64.urlsafe_b64encode(raw).decode().rstrip("=")


def parse(text: str) -> dict:
    text = text.strip()
    if not text.startswith(PREFIX):
        raise DecodeError(f"an admin bundle starts with {PREFIX}")
    body = text[len(PREFIX):]
    try:
        data = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    except (ValueError, json.JSONDecodeError) as exc:
        raise DecodeError(f"admin bundle is not base64url JSON: {exc}") from None
    if not isinstance(data, dict):
        raise DecodeError("admin bundle must hold a JSON object")
    for key in ("cluster_id", "system_pubkey", "admin_key", "admin_proof"):
        if not isinstance(data.get(key), str):
            raise DecodeError(f"admin bundle lacks {key!r}")
    return data
