"""scripts/real_model_bench.py's cheap search for the longest length under a memory cap.

The search fits peak = a L + b L^2 through measured peaks and solves it for the cap, so
a wrong fit or solve would send the verifying step (minutes of CPU) to a wrong length.
"""

from __future__ import annotations

import pytest

from scripts.real_model_bench import fit_quadratic, rounded, solve_cap


def test_the_fit_recovers_a_quadratic_and_the_solve_inverts_it() -> None:
    a, b = 3000.0, 0.25
    points = [(n, int(a * n + b * n * n)) for n in (1024, 2048, 4096)]
    fa, fb = fit_quadratic(points)
    assert fa == pytest.approx(a, rel=1e-3) and fb == pytest.approx(b, rel=1e-3)
    cap = 4 * 2**30
    length = solve_cap(fa, fb, cap)
    assert a * length + b * length**2 <= cap * (1 + 1e-6) < a * (length + 2) + b * (length + 2) ** 2


def test_linear_peaks_and_one_point() -> None:
    assert solve_cap(*fit_quadratic([(1000, 2_000_000)]), 8_000_000) == 4000
    assert solve_cap(1.0, 0.0, 10) == 10 and solve_cap(0.0, 0.0, 10) == 0
    assert rounded(1000) == 768 and rounded(10) == 256
