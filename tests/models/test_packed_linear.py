"""oneDNN-packed linears compute what nn.Linear computes."""
import pytest
import torch
from torch import nn

from lmarith.models.packed_linear import PackedLinear, pack_linears, packing_available

pytestmark = pytest.mark.skipif(not packing_available(), reason="torch built without oneDNN")


@pytest.mark.parametrize("rows", [1, 7, 33])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_matches_nn_linear(rows, bias):
    torch.manual_seed(rows)
    linear = nn.Linear(96, 160, bias=bias)
    x = torch.randn(rows, 96)
    torch.testing.assert_close(PackedLinear(linear, batch_hint=16)(x), linear(x), atol=1e-5, rtol=1e-5)


def test_pack_linears_swaps_only_float32_linears():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4).to(torch.bfloat16))
    assert pack_linears(model) == 1
    assert isinstance(model[0], PackedLinear) and isinstance(model[2], nn.Linear)
