// Schema of box_fill: paint each box's value vector into the cells it covers, summing where boxes
// overlap (docs/method.md §3); average=true divides each box's value by its cell count first (the
// backward of a mean box_pool).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(lgd_ops, m) {
  m.def(
      "box_fill(Tensor values, Tensor boxes, Tensor batch_idx, int in_h, int in_w, int batch, "
      "int out_h, int out_w, bool average, bool channels_last=False, Tensor? index=None) -> Tensor");
}
