"""Responses of the hot read routes, serialised once.

A route that returns a pydantic model under `response_model` has FastAPI dump it, validate
the dump against the model again and dump that: three passes over every job of a list.
These routes build their model once (with the same mapping functions as every other route)
and answer its JSON directly, byte for byte what FastAPI would have sent: Starlette's JSON
rendering of the model's JSON-mode dump (non-finite floats as null, as before).
`response_model` stays on the routes for the OpenAPI schema.
"""

from __future__ import annotations

from pydantic import BaseModel
from starlette.responses import JSONResponse


def json_response(model: BaseModel) -> JSONResponse:
    """`model` as FastAPI would serialise it for a `response_model` of its own class."""
    return JSONResponse(model.model_dump(mode="json"))
