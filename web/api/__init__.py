"""The REST API under /api/v1 (JSON; the OpenAPI document is at /api/v1/openapi.json)."""
