// CPU box_fill: per (image, channel) plane, one sweep down the plane keeping a float64 running
// value per column (one row of state, in L1): at a box's top row its value is added to its
// columns, before the row below its bottom it is taken away, and every row is written as it
// stands. O(H*W + boxes*width) whatever the box heights, no scratch map; one thread owns a plane
// and adds in a fixed order, so the output is deterministic (no atomics).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "../../common/cpu_boxes.h"

namespace lgd_ops {
namespace {

template <typename scalar_t>
void fill_planes(const scalar_t* values, scalar_t* out, const ImageBoxes& ix, int64_t C, int64_t H,
                 int64_t W, bool average, int64_t begin, int64_t end) {
  std::vector<double> col(W);
  for (int64_t plane = begin; plane < end; ++plane) {
    const int64_t b = plane / C, c = plane % C;
    scalar_t* o = out + plane * H * W;
    std::fill(col.begin(), col.end(), 0.0);
    const RowEvent* ev = ix.events.data() + 2 * ix.start[b];
    const RowEvent* ev_end = ix.events.data() + 2 * ix.start[b + 1];
    for (int64_t j = 0; j < H; ++j) {
      for (; ev != ev_end && ev->row == j; ++ev) {
        const CellRange r = ix.cells[ev->box];
        double v = static_cast<double>(values[ev->box * C + c]);
        if (!std::isfinite(v)) continue;  // added below: it would stay in the columns past the box
        if (average) v /= double(r.count());
        if (!ev->top) v = -v;
        for (int32_t i = r.x0; i <= r.x1; ++i) col[i] += v;
      }
      scalar_t* row = o + j * W;
      for (int64_t i = 0; i < W; ++i) row[i] = static_cast<scalar_t>(col[i]);
    }
    // Non-finite values (NaN - NaN, inf - inf never cancel) go straight into their own box's cells.
    for (int64_t k = ix.start[b]; k < ix.start[b + 1]; ++k) {
      const int64_t n = ix.order[k];
      const double v = static_cast<double>(values[n * C + c]);
      if (std::isfinite(v)) continue;
      const CellRange r = ix.cells[n];
      for (int32_t j = r.y0; j <= r.y1; ++j)
        for (int32_t i = r.x0; i <= r.x1; ++i)
          o[j * W + i] = static_cast<scalar_t>(static_cast<double>(o[j * W + i]) + v);
    }
  }
}

at::Tensor box_fill_cpu(const at::Tensor& values, const at::Tensor& boxes,
                        const at::Tensor& batch_idx, int64_t in_h, int64_t in_w, int64_t batch,
                        int64_t out_h, int64_t out_w, bool average) {
  TORCH_CHECK(values.dim() == 2 && values.size(0) == boxes.size(0),
              "lgd_ops.box_fill: values must be [N, C] with N = boxes.size(0), got ",
              values.sizes());
  TORCH_CHECK(batch >= 0 && out_h >= 0 && out_w >= 0,
              "lgd_ops.box_fill: output size must be non-negative, got (", batch, ", ", out_h,
              ", ", out_w, ")");
  check_box_args(boxes, batch_idx, in_h, in_w, values, "values");
  const int64_t C = values.size(1);
  at::Tensor out = at::empty({batch, C, out_h, out_w}, values.options());  // every plane is written
  if (out.numel() == 0) return out;
  const ImageBoxes ix = index_boxes(boxes, batch_idx, batch, in_h, in_w, out_h, out_w);
  const at::Tensor vals = values.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, vals.scalar_type(), "box_fill_cpu", [&] {
    const scalar_t* v = vals.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, batch * C, 1, [&](int64_t begin, int64_t end) {
      fill_planes<scalar_t>(v, o, ix, C, out_h, out_w, average, begin, end);
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lgd_ops, CPU, m) { m.impl("box_fill", &box_fill_cpu); }

}  // namespace lgd_ops
