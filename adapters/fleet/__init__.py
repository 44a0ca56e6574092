"""A fleet of worker processes: partition leases in NATS KV (leases.py); the store fences a
stale owner (store/fencing.py)."""
