"""The error measure and the precision-class tolerances that every numeric test uses."""
import math

import pytest
import torch

import tolerances
from tolerances import allowed_error, rel_err


def test_rel_err_in_float64():
    ref = torch.ones(1000, dtype=torch.float32)
    out = torch.ones(1000, dtype=torch.float64) + 1e-9  # a difference fp32 cannot represent
    assert math.isclose(rel_err(out, ref), 1e-9, rel_tol=1e-6)
    assert rel_err(torch.zeros(3), torch.zeros(3)) == 0.0
    assert rel_err(torch.ones(3), torch.zeros(3)) == math.inf
    with pytest.raises(AssertionError):
        rel_err(torch.ones(3), torch.ones(4))


def test_rel_err_fixture(rel_err):
    assert rel_err(torch.tensor([3.0, 4.0]), torch.tensor([3.0, 0.0])) == pytest.approx(4.0 / 3.0)


def test_tolerances_follow_the_design():
    assert allowed_error(torch.float32, "highest", 1e-7) == 1e-6
    assert allowed_error(torch.float32, "highest", 3e-6) == 6e-6
    assert allowed_error(torch.float32, "high", None) == tolerances.HIGH == 2e-3
    assert allowed_error(torch.float16, "highest", None) == tolerances.HALF == 2e-2
    assert allowed_error(torch.bfloat16, "high", None) == 2e-2
    with pytest.raises(ValueError):
        allowed_error(torch.float32, "highest", None)
