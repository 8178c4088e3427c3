"""Serving: the OpenAI API over the bus.

``openai_api`` (request parsing and response shapes), ``service`` (a completion: tokenize,
submit, detokenize, stop strings, usage), ``requester`` (submits to the request log and
follows the token stream back), ``frontend`` (the aiohttp HTTP server) and ``client``
(:class:`DynamoClient`, the Python SDK over HTTP or straight over NATS).
"""

from dynamo_bus.serving.client import DynamoClient
from dynamo_bus.serving.frontend import make_app, start_http
from dynamo_bus.serving.requester import Requester
from dynamo_bus.serving.service import CompletionService

__all__ = ["CompletionService", "DynamoClient", "Requester", "make_app", "start_http"]
