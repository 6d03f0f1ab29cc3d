"""FlowSchedule: warped step lists (REFERENCE.md section 3-4), x0 from flow, re-noising."""

import pytest
import torch

from tokentrim.rollout.schedule import FlowSchedule


def _shifted(step, shift=5.0):
    sigma = step / 1000.0  # base sigma of nominal step k: linspace(1, 0, 1001)[1000 - k]
    return 1000.0 * shift * sigma / (1.0 + (shift - 1.0) * sigma)


def test_warp_self_forcing_values():
    t = FlowSchedule(5.0).warp([1000, 750, 500, 250])
    assert t.dtype == torch.float32
    torch.testing.assert_close(t, torch.tensor([1000.0, 937.5, 2500.0 / 3.0, 625.0]), rtol=1e-6, atol=1e-3)


def test_warp_rolling_forcing_values():
    t = FlowSchedule(5.0).warp([1000, 800, 600, 400, 200])
    expected = torch.tensor([1000.0, 952.381, 882.353, 769.231, 555.556])
    torch.testing.assert_close(t, expected, rtol=0, atol=1e-3)


@pytest.mark.parametrize("shift", [5.0, 3.0])
@pytest.mark.parametrize("steps", [[1000, 750, 500, 250], [1000, 800, 600, 400, 200]])
def test_warp_is_bit_identical_to_upstream_float32_table(shift, steps):
    """Upstream (Self-Forcing utils/scheduler.py, sigma_min=0, extra_one_step=True) builds the table in
    float32; the timesteps the model sees must be exactly those, not a float64 table rounded."""
    base = torch.linspace(1.0, 0.0, 1001)[:-1]
    table = torch.cat([shift * base / (1 + (shift - 1) * base) * 1000, torch.zeros(1)])
    expected = table[1000 - torch.tensor(steps)]
    assert torch.equal(FlowSchedule(shift).warp(steps), expected)


@pytest.mark.parametrize("shift", [1.0, 3.0, 8.0])
def test_warp_matches_formula(shift):
    steps = [1000, 999, 731, 500, 17, 1]
    t = FlowSchedule(shift).warp(steps)
    torch.testing.assert_close(t, torch.tensor([_shifted(s, shift) for s in steps]), rtol=1e-5, atol=1e-3)
    assert FlowSchedule(shift).warp([0]).item() == 0.0


def test_x0_and_renoise_roundtrip():
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(2, 3, 4, 5, 7, generator=g)
    noise = torch.randn(2, 3, 4, 5, 7, generator=g)
    s = FlowSchedule()
    t = torch.tensor([[937.5, 400.0, 10.0], [1000.0, 625.0, 833.0]])
    xt = s.renoise(x0, noise, t)
    sig = (t / 1000).view(2, 3, 1, 1, 1)
    torch.testing.assert_close(xt, (1 - sig) * x0 + sig * noise)
    # the exact flow v = noise - x0 recovers x0 from x_t
    torch.testing.assert_close(s.x0_from_flow(noise - x0, xt, t), x0, rtol=1e-5, atol=1e-5)
    # scalar and [B] timesteps broadcast; x0 keeps x_t's dtype
    out = s.x0_from_flow((noise - x0).half(), xt.half(), 500.0)
    assert out.dtype == torch.float16
    assert s.renoise(x0, noise, torch.tensor([1000.0, 1000.0])).equal(noise)


def test_bad_arguments():
    with pytest.raises(ValueError, match="shift"):
        FlowSchedule(0.0)
    with pytest.raises(ValueError, match="step_list"):
        FlowSchedule().warp([1001])
    with pytest.raises(ValueError, match="step_list"):
        FlowSchedule().warp([])
    x = torch.zeros(2, 3, 4, 2, 2)
    with pytest.raises(ValueError, match="sigma"):
        FlowSchedule().renoise(x, x, torch.zeros(3))
    with pytest.raises(ValueError, match="shape"):
        FlowSchedule().x0_from_flow(x[:, :2], x, 1.0)
