"""Serving: OpenAI API shapes, the completion service over the bus, the requester, the
HTTP frontend and the DynamoClient SDK."""
