"""The fixed-point hyper-synthesis is exact: same integers whatever the batch, threads or kernels."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ncpipe.entropy.integer_net import (
    ACT_FRAC_BITS,
    ACT_LIMIT,
    IntegerHyperSynthesis,
    IntegerNetError,
    choose_weight_frac_bits,
    to_fixed,
)
from ncpipe.models.architectures import build_adapter


def _h_s(seed=0) -> nn.Sequential:
    torch.manual_seed(seed)
    return build_adapter("mbt2018-mean", {"N": 16, "M": 24}).hyper_synthesis_layers()


def test_matches_torch_float64_convolutions_exactly():
    """im2col/col2im products equal torch's own float64 (de)convolutions on the same integers."""
    h_s = _h_s()
    net = IntegerHyperSynthesis(h_s, choose_weight_frac_bits(h_s))
    x = torch.round(torch.randn(3, 16, 5, 7) * 3 * 2**ACT_FRAC_BITS).double()
    for step, module in zip(net.steps, h_s):
        if hasattr(step, "weight"):
            if step.transposed:
                reference = F.conv_transpose2d(x, step.weight, None, step.stride, step.padding, step.output_padding)
                got = step._transposed(x)
            else:
                reference = F.conv2d(x, step.weight, None, step.stride, step.padding)
                got = step._direct(x)
            assert torch.equal(got, reference)
        x = step(x)


def test_output_is_integer_and_close_to_the_float_network():
    h_s = _h_s()
    net = IntegerHyperSynthesis(h_s, choose_weight_frac_bits(h_s))
    z_hat = torch.round(torch.randn(2, 16, 4, 6) * 2)
    exact = net(to_fixed(z_hat))
    assert torch.equal(exact, torch.round(exact))
    with torch.no_grad():
        float_out = h_s(z_hat).double()
    assert (exact * 2.0**-ACT_FRAC_BITS - float_out).abs().max() < 1e-2


def test_independent_of_batch_composition_and_threads():
    h_s = _h_s(1)
    net = IntegerHyperSynthesis(h_s, choose_weight_frac_bits(h_s))
    z = to_fixed(torch.round(torch.randn(5, 16, 3, 4) * 4))
    together = net(z)
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for i in range(5):
                assert torch.equal(net(z[i : i + 1])[0], together[i])
    finally:
        torch.set_num_threads(before)


def test_worst_case_accumulator_stays_exact_even_at_the_clamp():
    h_s = _h_s(2)
    net = IntegerHyperSynthesis(h_s, choose_weight_frac_bits(h_s))
    extreme = torch.full((1, 16, 3, 3), 1e30, dtype=torch.float64)  # clamped to the activation limit
    out = net(extreme)
    assert torch.isfinite(out).all() and torch.equal(out, torch.round(out))


def test_weights_too_large_for_an_exact_accumulator_are_refused():
    conv = nn.Conv2d(64, 4, 5)
    with torch.no_grad():
        conv.weight.fill_(2.0**20)
    with pytest.raises(IntegerNetError, match="too large"):
        choose_weight_frac_bits(nn.Sequential(conv))


def test_refuses_layers_without_a_fixed_point_form_and_mismatched_precisions():
    with pytest.raises(IntegerNetError, match="GDN|no fixed-point form"):
        IntegerHyperSynthesis(nn.Sequential(nn.Conv2d(2, 2, 3), nn.Sigmoid()), (8,))
    with pytest.raises(IntegerNetError, match="precisions"):
        IntegerHyperSynthesis(_h_s(), (16,))


def test_each_layer_is_the_fixed_point_formula_on_ordinary_and_clamped_inputs():
    """The layers (which update their accumulators in place) give round((Σ w·a + b) · 2^-W) clamped, exactly."""
    h_s = _h_s(3)
    net = IntegerHyperSynthesis(h_s, choose_weight_frac_bits(h_s))
    for x in (torch.round(torch.randn(2, 16, 4, 5) * 5 * 2**ACT_FRAC_BITS).double(),
              torch.full((1, 16, 3, 3), -float(ACT_LIMIT), dtype=torch.float64)):
        for step in net.steps:
            if hasattr(step, "weight"):
                conv = F.conv_transpose2d if step.transposed else F.conv2d
                extra = (step.output_padding,) if step.transposed else ()
                acc = conv(x, step.weight, step.bias, step.stride, step.padding, *extra)
                expected = torch.clamp(torch.floor(acc * 2.0**-step.frac_bits + 0.5), -ACT_LIMIT, ACT_LIMIT)
            else:
                negative = torch.floor(x * (step.slope_numerator * 2.0**-16) + 0.5)
                expected = torch.where(x < 0, negative, x)
            x = step(x.clone())
            assert torch.equal(x, expected)
