"""Writes noise-xx.json: a Noise XX handshake between fixed keys, byte for byte.

Ed25519 signatures are deterministic and every key is fixed, so the bytes are reproducible.
Run from the repository root: python protocols/vectors/make_noise_vector.py
"""

import json
from pathlib import Path

from p2pnode.identity import KeyPair
from p2pnode.transport.noise import NoiseCore

KEYS = {
    "initiator": {"identity_seed": "01" * 32, "static_private": "02" * 32, "ephemeral_private": "03" * 32},
    "responder": {"identity_seed": "04" * 32, "static_private": "05" * 32, "ephemeral_private": "06" * 32},
}
PLAINTEXT = b"/p2pnode test vector".hex()


def build() -> dict:
    conns = {}
    keys_by_role = {role: dict(keys) for role, keys in KEYS.items()}
    for role, keys in keys_by_role.items():
        identity = KeyPair.from_seed(bytes.fromhex(keys["identity_seed"]))
        keys["peer_id"] = str(identity.peer_id)
        conns[role] = NoiseCore(
            identity, initiator=role == "initiator",
            static_private=bytes.fromhex(keys["static_private"]),
            ephemeral_private=bytes.fromhex(keys["ephemeral_private"]),
        )
    init, resp = conns["initiator"], conns["responder"]
    init.send_handshake()
    msg1 = init.data_to_send()
    resp.receive_data(msg1)
    msg2 = resp.data_to_send()
    init.receive_data(msg2)
    msg3 = init.data_to_send()
    resp.receive_data(msg3)
    assert str(resp.remote.remote_peer) == keys_by_role["initiator"]["peer_id"]
    assert str(init.remote.remote_peer) == keys_by_role["responder"]["peer_id"]
    return {
        "description": "Noise_XX_25519_ChaChaPoly_SHA256 with libp2p payloads; every message includes its 2-byte length prefix",
        **keys_by_role,
        "message1": msg1.hex(),
        "message2": msg2.hex(),
        "message3": msg3.hex(),
        "transport_plaintext": PLAINTEXT,
        "transport_frame": _encrypt(init, bytes.fromhex(PLAINTEXT)).hex(),
    }


def _encrypt(core: NoiseCore, plaintext: bytes) -> bytes:
    core.send_data(plaintext)
    return core.data_to_send()


def main() -> None:
    out = Path(__file__).with_name("noise-xx.json")
    out.write_text(json.dumps(build(), indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
