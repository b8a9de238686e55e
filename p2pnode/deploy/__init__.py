"""The deploy engine's local half: command values, releases, safe extraction, scripts, health checks,
service management, docker, and the per-node executor with its durable journal.

The network half (signed commands on the document bus, signed reports, waves across nodes, artifacts
fetched from peers) builds on these modules; nothing here opens a network connection except health
checks, which talk to the service being deployed.
"""
