// Schema of normalized_mse (docs/method.md §4): InstanceNorm both maps of every level, one mean of the
// squared difference over all levels. The forward also returns per-plane statistics
// [5, planes] = (mean_s, rstd_s, mean_t, rstd_t, k) so the backward recomputes instead of storing.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(lgd_ops, m) {
  m.def("normalized_mse(Tensor[] student, Tensor[] teacher, float eps) -> (Tensor, Tensor)");
  m.def(
      "normalized_mse_backward(Tensor grad, Tensor[] student, Tensor[] teacher, Tensor stats) "
      "-> Tensor[]");
}
