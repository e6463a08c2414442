"""The reference the hot read routes are measured against (`scripts/api_bench.py`).

The least a FastAPI route can do for a status poll on this stack: check a bearer key and
return one Redis hash as JSON, read with redis.asyncio. Served by uvicorn exactly as the
API is (one process, same flags), it says what FastAPI + Redis allow on this machine, so
the API's figures are judged against it rather than against absolute numbers.

    REDIS_URL=redis://... BENCH_KEY=sk-... uvicorn api_bench_reference:app --app-dir scripts
"""

from __future__ import annotations

import hmac
import os
from typing import Annotated

import redis.asyncio as aioredis
from fastapi import FastAPI, Header
from fastapi.responses import JSONResponse

EXPECTED = f"Bearer {os.environ['BENCH_KEY']}".encode()
app = FastAPI()
store = aioredis.Redis.from_url(os.environ["REDIS_URL"], decode_responses=True)


@app.get("/ref/{key:path}")
async def read_hash(key: str, authorization: Annotated[str, Header()] = "") -> JSONResponse:
    """The hash at `key` (e.g. `seco:job:<id>`) as a JSON object; 401 without the key."""
    if not hmac.compare_digest(authorization.encode(), EXPECTED):
        return JSONResponse({"error": "unauthorized"}, status_code=401)
    return JSONResponse(await store.hgetall(key))
