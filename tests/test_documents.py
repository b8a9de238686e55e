"""Verification of cluster documents, without a network: every way a snapshot can be refused."""

import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clusterkit import HOUR, ClusterKit
from p2pnode import codec, timefmt
from p2pnode.cluster.documents import MAX_SKEW_NS, Member, Rejected, Revocation, Trust, verify_revocation, verify_snapshot
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


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(["cluster_id", "issued_at", "issuer_peer_id", "members", "admin_proof", "x"]),
                       st.one_of(st.none(), st.integers(), st.text(max_size=20), st.binary(max_size=20),
                                 st.lists(st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=3), max_size=3))))
def test_fuzz_snapshot_payload(payload):
    env = Envelope.seal("membership-snapshot", payload, KIT.admin)
    with pytest.raises(DecodeError):
        verify_snapshot(env, trust(), timefmt.now_ns())


# -- proof validity at the receiver's clock (issue 8 item 7) ------------------------------------------

MINUTE = 60 * 10**9


def test_expired_proof_cannot_be_revived_by_back_dating():
    now = timefmt.now_ns()
    expired = KIT.proof(valid_from=now - 48 * HOUR, valid_until=now - 24 * HOUR)
    backdated = KIT.snapshot(MEMBERS, issued_at=now - 36 * HOUR, proof=expired)
    assert "this node's clock says" in _rejected(backdated, "proof_expired")
    # the node's own stored copy, accepted while the proof was valid, stays in force
    assert verify_snapshot(backdated, trust(), now, stored=True).members == tuple(MEMBERS)
    # and nothing else is relaxed for a stored snapshot
    other = KIT.snapshot(MEMBERS, issued_at=now - 36 * HOUR, proof=KIT.proof(valid_from=now - 48 * HOUR, cluster_id="other"))
    with pytest.raises(Rejected) as info:
        verify_snapshot(other, trust(), now, stored=True)
    assert info.value.code == "proof_invalid"


def test_proof_window_allows_the_clock_skew():
    now = timefmt.now_ns()
    assert MAX_SKEW_NS == 5 * MINUTE
    just_expired = KIT.proof(valid_from=now - HOUR, valid_until=now - 4 * MINUTE)
    verify_snapshot(KIT.snapshot(MEMBERS, issued_at=now - 10 * MINUTE, proof=just_expired), trust(), now)
    expired = KIT.proof(valid_from=now - HOUR, valid_until=now - 6 * MINUTE)
    _rejected(KIT.snapshot(MEMBERS, issued_at=now - 10 * MINUTE, proof=expired), "proof_expired")
    # a proof starting a few minutes ahead of our clock, for a document dated in it, is accepted
    starting = KIT.proof(valid_from=now + 4 * MINUTE, valid_until=now + HOUR)
    verify_snapshot(KIT.snapshot(MEMBERS, issued_at=now + 4 * MINUTE, proof=starting), trust(), now)
    # valid now, but the document is dated outside the window
    current = KIT.proof(valid_from=now - HOUR, valid_until=now + HOUR)
    assert "the document is dated" in _rejected(KIT.snapshot(MEMBERS, issued_at=now - 2 * HOUR, proof=current), "proof_expired")


# -- nothing of a stranger's document is built before its signer is trusted ------------------------------

JUNK_MEMBERS = [{"peer_id": "not a peer id", "addrs": ["/nope"] * 64, "labels": [""]}] * 3


def _payload(issuer: KeyPair, **overrides) -> dict:
    payload = {"cluster_id": KIT.cluster_id, "issued_at": timefmt.now(), "issuer_peer_id": str(issuer.peer_id),
               "members": JUNK_MEMBERS, "admin_proof": None}
    return {**payload, **overrides}


def test_trust_is_decided_before_members_are_parsed():
    stranger = KeyPair.generate()
    cases = [
        (_payload(stranger), stranger, "no_admin_proof"),
        (_payload(stranger, admin_proof=KIT.proof().to_dict()), stranger, "proof_invalid"),  # someone else's proof
        (_payload(KIT.admin), stranger, "bad_signature"),  # names the admin, signed by the stranger
        (_payload(stranger, cluster_id="other"), stranger, "wrong_cluster"),
        (_payload(stranger, issued_at=timefmt.format_ns(timefmt.now_ns() + HOUR)), stranger, "future"),
        (_payload(KIT.admin, admin_proof=KIT.proof(valid_until=timefmt.now_ns() - HOUR).to_dict()), KIT.admin, "proof_expired"),
    ]
    for payload, signer, code in cases:
        _rejected(Envelope.seal("membership-snapshot", payload, signer), code)
    # the same junk from the admin itself is malformed: members are parsed once trust is settled
    with pytest.raises(DecodeError, match="member"):
        verify_snapshot(Envelope.seal("membership-snapshot", _payload(KIT.admin, admin_proof=KIT.proof().to_dict()), KIT.admin),
                        trust(), timefmt.now_ns())


def test_revocation_cluster_and_date_before_its_admin_list():
    junk = {"admins": ["not a peer id"] * 1000, "reason": "x"}
    for fields, code in (({"cluster_id": "other", "issued_at": timefmt.now()}, "wrong_cluster"),
                         ({"cluster_id": KIT.cluster_id, "issued_at": timefmt.format_ns(timefmt.now_ns() + HOUR)}, "future")):
        with pytest.raises(Rejected) as info:
            verify_revocation(Envelope.seal("revocation", {**fields, **junk}, KIT.system), trust(), timefmt.now_ns())
        assert info.value.code == code
    rev = Revocation(KIT.cluster_id, timefmt.now_ns(), (KIT.admin.peer_id,), "lost")
    assert Revocation.from_dict(rev.to_dict()) == rev


def test_shared_reference_bomb_is_refused_cheaply():
    """issue 8: 10,000 references to one 64-address member cost 7-8 s before; now one scan."""
    stranger = KeyPair.generate()
    member = codec.encode({"addrs": [f"/ip4/10.0.0.{i}/tcp/4100" for i in range(64)], "labels": [], "peer_id": str(stranger.peer_id)})
    rest = codec.encode(_payload(stranger, members=[]))
    assert rest[1:].startswith(codec.encode("members") + b"\x80")  # "members" sorts first
    bomb = b"\xa5" + codec.encode("members") + b"\x99\x27\x10\xd8\x1c" + member + b"\xd8\x1d\x00" * 9999 + rest[1 + 9:]
    env = Envelope("membership-snapshot", bomb, stranger.public_key, stranger.sign(signing_bytes("membership-snapshot", bomb)))
    start = time.process_time()
    with pytest.raises(DecodeError, match="tag 28 is not allowed"):
        verify_snapshot(env, trust(), timefmt.now_ns())
    assert time.process_time() - start < 0.05


@settings(max_examples=100, suppress_health_check=[HealthCheck.too_slow])
@given(st.recursive(st.one_of(st.none(), st.integers(-(2**63), 2**63), st.text(max_size=60), st.binary(max_size=8)),
                    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                    max_leaves=20))
def test_fuzz_a_strangers_members_are_never_parsed(members):
    stranger = KeyPair.generate()
    _rejected(Envelope.seal("membership-snapshot", _payload(stranger, members=members), stranger), "no_admin_proof")


def test_admin_documents_check_role_and_proof_before_the_payload():
    """The generic check for admin-signed documents (folder configs, deploy commands)."""
    from p2pnode.cluster.documents import ROLE_ADMIN, ROLE_DEPLOY, verify_admin_document
    from p2pnode.envelope import register_type

    register_type("test-admin-doc", "p2pnode-test-admin-doc-v1")
    register_type("test-admin-doc", "p2pnode-test-admin-doc-v1")  # again, same domain: fine
    with pytest.raises(ValueError):
        register_type("test-other", "p2pnode-test-admin-doc-v1")  # a domain is never shared
    kit = ClusterKit()
    trust = Trust(kit.cluster_id, kit.system.public_key)
    deployer = KeyPair.generate()
    now = timefmt.now_ns()

    def doc(signer, proof, **extra):
        payload = {"cluster_id": kit.cluster_id, "issued_at": timefmt.format_ns(now), "issuer_peer_id": str(signer.peer_id),
                   "admin_proof": proof.to_dict() if proof else None, "body": "x", **extra}
        return Envelope.seal("test-admin-doc", payload, signer)

    head, fields = verify_admin_document(doc(kit.admin, kit.proof()), trust, now, type_="test-admin-doc", roles=frozenset({ROLE_ADMIN}))
    assert head.issuer_peer_id == kit.admin.peer_id and fields.text("body") == "x"
    deploy_proof = kit.proof(deployer, role=ROLE_DEPLOY)
    verify_admin_document(doc(deployer, deploy_proof), trust, now, type_="test-admin-doc", roles=frozenset({ROLE_ADMIN, ROLE_DEPLOY}))
    with pytest.raises(Rejected, match="role is 'deploy', not 'admin'") as exc:
        verify_admin_document(doc(deployer, deploy_proof), trust, now, type_="test-admin-doc", roles=frozenset({ROLE_ADMIN}))
    assert exc.value.code == "proof_invalid"
    for env, code in [
        (doc(kit.admin, None), "no_admin_proof"),
        (doc(kit.admin, kit.proof(deployer)), "proof_invalid"),  # a proof for another key
        (doc(kit.admin, kit.proof(), cluster_id="other"), "wrong_cluster"),
        (doc(kit.admin, kit.proof(), issuer_peer_id=str(deployer.peer_id)), "bad_signature"),
    ]:
        with pytest.raises(Rejected) as exc:
            verify_admin_document(env, trust, now, type_="test-admin-doc", roles=frozenset({ROLE_ADMIN}))
        assert exc.value.code == code
