"""Complex parameters: every statistic and change of the policy measures ``|z|``."""

from __future__ import annotations

import pytest
import torch

import safeopt


def _seen(params: list[torch.Tensor], policy: dict, decide_on: str = "host") -> list[torch.Tensor]:
    """The gradients the inner optimizer receives after one wrapped step."""
    from safeopt_torch import SafeOptimizer

    inner = torch.optim.SGD(params, lr=0.0)
    seen: list[torch.Tensor] = []
    inner.register_step_pre_hook(
        lambda o, a, k: seen.extend(p.grad.clone() for p in params))
    opt = SafeOptimizer(inner, safeopt.load_policy(policy), decide_on=decide_on)
    opt.step()
    assert seen, "the inner step did not run"
    return seen


def _complex(*shape: int, scale: float = 1.0, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, dtype=torch.complex64, generator=gen) * scale


@pytest.mark.parametrize("decide_on", ["host", "device"])
def test_the_norm_of_a_complex_gradient_is_that_of_its_real_view(decide_on: str) -> None:
    """Small tensors, a large one (the dot-product path) and a non-contiguous one."""
    shapes = [(3, 4), (300, 300), (6, 8)]
    params = [torch.zeros(s, dtype=torch.complex64, requires_grad=True) for s in shapes]
    grads = [_complex(*s, seed=i) for i, s in enumerate(shapes)]
    grads[2] = _complex(8, 6, seed=9).t()
    for p, g in zip(params, grads):
        p.grad = g.clone()  # the wrapper clips in place
    want = sum(float((g.to(torch.complex128).abs() ** 2).sum()) for g in grads) ** 0.5
    torch_norm = float(torch.nn.utils.get_total_norm(grads))  # what clip_grad_norm_ reads
    seen = _seen(params, {"clip_norm": 1.0}, decide_on)
    assert torch_norm == pytest.approx(want, rel=1e-5)
    for g, s in zip(grads, seen):  # clipped to norm 1 by the same scale
        torch.testing.assert_close(s, g * (1.0 / want), rtol=1e-5, atol=1e-8)
    clipped = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(s) for s in seen]))
    torch.testing.assert_close(clipped, torch.tensor(1.0))


def test_clip_value_clamps_the_modulus_and_keeps_the_phase() -> None:
    p = torch.zeros(4, dtype=torch.complex64, requires_grad=True)
    p.grad = torch.tensor([3 + 4j, 0.3 - 0.1j, -1j, 0.2 + 0.2j], dtype=torch.complex64)
    g = p.grad.clone()
    with pytest.raises(RuntimeError, match="complex"):  # torch has no meaning for it
        torch.nn.utils.clip_grad_value_([p], 0.5)
    (seen,) = _seen([p], {"clip_value": 0.5, "clip_norm": None})
    big = g.abs() > 0.5
    torch.testing.assert_close(seen.abs()[big], torch.full((2,), 0.5))
    torch.testing.assert_close(torch.angle(seen[big]), torch.angle(g[big]))
    assert torch.equal(seen[~big], g[~big])
    assert torch.equal(seen[0], torch.tensor(0.3 + 0.4j, dtype=torch.complex64))


def test_a_nonfinite_complex_element_stays_nonfinite_under_clip_value() -> None:
    p = torch.zeros(2, dtype=torch.complex64, requires_grad=True)
    p.grad = torch.tensor([complex(float("inf"), 1.0), 2.0], dtype=torch.complex64)
    (seen,) = _seen([p], {"clip_value": 0.5, "clip_norm": None, "skip_nonfinite": False})
    assert not torch.isfinite(seen[0])
    assert torch.equal(seen[1], torch.tensor(0.5 + 0j, dtype=torch.complex64))


def test_the_l1_penalty_of_a_complex_weight_is_its_sgn() -> None:
    w = torch.tensor([3 + 4j, 0j, -2j], dtype=torch.complex64, requires_grad=True)
    w.grad = torch.zeros_like(w)
    (seen,) = _seen([w], {"l1": 0.1, "l2": 0.25, "clip_norm": None})
    want = 0.1 * torch.tensor([0.6 + 0.8j, 0j, -1j]) + 0.5 * w.detach()
    torch.testing.assert_close(seen, want.to(torch.complex64))


def test_unitwise_clips_a_complex_matrix_as_its_real_view_and_a_vector_as_one_unit() -> None:
    w = _complex(4, 3, seed=1)
    b = _complex(4, seed=2)
    params = [w.clone().requires_grad_(), b.clone().requires_grad_()]
    real = [torch.view_as_real(w).clone().requires_grad_()]
    params[0].grad, params[1].grad = _complex(4, 3, scale=5.0, seed=3), _complex(4, scale=5.0,
                                                                                seed=4)
    real[0].grad = torch.view_as_real(params[0].grad).clone()
    g = params[1].grad.clone()  # the wrapper clips in place
    policy = {"clip_norm": 0.1, "norm_scope": "unitwise"}
    seen_w, seen_b = _seen(params, policy)
    (seen_real,) = _seen(real, policy)
    torch.testing.assert_close(torch.view_as_real(seen_w), seen_real)
    rows = torch.linalg.vector_norm(seen_w, dim=1)
    torch.testing.assert_close(rows, 0.1 * torch.linalg.vector_norm(w, dim=1))
    torch.testing.assert_close(seen_b, g * (0.1 * torch.linalg.vector_norm(b) /
                                            torch.linalg.vector_norm(g)))
