"""model.dtype=auto resolves by what the hardware runs fast; explicit choices are kept."""

import pytest

from rlhf.precision import PrecisionError, choose_dtype, trainable_in_fp32


@pytest.mark.parametrize(
    "requested, cuda, cuda_bf16, features, expected",
    [
        ("auto", False, False, {"amx", "avx512_bf16"}, "bfloat16"),  # Sapphire Rapids: AMX and AVX-512 BF16
        ("auto", False, False, {"avx512_bf16"}, "bfloat16"),  # Zen 4 / Cooper Lake: AVX-512 BF16 only
        ("auto", False, False, {"amx"}, "bfloat16"),
        ("auto", False, False, set(), "float32"),  # AVX2-only CPU: bf16 would be emulated
        ("auto", False, False, {"avx2", "avx512"}, "float32"),  # AVX-512 without its BF16 extension
        ("auto", True, True, set(), "bfloat16"),  # Ampere and later
        ("auto", True, False, {"amx"}, "float32"),  # a GPU without bf16: the GPU decides, not the host CPU
        ("float32", False, False, {"amx", "avx512_bf16"}, "float32"),  # explicit choices stay
        ("bfloat16", False, False, set(), "bfloat16"),
        ("float16", True, True, set(), "float16"),
    ],
)
def test_auto_resolution_on_capability_strings(requested, cuda, cuda_bf16, features, expected):
    dtype, why = choose_dtype(requested, cuda, cuda_bf16, features)
    assert dtype == expected
    assert why  # every resolution says why


def test_unknown_dtype_is_refused():
    with pytest.raises(PrecisionError, match="model.dtype='fp8'"):
        choose_dtype("fp8", False, False, set())


def test_trainable_weights_are_cast_to_fp32_and_frozen_ones_kept():
    import torch

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1)).to(torch.bfloat16)
    model[0].requires_grad_(False)
    assert trainable_in_fp32(model) == 2  # the head's weight and bias
    assert model[0].weight.dtype == torch.bfloat16 and model[1].weight.dtype == torch.float32
