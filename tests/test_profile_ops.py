"""benchmarks/profile_ops.py's grouping of XLA ops into kinds, on op names and HLO sources as XLA:CPU and
XLA:GPU print them (README's "where the time goes" tables are built from it)."""
import collections

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from benchmarks.profile_ops import hlo_sources, kind_of
from msp_jax.models import layers, llama


@pytest.mark.parametrize("op, source, kind", [
    # a backward pass: autodiff's "transpose(" names the transposition of a jvp, not a layout copy
    ("custom-call.2", "jit(step)/transpose(jvp(btd,dv->btv))/dot_general", "weight matmul"),
    ("loop_multiply_fusion.6", "jit(step)/transpose(jvp())/mul", "other"),
    ("loop_add_fusion", "jit(step)/jit(silu)/add_any", "other"),
    # real layout copies, on the CPU and the GPU
    ("copy.3", "jit(step)/while/body/reshape", "layout copy"),
    ("wrapped_transpose.1", "jit(step)/eval_jaxpr/transpose", "layout copy"),
    ("loop_transpose_fusion.3", "jit(step)/eval_jaxpr/convert_element_type", "layout copy"),
    # attention: the einsum form's dots and softmax, and cuDNN's fused kernels
    ("gemm_fusion_dot.59", f"jit(step)/{layers.SCORES}/dot_general", "attention"),
    ("ynn_fusion.6", f"jit(step)/while/body/{layers.VALUES}/dot_general", "attention"),
    ("dot_product_attention_bwd.0", "jit(step)/eval_jaxpr/dot_product_attention_bwd", "attention"),
    # the scan's stacked arrays
    ("loop_dynamic_update_slice_fusion.2", "jit(dynamic_update_index_in_dim)/dynamic_update_slice",
     "cache / scan write"),
    ("dynamic-slice.4", "jit(step)/while/body/dynamic_slice", "layer slicing"),
])
def test_ops_are_grouped_by_their_primitive(op, source, kind):
  assert kind_of(op, source) == kind


def test_a_compiled_decoding_step_has_attention_and_weight_matmul_ops():
  """The grouping holds on what the models compile to (a renamed einsum would fall into "weight matmul")."""
  # big enough that XLA keeps the attention einsums as dots (at 2 rows x 2 heads x 8 it rewrites them)
  cfg = llama.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=64, num_layers=2, num_heads=4,
                          num_kv_heads=2, head_dim=16)
  model = llama.Llama(cfg, rngs=nnx.Rngs(0))
  cache = model.init_cache(4, 16)
  _, cache = model(jnp.ones((4, 3), jnp.int32), attention_mask=jnp.ones((4, 3), bool), cache=cache)
  step = jax.jit(lambda m, c, t: m(t, attention_mask=jnp.ones(t.shape, bool), cache=c))
  sources = hlo_sources(step.lower(model, cache, jnp.ones((4, 1), jnp.int32)).compile().as_text())
  dots = collections.Counter(kind_of(op, source) for op, source in sources.items() if source.endswith("dot_general"))
  assert dots["attention"] >= 2 and dots["weight matmul"] >= 2, dots  # the score and value dots; the projections


def test_a_fusion_is_named_by_the_dot_it_contains():
  """XLA:CPU fuses attention's value-dot backward with the softmax's backward into one op whose root is a
  reduce_sum (a prompt-only train step, SmolLM2): it is attention, not "other"."""
  values = f"jit(step)/transpose(jvp())/while/body/closed_call/{layers.VALUES}/dot_general"
  text = "\n".join([
      "%fused_computation.18 (param_0: f32[8,444,64], param_1: f32[8,148,64]) -> f32[8,444] {",
      f'  %dot.105 = f32[8,444,148]{{2,1,0}} dot(%param_0, %param_1), metadata={{op_name="{values}"}}',
      '  ROOT %reduce_sum.58 = f32[8,444]{1,0} reduce(%dot.105, %c), dimensions={2}, '
      'metadata={op_name="jit(step)/transpose(jvp())/while/body/closed_call/reduce_sum"}',
      "}",
      "",
      "ENTRY %main.9 (p: f32[8,444,64], q: f32[8,148,64]) -> f32[8,444] {",
      '  ROOT %ynn_fusion.18 = f32[8,444]{1,0} fusion(%p, %q), kind=kCustom, calls=%fused_computation.18, '
      'metadata={op_name="jit(step)/transpose(jvp())/while/body/closed_call/reduce_sum"}',
      "}",
  ])
  sources = hlo_sources(text)
  assert sources["ynn_fusion.18"] == values
  assert kind_of("ynn_fusion.18", sources["ynn_fusion.18"]) == "attention"
  assert sources["reduce_sum.58"].endswith("reduce_sum")  # the fused instructions keep their own names
