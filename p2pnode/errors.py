"""Exception hierarchy shared by every layer; each error says what was wrong with the input."""


class P2PNodeError(Exception):
    """Base class of every error p2pnode raises on purpose."""


class DecodeError(P2PNodeError, ValueError):
    """Bytes or text that do not parse: the message names what was malformed."""


class MessageTooLarge(DecodeError):
    """A length prefix announced more than the configured hard maximum."""


class ProtocolError(P2PNodeError):
    """The remote broke a protocol rule; the stream or connection is closed."""


class HandshakeError(ProtocolError):
    """Connection upgrade (multistream, noise, muxer) failed."""


class PeerIdMismatch(HandshakeError):
    """The remote proved an identity other than the one that was dialed."""


class NegotiationFailed(ProtocolError):
    """multistream-select found no protocol both sides support."""


class StreamReset(P2PNodeError):
    """The stream was reset by either side; data may have been lost."""


class ConnectionClosed(P2PNodeError):
    """The connection is gone; no more streams can be opened on it."""


class DialError(P2PNodeError):
    """Every address of a peer failed; the message lists each attempt."""
