"""`seco serve`: the inference process (transformers + peft) behind vLLM's OpenAI-server contract.

The API forwards completions to it over HTTP (`SECO_INFERENCE_URL`), so a vLLM server with
runtime LoRA loading can stand in for it. It never imports the API (`tests/test_layout.py`).

- app.py        the FastAPI app: /health, /v1/models, /v1/load_lora_adapter, /v1/unload_lora_adapter,
                /v1/completions, /v1/chat/completions (plain and SSE)
- requests.py   OpenAI request bodies checked field by field (a 400 naming the param)
- responses.py  OpenAI response and stream-chunk shapes
- adapters.py   where an adapter's files come from (a local directory or the service's storage)
- models.py     a served base model: tokenizer, context length, its adapters in an LRU
- engine.py     the one model thread: interleaves the steps of every running request
- errors.py     the OpenAI error body
"""
