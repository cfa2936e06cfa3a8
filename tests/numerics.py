"""The suite's one numerics helper: how close is close enough.

A fast path is compared with a reference computed in fp32. Its error must be at most twice the error that the
reference itself makes when run in the same low precision, plus a floor per dtype. Tests do not invent their own
tolerances: they call `assert_close` (or `relative_error` to report a figure).
"""

from __future__ import annotations

import torch

FLOORS = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2, torch.float64: 1e-12}


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Relative RMS error ||actual - expected|| / ||expected|| (both in fp64); 0 when both are zero."""
    actual = actual.detach().to(torch.float64).cpu()
    expected = expected.detach().to(torch.float64).cpu()
    if actual.shape != expected.shape:
        raise AssertionError(f"shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    if not torch.isfinite(actual).all():
        raise AssertionError("actual holds NaN or inf (an element left unwritten?)")
    denom = expected.norm()
    diff = (actual - expected).norm()
    if denom == 0:
        return float(diff)
    return float(diff / denom)


def tolerance(dtype: torch.dtype, low_precision_reference_error: float | None = None) -> float:
    """Allowed relative error: 2 x the reference's own error in `dtype` (if given) plus the dtype's floor."""
    floor = FLOORS[dtype]
    return floor + (2.0 * low_precision_reference_error if low_precision_reference_error is not None else 0.0)


def assert_close(
    actual: torch.Tensor,
    expected: torch.Tensor,
    dtype: torch.dtype = torch.float32,
    low_precision_reference: torch.Tensor | None = None,
    what: str = "result",
) -> float:
    """Assert that `actual` matches the fp32 `expected` within the suite's tolerance for `dtype`.

    Args:
        actual: the fast path's output.
        expected: the reference computed in fp32 (or fp64).
        dtype: the precision the fast path computed in; selects the floor.
        low_precision_reference: the reference run in `dtype`, whose error against `expected` sets the budget.
        what: a name for the failure message.

    Returns:
        The measured relative error (for reporting).
    """
    ref_err = relative_error(low_precision_reference, expected) if low_precision_reference is not None else None
    err = relative_error(actual, expected)
    tol = tolerance(dtype, ref_err)
    assert err <= tol, (
        f"{what}: relative error {err:.3g} > tolerance {tol:.3g} (dtype {dtype}, reference error {ref_err})"
    )
    return err
