"""The cluster control plane: signed documents, membership, heartbeats, status, health, connectivity."""
