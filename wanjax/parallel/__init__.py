"""Mesh, sharding rules and sequence-parallel attention; the public entry point is `wanjax.sharding`."""
