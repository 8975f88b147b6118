"""benchmarks/profile_ops.py's grouping of XLA ops into kinds, on op names and HLO sources as XLA:CPU and
XLA:GPU print them (README's "where the time goes" tables are built from it)."""
import pytest

from benchmarks.profile_ops import kind_of


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
    ("gemm_fusion_dot.59", "jit(step)/btkgd,bskd->bkgts/dot_general", "attention"),
    ("dot_product_attention_bwd.0", "jit(step)/eval_jaxpr/dot_product_attention_bwd", "attention"),
    # the scan's stacked arrays
    ("loop_dynamic_update_slice_fusion.2", "jit(dynamic_update_index_in_dim)/dynamic_update_slice",
     "cache / scan write"),
    ("dynamic-slice.4", "jit(step)/while/body/dynamic_slice", "layer slicing"),
])
def test_ops_are_grouped_by_their_primitive(op, source, kind):
  assert kind_of(op, source) == kind
