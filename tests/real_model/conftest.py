"""The real pretrained model (SmolLM2-135M-Instruct) and real English text for these tests.

`real_model_dir` builds the model with scripts/build_real_model.py when it is not built yet
(idempotent; `scripts/dev.sh test` has built it before pytest starts): a test that needs it
fails with the build's error instead of skipping.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.seco_core.conftest import float64_norms  # noqa: F401 (re-exported as a fixture here)

TEXT = Path(__file__).with_name("public_domain.txt")


def paragraphs() -> list[str]:
    """The paragraphs of public_domain.txt (real English prose, see SOURCES.md), in order."""
    return [p.strip() for p in TEXT.read_text().split("\n\n") if p.strip()]


@pytest.fixture(scope="session")
def real_model_dir() -> Path:
    """SmolLM2-135M-Instruct as a float32 Hugging Face directory, built once into .cache/models."""
    from scripts.build_real_model import DEFAULT_DIR, build

    return build(Path(os.environ.get("SECO_REAL_MODEL_DIR", DEFAULT_DIR)), log=False)
