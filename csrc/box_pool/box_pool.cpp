// Schema of box_pool: per box, the sum (average=false) or mean (average=true) of a feature map
// over the level cells the box covers (docs/method.md §1-2). Its adjoint is box_fill.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(lgd_ops, m) {
  m.def(
      "box_pool(Tensor features, Tensor boxes, Tensor batch_idx, int in_h, int in_w, "
      "bool average, Tensor? index=None) -> Tensor");
}
