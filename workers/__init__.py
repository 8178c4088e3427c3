"""Thin per-role entrypoints; the roles themselves live in ``dynamo_bus``."""
