"""Transport layer: raw transports (TCP, WebSocket) and the libp2p upgrade (multistream, noise, yamux)."""
