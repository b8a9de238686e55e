"""multistream-select 1.0 sans-IO cores: agreement, na, ls, trailing bytes, malformed input."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pnode.errors import NegotiationFailed, ProtocolError
from p2pnode.transport import multistream as ms


def run(dialer: ms.MultistreamDialerCore, listener: ms.MultistreamListenerCore, after: bytes = b""):
    """Pump bytes between the two cores until both are done."""
    dialer.send_proposal()
    listener.send_header()
    to_listener = dialer.data_to_send() + after
    to_dialer = listener.data_to_send()
    done_l = done_d = None
    for _ in range(50):
        if to_listener and done_l is None:
            done_l = (listener.receive_data(to_listener) or [None])[0]
            to_dialer += listener.data_to_send()
        to_listener = b""
        if to_dialer and done_d is None:
            done_d = (dialer.receive_data(to_dialer) or [None])[0]
            to_listener += dialer.data_to_send()
        to_dialer = b""
        if done_l and done_d:
            return done_d, done_l
    raise AssertionError("negotiation did not finish")


def test_wire_format_matches_spec_example():
    assert ms.encode_line("na") == bytes.fromhex("036e610a")
    dialer = ms.MultistreamDialerCore(["/noise"])
    dialer.send_proposal()
    assert dialer.data_to_send() == b"\x13/multistream/1.0.0\n\x07/noise\n"


def test_agreement_and_trailing_bytes_are_kept():
    d, l = run(ms.MultistreamDialerCore(["/yamux/1.0.0"]), ms.MultistreamListenerCore({"/yamux/1.0.0"}), after=b"early-data")
    assert d.protocol == l.protocol == "/yamux/1.0.0"
    assert l.trailing == b"early-data"


def test_na_then_next_proposal():
    d, l = run(ms.MultistreamDialerCore(["/a", "/b", "/c"]), ms.MultistreamListenerCore({"/b", "/c"}))
    assert d.protocol == "/b" and l.protocol == "/b"


def test_nothing_in_common():
    dialer, listener = ms.MultistreamDialerCore(["/a", "/b"]), ms.MultistreamListenerCore({"/z"})
    with pytest.raises(NegotiationFailed, match=r"none of \['/a', '/b'\]"):
        run(dialer, listener)


def test_ls_lists_supported_protocols():
    listener = ms.MultistreamListenerCore({"/b", "/a"})
    dialer = ms.MultistreamDialerCore()
    dialer.send_ls()
    listener.send_header()
    listener.receive_data(dialer.data_to_send())
    reply = listener.data_to_send()
    (result,) = dialer.receive_data(reply)
    assert result == ms.ProtocolsListed(["/a", "/b"])


@pytest.mark.parametrize(
    "wire,message",
    [
        (ms.encode_line("/multistream/2.0.0"), "does not speak"),
        (b"\x05hello", "does not end with a newline"),
        (b"\x04\xff\xfe\xfd\n", "not UTF-8"),
        (b"\xff\xff\x03", "exceeds the maximum"),
    ],
)
def test_malformed_input_is_a_protocol_error(wire, message):
    with pytest.raises(ProtocolError, match=message):
        ms.MultistreamListenerCore({"/a"}).receive_data(wire)


def test_listener_gives_up_after_too_many_proposals():
    listener = ms.MultistreamListenerCore({"/a"})
    wire = ms.encode_line(ms.PROTOCOL_ID) + b"".join(ms.encode_line(f"/x{i}") for i in range(ms.MAX_ATTEMPTS + 1))
    with pytest.raises(NegotiationFailed, match="more than"):
        listener.receive_data(wire)


def test_dialer_rejects_unexpected_answer():
    dialer = ms.MultistreamDialerCore(["/a"])
    with pytest.raises(ProtocolError, match="unexpected multistream answer"):
        dialer.receive_data(ms.encode_line(ms.PROTOCOL_ID) + ms.encode_line("/b"))


@given(st.binary(max_size=200))
def test_listener_fuzz_only_protocol_errors(data):
    listener = ms.MultistreamListenerCore({"/a"})
    try:
        listener.receive_data(data)
    except ProtocolError:
        pass


@given(st.binary(max_size=200))
def test_dialer_fuzz_only_protocol_errors(data):
    dialer = ms.MultistreamDialerCore(["/a", "/b"])
    try:
        dialer.receive_data(data)
    except ProtocolError:
        pass
