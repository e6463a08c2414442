"""Celery worker: turns a queued fine-tuning job into a trained LoRA adapter."""
