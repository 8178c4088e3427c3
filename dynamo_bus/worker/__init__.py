"""The worker runtime: pulls requests from its work queue into an engine and streams
tokens back."""
