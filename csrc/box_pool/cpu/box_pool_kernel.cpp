// CPU box_pool: one float64 summed-area table per (image, channel) plane, then four lookups per
// box. Work is O(B*C*H*W + N*C) whatever the box sizes (a direct loop would cost the sum of box
// areas, ~10x H*W at 100 objects per image), and each plane is summed by one thread in a fixed
// order, so results are identical run to run.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "../../common/cpu_boxes.h"

namespace lgd_ops {
namespace {

template <typename scalar_t>
void pool_planes(const scalar_t* feat, scalar_t* out, const ImageBoxes& ix, int64_t C, int64_t H,
                 int64_t W, bool average, int64_t begin, int64_t end) {
  const int64_t W1 = W + 1;
  std::vector<double> sat((H + 1) * W1, 0.0);  // row 0 and column 0 stay zero
  for (int64_t plane = begin; plane < end; ++plane) {
    const int64_t b = plane / C, c = plane % C;
    if (ix.start[b] == ix.start[b + 1]) continue;
    const scalar_t* f = feat + plane * H * W;
    for (int64_t j = 0; j < H; ++j) {
      double row = 0.0;
      const double* above = &sat[j * W1];
      double* cur = &sat[(j + 1) * W1];
      for (int64_t i = 0; i < W; ++i) {
        row += static_cast<double>(f[j * W + i]);
        cur[i + 1] = above[i + 1] + row;
      }
    }
    for (int64_t k = ix.start[b]; k < ix.start[b + 1]; ++k) {
      const int64_t n = ix.order[k];
      const CellRange r = ix.cells[n];
      const double sum = sat[(r.y1 + 1) * W1 + r.x1 + 1] - sat[r.y0 * W1 + r.x1 + 1] -
                         sat[(r.y1 + 1) * W1 + r.x0] + sat[r.y0 * W1 + r.x0];
      out[n * C + c] = static_cast<scalar_t>(average ? sum / double(r.count()) : sum);
    }
  }
}

at::Tensor box_pool_cpu(const at::Tensor& features, const at::Tensor& boxes,
                        const at::Tensor& batch_idx, int64_t in_h, int64_t in_w, bool average) {
  TORCH_CHECK(features.dim() == 4, "lgd_ops.box_pool: features must be [B, C, H, W], got ",
              features.sizes());
  check_box_args(boxes, batch_idx, in_h, in_w, features, "features");
  const int64_t B = features.size(0), C = features.size(1), H = features.size(2),
                W = features.size(3);
  // Boxes covering nothing (and boxes of no valid image) keep this zero row.
  at::Tensor out = at::zeros({boxes.size(0), C}, features.options());
  if (out.numel() == 0 || H == 0 || W == 0) return out;
  const ImageBoxes ix = index_boxes(boxes, batch_idx, B, in_h, in_w, H, W);
  const at::Tensor feat = features.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, feat.scalar_type(), "box_pool_cpu", [&] {
    const scalar_t* f = feat.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, B * C, 1, [&](int64_t begin, int64_t end) {
      pool_planes<scalar_t>(f, o, ix, C, H, W, average, begin, end);
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lgd_ops, CPU, m) { m.impl("box_pool", &box_pool_cpu); }

}  // namespace lgd_ops
