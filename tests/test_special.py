"""The compiled error function agrees with ``math.erf`` applied element by element."""

import numpy as np
import pytest

from rbprop.kernels.special import erf, erf_reference


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_erf_matches_twin(dtype):
    values = np.concatenate([np.linspace(-6, 6, 101), [0.0, -0.0, 1e-30, 30.0]]).astype(dtype)
    values = values.reshape(5, 21)
    result = erf(values)
    assert result.dtype == dtype and result.shape == values.shape
    np.testing.assert_allclose(
        result, erf_reference(values), rtol=1e-6 if dtype == np.float32 else 1e-15, atol=0
    )
