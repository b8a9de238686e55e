"""A hostile peer's toolkit (issue 8): attacks on a node, and the harness that measures them.

- `attacks`: one async function per attack, `await fn(target, seconds, **intensity) -> counts`;
  `ATTACKS` maps names to them.
- `payloads`: hostile documents (shared-reference snapshot, CBOR bomb, bogus revocations).
- `server`: a hostile peer that serves poisoned document pulls.
- `frames`: hand-made yamux, multistream and WebSocket bytes; `RawMux`, a yamux client by hand.
- `wire`: the only module that touches `p2pnode.transport` internals.
- `harness`: a real `p2pnode run` process, a good peer pinging it, /proc measurements.
- `goodpeer`: the good peer's process.
"""
