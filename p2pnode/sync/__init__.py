"""Folder sync, local half: what a source indexes (scanner, watcher, blocks, ignore rules), what a
receiver writes (planner, apply) and the sync.db they share (index_db). The network half (the
service, its protocols, the controller) moves index chunks and blocks between nodes."""
