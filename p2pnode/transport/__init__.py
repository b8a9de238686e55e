"""Transport: raw byte streams (TCP, WebSocket) secured with Noise and multiplexed with yamux.

Each protocol is a sans-IO core in `<protocol>.py` — a `<Protocol>Core` class (multistream has a
dialer and a listener core) with one shape: `send_*` methods queue output, `receive_data(bytes)`
returns a list of events (and may queue replies), `data_to_send()` drains the queue in order —
and a thin trio driver in `<protocol>_trio.py`: `multistream_trio` (select/answer),
`noise_trio` (NoiseStream), `yamux_trio` (YamuxConnection/YamuxStream), `websocket_trio`
(WebSocketStream over wsproto's core). `raw` dials and listens, `upgrade` chains the stages.
"""
