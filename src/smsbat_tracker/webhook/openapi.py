"""The webhook's OpenAPI 3.1 document, generated from the models that check and answer pushes.

Served at ``GET /openapi.json``; its schemas come from :mod:`smsbat_tracker.webhook.schema`,
so the document cannot drift from what the receiver accepts.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from smsbat_tracker.provider.models import MAX_MESSAGE_ID_LENGTH, MESSAGE_ID_PATTERN
from smsbat_tracker.webhook.auth import TOKEN_HEADER, TOKEN_QUERY
from smsbat_tracker.webhook.schema import (
    MAX_BODY_BYTES,
    Accepted,
    Health,
    PushBody,
    Rejection,
    Unauthorized,
)

__all__ = ["openapi_document"]


def _answer(description: str, model: type[BaseModel]) -> dict[str, Any]:
    schema = model.model_json_schema()
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def openapi_document(root_path: str = "") -> dict[str, Any]:
    """The OpenAPI 3.1 document served at ``/openapi.json``, its schemas from the models
    the receiver validates and answers with; ``root_path``, the prefix the receiver is
    mounted at, becomes its server URL."""
    servers = {"servers": [{"url": root_path}]} if root_path else {}
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "smsbat-tracker webhook",
            "version": "1",
            "description": "Receives SMSBAT delivery-status pushes; serves campaign pages.",
        },
        **servers,
        "paths": {
            "/webhook": {
                "post": {
                    "operationId": "pushStatus",
                    "summary": "Receive one status change pushed by SMSBAT",
                    "parameters": [
                        {
                            "name": TOKEN_QUERY,
                            "in": "query",
                            "required": False,
                            "schema": {"type": "string"},
                            "description": "the shared secret (SMSBAT_WEBHOOK_TOKEN)",
                        },
                        {
                            "name": TOKEN_HEADER,
                            "in": "header",
                            "required": False,
                            "schema": {"type": "string"},
                            "description": "the shared secret, as an alternative to the query",
                        },
                    ],
                    "security": [{"queryToken": []}, {"headerToken": []}],
                    "requestBody": {
                        "required": True,
                        "description": f"at most {MAX_BODY_BYTES} bytes",
                        "content": {"application/json": {"schema": PushBody.model_json_schema()}},
                    },
                    "responses": {
                        "200": _answer(
                            "accepted: stored, or ignored as a duplicate or stale push", Accepted
                        ),
                        "400": _answer("not a UTF-8 JSON object, or bad Content-Length", Rejection),
                        "401": _answer("missing or wrong token", Unauthorized),
                        "413": _answer(f"body larger than {MAX_BODY_BYTES} bytes", Rejection),
                        "415": _answer("Content-Type is not application/json", Rejection),
                        "422": _answer("a field is missing or invalid", Rejection),
                        "503": _answer("Redis is unreachable; retry later", Rejection),
                    },
                }
            },
            "/healthz": {
                "get": {
                    "operationId": "health",
                    "summary": "Whether Redis answers",
                    "responses": {
                        "200": _answer("Redis answers PING", Health),
                        "503": _answer("Redis is unreachable", Health),
                    },
                }
            },
            "/campaigns/{campaign_id}": {
                "get": {
                    "operationId": "campaignPage",
                    "summary": "A campaign's delivery report page, for people",
                    "description": "Off (404) until SMSBAT_REPORT_PASSWORD is set; HTTP Basic "
                    "with SMSBAT_REPORT_USER and that password.",
                    "parameters": [
                        {
                            "name": "campaign_id",
                            "in": "path",
                            "required": True,
                            # The message-id rule: one URL path segment as it is.
                            "schema": {
                                "type": "string",
                                "pattern": MESSAGE_ID_PATTERN,
                                "maxLength": MAX_MESSAGE_ID_LENGTH,
                            },
                        }
                    ],
                    "security": [{"reportLogin": []}],
                    "responses": {
                        "200": {
                            "description": "the page: self-contained HTML with SVG charts",
                            "content": {"text/html": {"schema": {"type": "string"}}},
                        },
                        "400": _answer("not a campaign id", Rejection),
                        "401": _answer("missing or wrong login, whatever the id", Unauthorized),
                        "404": _answer("no such campaign, or the pages are off", Rejection),
                        "501": _answer("the report extra (matplotlib) is not installed", Rejection),
                        "503": _answer("Redis is unreachable; retry later", Rejection),
                    },
                }
            },
            "/openapi.json": {
                "get": {
                    "operationId": "openapi",
                    "summary": "This document",
                    "responses": {"200": {"description": "the OpenAPI document"}},
                }
            },
        },
        "components": {
            "securitySchemes": {
                "queryToken": {"type": "apiKey", "in": "query", "name": TOKEN_QUERY},
                "headerToken": {"type": "apiKey", "in": "header", "name": TOKEN_HEADER},
                "reportLogin": {"type": "http", "scheme": "basic"},
            }
        },
    }
