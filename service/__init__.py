"""The HTTP service: an OpenAI-fine-tuning-compatible API over Redis and Celery.

Kept free of imports so that `import service.cli` (the client CLI) and
`import service.record.store` (the worker) stay light.
"""
