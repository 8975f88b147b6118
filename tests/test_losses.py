"""The fused per-token cross-entropy against torch's cross_entropy: values and gradients."""
import jax
import jax.numpy as jnp
import numpy as np
import torch

from msp_jax.losses import token_nll


def test_token_nll_matches_torch_value_and_gradient():
  rng = np.random.default_rng(0)
  logits = (rng.normal(size=(3, 7, 211)) * 4).astype(np.float32)
  targets = rng.integers(0, 211, size=(3, 7))
  weights = rng.normal(size=(3, 7)).astype(np.float32)  # a weighted sum: every position's cotangent differs

  loss = lambda l: (jnp.asarray(weights) * token_nll(l, jnp.asarray(targets))).sum()
  ours, ours_grad = jax.value_and_grad(loss)(jnp.asarray(logits))

  t_logits = torch.tensor(logits, requires_grad=True)
  nll = torch.nn.functional.cross_entropy(t_logits.reshape(-1, 211), torch.tensor(targets).reshape(-1),
                                          reduction="none").reshape(3, 7)
  ref = (torch.tensor(weights) * nll).sum()
  ref.backward()

  np.testing.assert_allclose(token_nll(jnp.asarray(logits), jnp.asarray(targets)), nll.detach().numpy(), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(float(ours), float(ref), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(ours_grad), t_logits.grad.numpy(), rtol=1e-4, atol=1e-6)


def test_token_nll_jits_and_is_finite_for_extreme_logits():
  logits = jnp.array([[1e4, -1e4, 0.0], [-1e4, -1e4, -1e4]], jnp.float32)
  targets = jnp.array([0, 2])
  nll, grad = jax.jit(jax.value_and_grad(lambda l: token_nll(l, targets).sum()))(logits)
  assert np.isfinite(float(nll)) and np.isfinite(np.asarray(grad)).all()
  np.testing.assert_allclose(float(nll), np.log(3.0), atol=1e-4)  # row 0: 0; row 1: uniform over 3 (fp32 at 1e4)
  np.testing.assert_allclose(np.asarray(grad[1]), [1 / 3, 1 / 3, -2 / 3], atol=1e-5)
