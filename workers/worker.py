"""Entrypoint of the worker role: `python -m workers.worker --nats-url URL [flags]`.

The same as `dynamo-bus worker`; kept so each process role has a file of its own to
point a container or a process manager at."""

import sys

from dynamo_bus.cli import main

if __name__ == "__main__":
    sys.exit(main(["worker", *sys.argv[1:]]))
