"""Every NATS subject, JetStream stream, consumer, KV bucket and object store name, built here and
only here. ``subjects.md`` lists the same names with who publishes and who consumes;
``tests/unit/test_subjects.py`` fails when the two disagree.

A namespace (``--namespace``, default ``dynamo``) isolates deployments sharing a
cluster. Model names are free text, so they are escaped into one subject token.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import xxhash

from dynamo_bus.errors import ConfigError

_NAMESPACE_RE = re.compile(r"^[A-Za-z0-9_-]{1,32}$")
_WORKER_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
# Characters a subject token may not hold, plus '%' (the escape character itself).
_TOKEN_UNSAFE = re.compile(r"[\s.*>%]")


def model_token(model: str) -> str:
    """Escape a model name into one subject token, reversibly (percent-encoding)."""
    if not model:
        raise ConfigError("model name is empty")
    return _TOKEN_UNSAFE.sub(lambda m: f"%{ord(m.group(0)):02X}", model)


def model_from_token(token: str) -> str:
    return re.sub(r"%([0-9A-F]{2})", lambda m: chr(int(m.group(1), 16)), token)


def validate_worker_id(worker_id: str) -> str:
    if not _WORKER_ID_RE.match(worker_id):
        raise ConfigError(
            f"worker id {worker_id!r} must be 1-64 of [A-Za-z0-9_-] "
            "(flag --worker-id, env DYNAMO_BUS_WORKER_ID)"
        )
    return worker_id


@dataclass(frozen=True)
class Names:
    """All names of one namespace."""

    namespace: str = "dynamo"

    def __post_init__(self) -> None:
        if not _NAMESPACE_RE.match(self.namespace):
            raise ConfigError(
                f"namespace {self.namespace!r} must be 1-32 of [A-Za-z0-9_-] "
                "(flag --namespace, env DYNAMO_BUS_NAMESPACE)"
            )

    @property
    def _ns(self) -> str:
        return self.namespace

    @property
    def _NS(self) -> str:
        return self.namespace.upper().replace("-", "_")

    # -- request log -------------------------------------------------------------
    @property
    def request_stream(self) -> str:
        return f"DYN_{self._NS}_REQUESTS"

    def request_subject(self, model: str) -> str:
        return f"dyn.{self._ns}.req.{model_token(model)}"

    @property
    def request_subjects(self) -> str:
        return f"dyn.{self._ns}.req.>"

    @property
    def router_consumer(self) -> str:
        return "router"

    # -- per-worker work queues --------------------------------------------------
    @property
    def work_stream(self) -> str:
        return f"DYN_{self._NS}_WORK"

    def work_subject(self, worker_id: str) -> str:
        return f"dyn.{self._ns}.work.{validate_worker_id(worker_id)}"

    @property
    def work_subjects(self) -> str:
        return f"dyn.{self._ns}.work.>"

    def worker_consumer(self, worker_id: str) -> str:
        return f"worker-{validate_worker_id(worker_id)}"

    # -- KV descriptors: prefill -> decode ---------------------------------------
    @property
    def kv_stream(self) -> str:
        return f"DYN_{self._NS}_KV"

    @property
    def kv_subjects(self) -> str:
        return f"dyn.{self._ns}.kv.>"

    def kv_subject(self, model: str, prefix: str, decode_worker: str = "") -> str:
        """Where a prefill worker publishes a request's descriptor: steered to the
        decode worker the router chose (``to.<worker_id>``), or to every decode worker
        of the model (``any``). ``prefix``: the prompt's first block hash, in hex."""
        claim = f"to.{validate_worker_id(decode_worker)}" if decode_worker else "any"
        return f"dyn.{self._ns}.kv.{model_token(model)}.{claim}.{prefix}"

    def kv_unsteered(self, subject: str) -> str:
        """The shared subject for a steered descriptor's subject (same model, same
        prefix)."""
        parts = subject.split(".")
        if len(parts) != 7 or parts[4] != "to":
            raise ValueError(f"{subject!r} is not a steered KV descriptor subject")
        return ".".join([*parts[:4], "any", parts[6]])

    def kv_claim_filter(self, model: str, worker_id: str) -> str:
        return f"dyn.{self._ns}.kv.{model_token(model)}.to.{validate_worker_id(worker_id)}.*"

    def kv_shared_filter(self, model: str) -> str:
        return f"dyn.{self._ns}.kv.{model_token(model)}.any.*"

    def kv_consumer(self, worker_id: str) -> str:
        return f"kv-{validate_worker_id(worker_id)}"

    def kv_shared_consumer(self, model: str) -> str:
        """One durable consumer shared by a model's decode workers (a name may not hold
        every character a model name may: a digest of it)."""
        return f"kv-any-{xxhash.xxh3_64_hexdigest(model.encode())}"

    # -- core NATS ---------------------------------------------------------------
    def response_subject(self, client_id: str, request_id: str) -> str:
        return f"dyn.{self._ns}.resp.{client_id}.{request_id}"

    def response_batch_subject(self, client_id: str) -> str:
        """Where workers send the chunks of this client's requests together
        (``Request.batch_to``); under :meth:`response_subjects` like the rest."""
        return f"dyn.{self._ns}.resp.{client_id}.batch"

    def response_subjects(self, client_id: str) -> str:
        return f"dyn.{self._ns}.resp.{client_id}.>"

    @property
    def cancel_subject(self) -> str:
        return f"dyn.{self._ns}.cancel"

    @property
    def resend_subject(self) -> str:
        return f"dyn.{self._ns}.resend"

    # -- KV buckets --------------------------------------------------------------
    @property
    def workers_bucket(self) -> str:
        return f"dyn_{self._ns}_workers"

    @property
    def load_bucket(self) -> str:
        return f"dyn_{self._ns}_load"

    @property
    def agents_bucket(self) -> str:
        """Each worker's NIXL agent metadata (key: the agent's name), for the workers
        that READ KV out of its memory."""
        return f"dyn_{self._ns}_nixl_agents"

    # -- residency: event batches plus snapshots ----------------------------------
    @property
    def residency_stream(self) -> str:
        return f"DYN_{self._NS}_RESIDENCY"

    def residency_subject(self, worker_id: str) -> str:
        """Where one worker publishes its residency batches."""
        return f"dyn.{self._ns}.residency.events.{validate_worker_id(worker_id)}"

    @property
    def residency_subjects(self) -> str:
        return f"dyn.{self._ns}.residency.events.*"

    @property
    def residency_snapshots(self) -> str:
        """The object store holding each worker's residency snapshot (object name:
        the worker id)."""
        return f"dyn_{self._ns}_residency"

    def residency_sync_subject(self, worker_id: str) -> str:
        """Ask one worker to write its residency snapshot now."""
        return f"dyn.{self._ns}.residency.sync.{validate_worker_id(worker_id)}"

    def all_names(self) -> dict[str, str]:
        """Every name with a placeholder for its variable parts (what subjects.md lists)."""
        return {
            "request_stream": self.request_stream,
            "request_subject": f"dyn.{self._ns}.req.<model>",
            "router_consumer": self.router_consumer,
            "work_stream": self.work_stream,
            "work_subject": self.work_subject("W").replace(".W", ".<worker_id>"),
            "worker_consumer": self.worker_consumer("W").replace("-W", "-<worker_id>"),
            "kv_stream": self.kv_stream,
            "kv_subject_steered": f"dyn.{self._ns}.kv.<model>.to.<worker_id>.<prefix>",
            "kv_subject_shared": f"dyn.{self._ns}.kv.<model>.any.<prefix>",
            "kv_consumer": self.kv_consumer("W").replace("-W", "-<worker_id>"),
            "kv_shared_consumer": "kv-any-<model digest>",
            "response_subject": self.response_subject("<client_id>", "<request_id>"),
            "response_batch_subject": self.response_batch_subject("<client_id>"),
            "cancel_subject": self.cancel_subject,
            "resend_subject": self.resend_subject,
            "workers_bucket": self.workers_bucket,
            "load_bucket": self.load_bucket,
            "agents_bucket": self.agents_bucket,
            "residency_stream": self.residency_stream,
            "residency_subject": self.residency_subject("W").replace(".W", ".<worker_id>"),
            "residency_snapshots": self.residency_snapshots,
            "residency_snapshot_object": "<worker_id>",
            "residency_sync_subject":
                self.residency_sync_subject("W").replace(".W", ".<worker_id>"),
        }
