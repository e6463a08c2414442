"""The `seco` command-line client: `cli` (the console script's dispatcher), `commands`
(submit, jobs, follow, download, ...), `http` (the API client), `sse` (resumable event
streams) and `format` (terminal output).

Imports only the standard library, httpx and its own modules: a laptop needs neither
torch nor the server stack to use it (tests/service/client checks this).
"""
