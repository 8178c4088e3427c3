"""Entrypoint of the frontend role: `python -m workers.frontend --nats-url URL [flags]`.

The same as `dynamo-bus frontend`; kept so each process role has a file of its own to
point a container or a process manager at."""

import sys

from dynamo_bus.cli import main

if __name__ == "__main__":
    sys.exit(main(["frontend", *sys.argv[1:]]))
