"""Verification of cluster documents, without a network: every way a snapshot can be refused."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clusterkit import HOUR, ClusterKit
from p2pnode import codec, timefmt
from p2pnode.cluster.documents import Member, Rejected, Trust, verify_revocation, verify_snapshot
from p2pnode.envelope import DOMAINS, Envelope, signing_bytes
from p2pnode.errors import DecodeError
from p2pnode.identity import KeyPair

KIT = ClusterKit()
MEMBERS = [Member(KeyPair.generate().peer_id, "a", (), ("web",))]


def trust(**kw) -> Trust:
    return Trust(kw.pop("cluster_id", KIT.cluster_id), KIT.system.public_key, **kw)


def test_valid_snapshot_roundtrips():
    env = KIT.snapshot(MEMBERS)
    again = Envelope.from_bytes(env.to_bytes())
    snap = verify_snapshot(again, trust(), timefmt.now_ns())
    assert snap.members == tuple(MEMBERS) and snap.issuer_peer_id == KIT.admin.peer_id


def _rejected(env, code, t=None):
    with pytest.raises(Rejected) as info:
        verify_snapshot(env, t or trust(), timefmt.now_ns())
    assert info.value.code == code, str(info.value)
    return str(info.value)


def test_forged_payload():
    env = KIT.snapshot(MEMBERS)
    payload = codec.decode(env.payload)
    payload["members"] = []
    forged = Envelope(env.type, codec.encode(payload), env.signer, env.sig)
    assert "signature does not verify" in _rejected(forged, "bad_signature")


def test_signed_by_someone_else_than_the_named_issuer():
    env = KIT.snapshot(MEMBERS)
    intruder = KeyPair.generate()
    resigned = Envelope.seal("membership-snapshot", codec.decode(env.payload), intruder)
    assert "signed by" in _rejected(resigned, "bad_signature")


def test_signature_of_another_type_cannot_be_replayed():
    env = KIT.snapshot(MEMBERS)
    as_status = Envelope("status", env.payload, env.signer, env.sig)
    with pytest.raises(Rejected):
        verify_snapshot(as_status, trust(), timefmt.now_ns())
    assert signing_bytes("status", env.payload) != signing_bytes("membership-snapshot", env.payload)
    assert len(set(DOMAINS.values())) == len(DOMAINS)


def test_wrong_cluster():
    assert "for cluster 'other'" in _rejected(KIT.snapshot(MEMBERS, cluster_id="other", proof=KIT.proof(cluster_id="other")), "wrong_cluster")


def test_unproven_snapshot_refused_when_a_system_key_is_set():
    _rejected(KIT.snapshot(MEMBERS, proof=None), "no_admin_proof")
    # without a system key (development clusters) a self-signed snapshot is accepted
    verify_snapshot(KIT.snapshot(MEMBERS, proof=None), Trust(KIT.cluster_id, None), timefmt.now_ns())


@pytest.mark.parametrize(
    "proof_kw,text",
    [
        ({"signer": KeyPair.generate()}, "not signed by this cluster's system key"),
        ({"role": "viewer"}, "role is 'viewer'"),
        ({"cluster_id": "other"}, "for cluster 'other'"),
        ({"admin": KeyPair.generate()}, "names"),
    ],
)
def test_invalid_admin_proofs(proof_kw, text):
    assert text in _rejected(KIT.snapshot(MEMBERS, proof=KIT.proof(**proof_kw)), "proof_invalid")


def test_expired_proof():
    now = timefmt.now_ns()
    proof = KIT.proof(valid_from=now - 48 * HOUR, valid_until=now - 24 * HOUR)
    assert "valid" in _rejected(KIT.snapshot(MEMBERS, proof=proof), "proof_expired")
    not_yet = KIT.proof(valid_from=now + HOUR, valid_until=now + 48 * HOUR)
    _rejected(KIT.snapshot(MEMBERS, proof=not_yet), "proof_expired")


def test_revoked_admin():
    t = trust(revoked_admins=frozenset({KIT.admin.peer_id}))
    assert "revoked" in _rejected(KIT.snapshot(MEMBERS), "revoked_admin", t)


def test_future_dated_snapshot():
    _rejected(KIT.snapshot(MEMBERS, issued_at=timefmt.now_ns() + HOUR), "future")


def test_revocation_must_be_signed_by_the_system_key():
    rev = KIT.revocation([KIT.admin])
    assert verify_revocation(rev, trust(), timefmt.now_ns()).admins == (KIT.admin.peer_id,)
    with pytest.raises(Rejected) as info:
        verify_revocation(KIT.revocation([KIT.admin], signer=KIT.admin), trust(), timefmt.now_ns())
    assert info.value.code == "bad_signature"


def test_duplicate_members_and_bad_fields_are_malformed():
    dup = KIT.snapshot(MEMBERS + MEMBERS)
    with pytest.raises(DecodeError, match="listed twice"):
        verify_snapshot(dup, trust(), timefmt.now_ns())
    payload = codec.decode(KIT.snapshot(MEMBERS).payload)
    payload["issued_at"] = "yesterday"
    bad = Envelope.seal("membership-snapshot", payload, KIT.admin)
    with pytest.raises(DecodeError, match="RFC 3339"):
        verify_snapshot(bad, trust(), timefmt.now_ns())


def test_rfc3339_nanoseconds():
    ns = 1_795_000_000_123_456_789
    text = timefmt.format_ns(ns)
    assert text.endswith(".123456789Z")
    assert timefmt.parse_ns(text) == ns
    assert timefmt.parse_ns("2026-11-23T18:00:00.5+01:00") == timefmt.parse_ns("2026-11-23T17:00:00.500000000Z")
    for bad in ("2026-02-30T00:00:00Z", "2026-11-23 17:00:00Z", "2026-11-23T25:00:00Z"):
        with pytest.raises(DecodeError):
            timefmt.parse_ns(bad)


@settings(max_examples=300)
@given(st.binary(max_size=400))
def test_fuzz_envelope_bytes(data):
    try:
        env = Envelope.from_bytes(data)
        verify_snapshot(env, trust(), timefmt.now_ns())
    except DecodeError:
        pass


@settings(max_examples=200)
@given(st.dictionaries(st.sampled_from(["cluster_id", "issued_at", "issuer_peer_id", "members", "admin_proof", "x"]),
                       st.one_of(st.none(), st.integers(), st.text(max_size=20), st.binary(max_size=20),
                                 st.lists(st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=3), max_size=3))))
def test_fuzz_snapshot_payload(payload):
    env = Envelope.seal("membership-snapshot", payload, KIT.admin)
    with pytest.raises(DecodeError):
        verify_snapshot(env, trust(), timefmt.now_ns())
