"""Routing: the pure routing policy, the KV residency index, residency publishing and
watching, and the router role."""
