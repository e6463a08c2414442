"""The HTTP API: an OpenAI-fine-tuning-compatible service on FastAPI.

`app.create_app` wires routers (`routes/`), authentication, the streaming upload parser,
error bodies, Prometheus metrics and the dashboard (`static/`). It reads and writes the
shared record (`service.record`) and queues jobs by Celery task *name*, so the API
process never imports torch or the training code.
"""
