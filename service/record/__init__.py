"""The system of record shared by the API and the worker.

Settings from the environment, the Redis records and their state machine (`store`, on
the keys of `redis_keys` and the scripts of `lua/`), the queue's contract both sides use
(`queue`: enqueue, claim, lease, requeue, the fair order), where files live (`storage`: a
local directory or S3), id shapes (`ids`), the training-file formats both sides validate
with the same rules (`formats`) and structured logging (`logs`). It imports redis,
pydantic, the object-store client, celery (the queue only) and the standard library:
never the API (FastAPI) nor torch, so the worker and the API can both depend on it
without depending on each other.
"""
