"""One router module per resource, as in full-stack-fastapi-template."""
