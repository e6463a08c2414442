"""The service around the `seco_core` library, in three sides and a launcher.

- `service.api`: the HTTP API (FastAPI), OpenAI-fine-tuning compatible. Never imports
  torch nor `worker`: it queues jobs through the queue's contract (`service.record.queue`).
- `service.record`: the system of record shared by the API and the worker (settings,
  Redis store and state machine, storage, ids, training-file formats, logs). Imports
  neither the API nor torch; the worker depends on it, never on the API.
- `service.client`: the `seco` command-line client. Standard library and httpx only, so
  it installs and runs on a laptop without the server stack.
- `service.launch`: `seco up | api | worker`, which start the server side's processes.
- `service.archives`: the one safe extraction of an adapter archive (worker and client).

Kept free of imports so that importing one side loads nothing of the others.
"""
