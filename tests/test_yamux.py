"""yamux sans-IO core: frame layout, flags on the right frame types, windows as deltas, limits."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pnode.errors import ProtocolError
from p2pnode.transport import yamux as y

KiB = 1024


def pair(**kw):
    return y.YamuxCore(is_client=True, **kw), y.YamuxCore(is_client=False, **kw)


def send(core: y.YamuxCore, sid: int, data: bytes) -> bytes:
    """Queue data on `sid` and take everything queued (the data frames, after any control frames)."""
    core.send_data(sid, data)
    return core.data_to_send()


def headers(wire: bytes):
    """Decode a run of frames into (type, flags, stream, length) tuples (data bodies skipped)."""
    out, pos = [], 0
    while pos < len(wire):
        _, t, f, s, n = y.HEADER.unpack_from(wire, pos)
        out.append((t, f, s, n))
        pos += y.HEADER_LEN + (n if t == y.TYPE_DATA else 0)
    return out


def test_open_sends_syn_on_a_window_update_and_ack_comes_back():
    c, s = pair()
    sid = c.open_stream()
    assert sid == 1 and c.open_stream() == 3  # clients use odd ids
    syn = c.data_to_send()
    assert syn[:12] == bytes.fromhex("00 01 0001 00000001 00000000")  # v0, WINDOW_UPDATE, SYN, id 1, delta 0
    events = s.receive_data(syn)
    assert events == [y.StreamOpened(1), y.StreamOpened(3)]
    assert headers(s.data_to_send()) == [(y.TYPE_WINDOW_UPDATE, y.FLAG_ACK, 1, 0), (y.TYPE_WINDOW_UPDATE, y.FLAG_ACK, 3, 0)]


def test_data_frames_carry_no_flags_and_fin_rst_ride_window_updates():
    c, s = pair()
    sid = c.open_stream()
    s.receive_data(c.data_to_send())
    wire = send(c, sid, b"hello")
    assert headers(wire) == [(y.TYPE_DATA, 0, sid, 5)]
    assert s.receive_data(wire) == [y.DataReceived(sid, b"hello")]
    c.send_close(sid)
    fin = c.data_to_send()
    assert headers(fin) == [(y.TYPE_WINDOW_UPDATE, y.FLAG_FIN, sid, 0)]
    assert s.receive_data(fin) == [y.StreamEnded(sid)]
    # half-closed: the other direction still works
    c.receive_data(s.data_to_send())
    assert c.receive_data(send(s, sid, b"back")) == [y.DataReceived(sid, b"back")]
    s.send_reset(sid)
    rst = s.data_to_send()
    assert headers(rst) == [(y.TYPE_WINDOW_UPDATE, y.FLAG_RST, sid, 0)]
    assert c.receive_data(rst) == [y.StreamResetByPeer(sid)]


def test_syn_on_a_data_frame_is_accepted():
    s = y.YamuxCore(is_client=False)
    frame = y.encode_header(y.TYPE_DATA, y.FLAG_SYN, 1, 3) + b"abc"
    assert s.receive_data(frame) == [y.StreamOpened(1), y.DataReceived(1, b"abc")]


def test_window_update_is_a_delta():
    c, s = pair()
    sid = c.open_stream()
    s.receive_data(c.data_to_send())
    c.receive_data(s.data_to_send())
    assert c.send_window(sid) == 256 * KiB
    s.receive_data(send(c, sid, b"x" * 200 * KiB))
    assert c.send_window(sid) == 56 * KiB
    s.consume(sid, 200 * KiB, now=0.0)  # consumed ≥ half the window: grant it back
    grant = s.data_to_send()
    assert headers(grant) == [(y.TYPE_WINDOW_UPDATE, 0, sid, 200 * KiB)]
    assert c.receive_data(grant) == [y.WindowUpdated(sid)]
    assert c.send_window(sid) == 256 * KiB  # 56 + 200: added, not replaced


def test_small_reads_do_not_send_an_update_per_read():
    c, s = pair()
    sid = c.open_stream()
    s.receive_data(c.data_to_send())
    s.data_to_send()
    s.receive_data(send(c, sid, b"x" * 1000))
    s.consume(sid, 1000, now=0.0)
    assert s.data_to_send() == b""


def test_sender_cannot_exceed_window():
    c, s = pair()
    sid = c.open_stream()
    with pytest.raises(ProtocolError, match="exceed the send window"):
        send(c, sid, b"x" * (256 * KiB + 1))


def test_receiver_detects_window_overrun():
    s = y.YamuxCore(is_client=False)
    s.receive_data(y.encode_header(y.TYPE_WINDOW_UPDATE, y.FLAG_SYN, 1, 0))
    with pytest.raises(ProtocolError, match="window overrun"):
        s.receive_data(y.encode_header(y.TYPE_DATA, 0, 1, 256 * KiB + 1))  # refused on the header alone


def test_auto_tuning_grows_window_when_grants_come_fast():
    c, s = pair()
    s.rtt = 1.0
    sid = c.open_stream()
    s.receive_data(c.data_to_send())
    c.receive_data(s.data_to_send())
    sent = 0
    for now in (0.0, 0.5, 1.0, 1.5):  # each grant within 2×RTT of the previous one
        n = c.send_window(sid)
        s.receive_data(send(c, sid, b"x" * n))
        sent += n
        s.consume(sid, n, now=now)
        c.receive_data(s.data_to_send())
    assert s.window_size(sid) == 2 * 1024 * KiB  # 256K → 512K → 1M → 2M
    assert c.send_window(sid) == 2 * 1024 * KiB


def test_window_growth_is_capped_and_slow_reader_does_not_grow():
    c, s = pair(max_window=512 * KiB)
    s.rtt = 0.001
    sid = c.open_stream()
    s.receive_data(c.data_to_send())
    for now in (0.0, 10.0, 20.0):  # grants far apart: no growth
        s.receive_data(send(c, sid, b"x" * 128 * KiB))
        s.consume(sid, 128 * KiB, now=now)
        c.receive_data(s.data_to_send())
    assert s.window_size(sid) == 256 * KiB
    s.rtt = 100.0
    for now in (30.0, 30.1, 30.2):
        s.receive_data(send(c, sid, b"x" * 128 * KiB))
        s.consume(sid, 128 * KiB, now=now)
        c.receive_data(s.data_to_send())
    assert s.window_size(sid) == 512 * KiB


def test_inbound_stream_limit_resets_extra_streams():
    c, s = pair(max_inbound_streams=2)
    for _ in range(3):
        c.open_stream()
    events = s.receive_data(c.data_to_send())
    assert events[:2] == [y.StreamOpened(1), y.StreamOpened(3)]
    assert events[2] == y.StreamRefused(5, "inbound stream limit 2 reached")
    assert (y.TYPE_WINDOW_UPDATE, y.FLAG_RST, 5, 0) in headers(s.data_to_send())


def test_closed_streams_free_their_slot():
    c, s = pair(max_inbound_streams=1)
    sid = c.open_stream()
    s.receive_data(c.data_to_send())
    c.send_close(sid)
    s.receive_data(c.data_to_send())
    s.send_close(sid)
    assert s.stream_count == 0
    c.open_stream()
    assert s.receive_data(c.data_to_send()) == [y.StreamOpened(3)]


def test_ping_is_answered_with_the_same_opaque_value():
    c, s = pair()
    opaque = c.send_ping()
    ping = c.data_to_send()
    assert headers(ping) == [(y.TYPE_PING, y.FLAG_SYN, 0, opaque)]
    s.receive_data(ping)
    pong = s.data_to_send()
    assert headers(pong) == [(y.TYPE_PING, y.FLAG_ACK, 0, opaque)]
    assert c.receive_data(pong) == [y.PongReceived(opaque)]


def test_go_away_stops_new_streams_both_ways():
    c, s = pair()
    s.send_go_away(y.GO_AWAY_NORMAL)
    ga = s.data_to_send()
    assert headers(ga) == [(y.TYPE_GO_AWAY, 0, 0, 0)]
    assert c.receive_data(ga) == [y.GoAwayReceived(0)]
    with pytest.raises(ProtocolError, match="go-away"):
        c.open_stream()
    # a SYN that crosses our go-away is refused with RST
    c2 = y.YamuxCore(is_client=True)
    c2.open_stream()
    assert s.receive_data(c2.data_to_send()) == [y.StreamRefused(1, "going away")]


@pytest.mark.parametrize(
    "frame,message",
    [
        (bytes([1]) + bytes(11), "version 1"),
        (y.encode_header(9, 0, 1, 0), "unknown yamux frame type 9"),
        (y.encode_header(y.TYPE_WINDOW_UPDATE, y.FLAG_SYN, 2, 0), "with our parity"),
        (y.encode_header(y.TYPE_PING, y.FLAG_SYN, 5, 0), "ping on a non-zero"),
        (y.encode_header(y.TYPE_GO_AWAY, 0, 5, 0), "go-away on a non-zero"),
        (y.encode_header(y.TYPE_DATA, 0, 0, 0), "stream 0"),
    ],
)
def test_protocol_violations(frame, message):
    s = y.YamuxCore(is_client=False)
    with pytest.raises(ProtocolError, match=message):
        s.receive_data(frame)


def test_data_after_fin_is_a_protocol_error():
    s = y.YamuxCore(is_client=False)
    s.receive_data(y.encode_header(y.TYPE_WINDOW_UPDATE, y.FLAG_SYN, 1, 0))
    s.receive_data(y.encode_header(y.TYPE_WINDOW_UPDATE, y.FLAG_FIN, 1, 0))
    with pytest.raises(ProtocolError, match="after its FIN"):
        s.receive_data(y.encode_header(y.TYPE_DATA, 0, 1, 1) + b"x")


def test_large_sends_split_to_fit_one_noise_frame():
    c, s = pair()
    sid = c.open_stream()
    wire = send(c, sid, b"x" * 200 * KiB)
    lengths = [h[3] for h in headers(wire)]
    assert max(lengths) == y.MAX_DATA_FRAME and sum(lengths) == 200 * KiB


@settings(max_examples=300)
@given(st.binary(max_size=400))
def test_fuzz_only_protocol_errors(data):
    s = y.YamuxCore(is_client=False, max_inbound_streams=4)
    try:
        s.receive_data(data)
    except ProtocolError:
        pass
    assert s.stream_count <= 4


@settings(max_examples=100)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 15), st.integers(0, 8), st.integers(0, 300 * KiB)), max_size=12))
def test_fuzz_structured_frames(frames):
    s = y.YamuxCore(is_client=False)
    wire = b"".join(
        y.encode_header(t, f, sid, n) + (b"z" * min(n, 2000) if t == y.TYPE_DATA else b"") for t, f, sid, n in frames
    )
    try:
        s.receive_data(wire)
    except ProtocolError:
        pass
