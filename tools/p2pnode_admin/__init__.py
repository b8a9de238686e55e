"""p2pnode-admin: create cluster keys and admin proofs, sign and publish membership snapshots
and revocations, inspect any signed object. Runs on an operator's machine, not on nodes."""
