"""The bit-packed bool masks the CPU dropout paths keep for backward: packing and unpacking give the mask back."""

import pytest
import torch

from mmict_kernels.ops._bitmask import pack_bool, unpack_bool


@pytest.mark.parametrize("shape", [(1,), (7,), (8,), (5, 13), (3, 2, 7, 257), (0, 4)])
def test_unpack_gives_the_packed_mask_back(shape):
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(0)) < 0.3
    packed = pack_bool(mask)
    assert packed.dtype == torch.uint8 and packed.shape == ((mask.numel() + 7) // 8,)
    assert torch.equal(unpack_bool(packed, shape), mask)


def test_bit_order_and_non_contiguous_input():
    mask = torch.zeros(16, dtype=torch.bool)
    mask[[0, 3, 8, 15]] = True
    assert pack_bool(mask).tolist() == [0b1001, 0b10000001]
    wide = torch.rand(6, 10, generator=torch.Generator().manual_seed(1)) < 0.5
    assert torch.equal(unpack_bool(pack_bool(wide.t()), (10, 6)), wide.t())
