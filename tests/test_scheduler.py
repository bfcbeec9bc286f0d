"""The flow-matching schedule against docs/design/model.md §3.1's hand table, the CFG interval, the global renorm by
hand, and
the Euler step."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from runtime.spec import constants
from runtime.pipeline.scheduler import Schedule, apply_cfg, cfg_active, euler_step, make_schedule

# docs/design/model.md §3.1: 30 steps, shift 3.5, to 4 decimals.
SPEC_TABLE_30_3_5 = (
    1.0, .9902, .98, .9692, .9579, .9459, .9333, .92, .9059, .8909, .875, .8581, .84, .8207, .8, .7778, .7538, .728,
    .7, .6696, .6364, .6, .56, .5158, .4667, .4118, .35, .28, .2, .1077, 0.0,
)


def test_default_schedule_matches_the_spec_table() -> None:
    schedule = make_schedule()
    assert (schedule.steps, constants.DEFAULT_STEPS, constants.DEFAULT_TIMESTEP_SHIFT) == (30, 30, 3.5)
    assert len(schedule.timesteps) == 31 and len(schedule.dts) == 30
    assert [round(t, 4) for t in schedule.timesteps] == list(SPEC_TABLE_30_3_5)
    assert schedule.timesteps[0] == 1.0 and schedule.timesteps[-1] == 0.0


@pytest.mark.parametrize(("steps", "shift"), [(30, 3.5), (50, 3.5), (30, 3.0), (7, 1.0), (1, 4.0)])
def test_schedule_is_upstreams_float32_formula(steps: int, shift: float) -> None:
    schedule = make_schedule(steps, shift)
    # Independent float64 evaluation of the formula: the float32 values agree to float32 precision.
    t = np.linspace(1.0, 0.0, steps + 1)
    expected = shift * t / (1 + (shift - 1) * t)
    np.testing.assert_allclose(schedule.timesteps, expected, rtol=0, atol=2e-7)
    # Every value is a float32 number, the dts are the float32 differences, and they telescope to 1.
    ts32 = np.array(schedule.timesteps, dtype=np.float32)
    np.testing.assert_array_equal(ts32.astype(np.float64), schedule.timesteps)
    np.testing.assert_array_equal(np.array(schedule.dts, dtype=np.float64), (ts32[:-1] - ts32[1:]).astype(np.float64))
    assert all(dt > 0 for dt in schedule.dts)
    assert abs(sum(schedule.dts) - 1.0) < 1e-6


def test_schedule_rejects_bad_arguments() -> None:
    for steps, shift in ((0, 3.5), (-1, 3.5), (2.5, 3.5), (True, 3.5), (30, 0.0), (30, -1.0), (30, float("nan"))):
        with pytest.raises(ValueError):
            make_schedule(steps, shift)
    with pytest.raises(ValueError):
        Schedule((1.0, 0.0), (1.0, 0.5))


def test_cfg_runs_for_exactly_the_first_26_of_30_steps() -> None:
    active = [cfg_active(t) for t in make_schedule().timesteps[:-1]]
    assert active == [True] * 26 + [False] * 4
    assert sum(cfg_active(t) for t in make_schedule(50, 3.5).timesteps[:-1]) == 42
    # Strict lower bound, inclusive upper bound, compared in float32.
    assert cfg_active(1.0) and cfg_active(0.41) and not cfg_active(0.4) and not cfg_active(0.3) and not cfg_active(1.01)
    assert not cfg_active(np.float32(0.4).item())
    assert cfg_active(0.5, (0.0, 1.0)) and not cfg_active(0.0, (0.0, 1.0))
    # linspace(1, 0, 11) without shift lands on float32(0.4) at step 6: inactive there, as upstream.
    timesteps = make_schedule(10, 1.0).timesteps
    assert np.float32(timesteps[6]) == np.float32(0.4) and not cfg_active(timesteps[6])


def test_apply_cfg_global_renorm_by_hand() -> None:
    v_cond = torch.tensor([[3.0, 0.0], [0.0, 4.0]])     # ||v_cond|| = 5
    v_uncond = torch.zeros(2, 2)
    # v = 0 + 2 * (v_cond - 0) = 2 v_cond, ||v|| = 10 -> scaled by 5 / (10 + 1e-8)
    out = apply_cfg(v_cond, v_uncond, 2.0, 0.0)
    torch.testing.assert_close(out, 2.0 * v_cond * (5.0 / (10.0 + 1e-8)), rtol=0, atol=1e-6)
    assert out.tolist() == [[3.0, 0.0], [0.0, 4.0]]  # exactly v_cond in float32
    # renorm_min clamps the factor from below: 0.8 instead of 0.5
    torch.testing.assert_close(apply_cfg(v_cond, v_uncond, 2.0, 0.8), 2.0 * v_cond * 0.8, rtol=0, atol=1e-6)
    # ||v|| < ||v_cond||: the factor clamps at 1, v is returned as combined
    v_cond, v_uncond = torch.tensor([[0.9, 0.0]]), torch.tensor([[1.0, 0.0]])
    torch.testing.assert_close(apply_cfg(v_cond, v_uncond, 4.0), torch.tensor([[0.6, 0.0]]), rtol=0, atol=1e-6)


def test_apply_cfg_matches_the_formula_on_random_velocities() -> None:
    g = torch.Generator().manual_seed(0)
    v_cond, v_uncond = torch.randn(64, 48, generator=g), torch.randn(64, 48, generator=g)
    out = apply_cfg(v_cond, v_uncond, 4.0)
    v64c, v64u = v_cond.double(), v_uncond.double()
    guided = v64u + 4.0 * (v64c - v64u)
    expected = guided * min(1.0, (v64c.norm() / (guided.norm() + 1e-8)).item())
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=1e-5)
    assert out.norm().item() == pytest.approx(v_cond.norm().item(), rel=1e-5)  # renormed to ||v_cond||
    out_bf16 = apply_cfg(v_cond.bfloat16(), v_uncond.bfloat16(), 4.0)
    assert out_bf16.dtype == torch.bfloat16 and out_bf16.shape == v_cond.shape
    with pytest.raises(ValueError):
        apply_cfg(v_cond, v_uncond[:3], 4.0)


def test_euler_step_by_hand() -> None:
    x, v = torch.tensor([1.0, 2.0, -3.0]), torch.tensor([0.5, -1.0, 2.0])
    torch.testing.assert_close(euler_step(x, v, 0.1), torch.tensor([0.95, 2.1, -3.2]), rtol=0, atol=1e-6)
    # bf16 state: computed in float32, rounded once.
    g = torch.Generator().manual_seed(1)
    xb, vb = torch.randn(1000, generator=g).bfloat16(), torch.randn(1000, generator=g).bfloat16()
    dt = make_schedule().dts[7]
    out = euler_step(xb, vb, dt)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, (xb.float() - vb.float() * dt).bfloat16())
    with pytest.raises(ValueError):
        euler_step(x, v[:2], 0.1)


def test_euler_over_the_schedule_integrates_a_straight_path() -> None:
    """With the exact velocity of a straight flow path (noise - x0), the 30 steps land on x0."""
    g = torch.Generator().manual_seed(2)
    x0, noise = torch.randn(16, 48, generator=g), torch.randn(16, 48, generator=g)
    x = noise.clone()
    for dt in make_schedule().dts:
        x = euler_step(x, noise - x0, dt)
    assert torch.isfinite(x).all()
    torch.testing.assert_close(x, x0, rtol=0, atol=1e-5)
