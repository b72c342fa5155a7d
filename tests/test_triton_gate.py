"""The one place that decides whether Triton kernels serve a CUDA device (no GPU needed: mocked)."""
import unittest.mock as mock
import warnings

import torch

from fastusp_xdit import triton_gate


def test_capability_import_and_warning():
    triton_gate.kernels_on.cache_clear()
    with mock.patch.object(torch.cuda, "get_device_capability", return_value=(8, 0)):
        assert triton_gate.kernels_on("json", 0, (8, 9), "x") is False  # capability too low
        assert triton_gate.kernels_on("json", 0, (8, 0), "x") is True
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert triton_gate.kernels_on("fastusp_xdit_no_such_module", 0, (8, 0), "Codec X") is False
        assert any("Codec X: triton unavailable" in str(w.message) for w in caught)
    triton_gate.kernels_on.cache_clear()
