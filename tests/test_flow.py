"""Flow-matching math of the editor: numbers computed by hand."""
import math

import pytest
import torch

from aesformer import flow_matching


def test_image_tokens_counts_16_pixel_cells():
    assert flow_matching.image_tokens(1440, 1088) == 90 * 68  # 6120
    assert flow_matching.image_tokens(96, 128) == 6 * 8


def test_shift_mu_is_linear_from_256_to_8192_tokens():
    assert flow_matching.shift_mu(256) == pytest.approx(0.5)
    assert flow_matching.shift_mu(8192) == pytest.approx(0.9)
    assert flow_matching.shift_mu((256 + 8192) / 2) == pytest.approx(0.7)


def test_shift_at_256_tokens():
    # s = e^0.5 = 1.648721; t = 0.5 -> 0.824361 / 1.324361 = 0.622459
    t = flow_matching.shift_timesteps(torch.tensor([0.0, 0.5, 1.0]), 256)
    assert t.tolist() == pytest.approx([0.0, 0.622459, 1.0], abs=1e-6)


def test_shift_at_8192_tokens_pushes_towards_noise():
    # s = e^0.9 = 2.459603; t = 0.5 -> 1.229802 / 1.729802 = 0.710950; t = 0.2 -> 0.491921 / 1.291921 = 0.380767
    t = flow_matching.shift_timesteps(torch.tensor([0.2, 0.5]), 8192)
    assert t.tolist() == pytest.approx([0.380767, 0.710950], abs=1e-6)


def test_shift_matches_the_diffusers_scheduler_time_shift():
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, time_shift_type="exponential")
    t = torch.tensor([0.1, 0.3, 0.7, 0.9])
    mu = flow_matching.shift_mu(6120)
    assert torch.allclose(flow_matching.shift_timesteps(t, 6120), sched.time_shift(mu, 1.0, t), atol=1e-6)


def test_sample_timesteps_is_sigmoid_normal_then_shifted():
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    t = flow_matching.sample_timesteps(4, 96, 128, generator=g1)
    u = torch.sigmoid(torch.randn(4, generator=g2))
    s = math.exp(flow_matching.shift_mu(48))
    assert torch.allclose(t, u * s / (1 + (s - 1) * u))
    assert ((t > 0) & (t < 1)).all()


def test_noisy_latent_and_velocity():
    x0 = torch.tensor([[2.0, -1.0], [0.0, 4.0]])
    noise = torch.tensor([[0.0, 1.0], [2.0, 0.0]])
    t = torch.tensor([0.25, 1.0])
    # row 0: 0.75*[2,-1] + 0.25*[0,1] = [1.5, -0.5]; row 1 (t = 1) is the noise
    assert flow_matching.noisy_latent(x0, noise, t).tolist() == [[1.5, -0.5], [2.0, 0.0]]
    assert flow_matching.velocity_target(x0, noise).tolist() == [[-2.0, 2.0], [2.0, -4.0]]


def test_euler_step_with_the_true_velocity_recovers_the_clean_latent():
    # the diffusers scheduler step is x + (t_next - t) * v; from t to 0 it lands on x0
    x0, noise = torch.randn(1, 8, 4), torch.randn(1, 8, 4)
    t = torch.tensor([0.6])
    xt = flow_matching.noisy_latent(x0, noise, t)
    assert torch.allclose(xt + (0 - 0.6) * flow_matching.velocity_target(x0, noise), x0, atol=1e-6)


def test_flow_loss_is_plain_mse():
    pred = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    target = torch.tensor([[0.0, 0.0], [0.0, 3.0]])
    assert flow_matching.flow_loss(pred, target).item() == pytest.approx((1 + 4 + 0 + 9) / 4)
    assert flow_matching.flow_loss(pred, target, reduction="none").tolist() == pytest.approx([2.5, 4.5])


def test_timestep_buckets():
    assert flow_matching.timestep_bucket(0.0) == "t0.00-0.25"
    assert flow_matching.timestep_bucket(0.5) == "t0.50-0.75"
    assert flow_matching.timestep_bucket(1.0) == "t0.75-1.00"
    with pytest.raises(ValueError):
        flow_matching.timestep_bucket(1.5)
