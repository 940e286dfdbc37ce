// CPU box_pool: per block of channels of one image, the top-to-bottom sweep of csrc/common/cpu_box_sweep.inc
// (column sums + integral-image rows on event rows: cost O(H*W + boxes) whatever the boxes' sizes, one row of
// float64 state, no scratch map), or for boxes covering under a quarter of the plane in total, their cells
// summed directly. Reads NCHW-contiguous maps one (b, c) plane per block (8 planes, transposed, where the boxes
// are many for the level's size: struct Blocks) and channels_last maps 128 or 32 channels per block (vectorized
// across channels; integral rows where the boxes are many), with no copy; other strides are made contiguous
// first.
// One thread owns a block and adds in a fixed order, so results are identical run to run.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#define LGD_SWEEP_POOL
#include "../../common/cpu_box_sweeps.h"

namespace lgd_ops {
namespace {

template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same_v<scalar_t, double> || std::is_same_v<scalar_t, float>, double, float>;

// One block: the sweep's box sums of image b -> out (the block's first channel of row 0 of the [N, C] output).
template <bool CL, int CB, bool IR, bool kAvx2, typename scalar_t, typename acc_t>
void pool_one(const scalar_t* x, const MapLayout& m, int64_t H, int64_t W, const BoxPlan& plan, int64_t b,
              acc_t* col, acc_t* pre, acc_t* sums, bool average, scalar_t* out, int64_t C) {
  if constexpr (kAvx2) {
#if LGD_OPS_HAVE_AVX2_COPY
    isa_avx2::pool_sweep<CL, CB, IR>(x, m.sc, m.sh, m.sw, H, W, plan, b, col, pre, sums);
    isa_avx2::store_box_sums<CB>(sums, plan, b, average, out, C);
#endif
  } else {
    isa_base::pool_sweep<CL, CB, IR>(x, m.sc, m.sh, m.sw, H, W, plan, b, col, pre, sums);
    isa_base::store_box_sums<CB>(sums, plan, b, average, out, C);
  }
}

// Blocks [begin, end) of the map (struct Blocks).
template <typename scalar_t, bool kAvx2>
void pool_blocks(const scalar_t* feat, const MapLayout& m, const Blocks& blocks, int64_t H, int64_t W,
                 const BoxPlan& plan, bool average, scalar_t* out, int64_t begin, int64_t end) {
  using acc_t = acc_type<scalar_t>;
  const int64_t C = blocks.C;
  std::vector<acc_t> col(W * blocks.cb), pre((W + 1) * blocks.cb), sums(std::max<int64_t>(blocks.most, 1) * blocks.cb);
  for (int64_t blk = begin; blk < end; ++blk) {
    int64_t b, c0;
    bool wide;
    blocks.at(blk, &b, &c0, &wide);
    if (plan.start[b + 1] == plan.start[b]) continue;
    const scalar_t* x = feat + b * m.sb + c0 * m.sc;
    acc_t *c = col.data(), *p = pre.data(), *s = sums.data();
    scalar_t* o = out + c0;
    if (m.channels_last) {
      if (wide && blocks.cb == kBlockCLWide && blocks.integral_rows)
        pool_one<true, kBlockCLWide, true, kAvx2>(x, m, H, W, plan, b, c, p, s, average, o, C);
      else if (wide && blocks.cb == kBlockCLWide)
        pool_one<true, kBlockCLWide, false, kAvx2>(x, m, H, W, plan, b, c, p, s, average, o, C);
      else if (wide && blocks.integral_rows)
        pool_one<true, kBlockCL, true, kAvx2>(x, m, H, W, plan, b, c, p, s, average, o, C);
      else if (wide)
        pool_one<true, kBlockCL, false, kAvx2>(x, m, H, W, plan, b, c, p, s, average, o, C);
      else
        pool_one<true, 1, false, kAvx2>(x, m, H, W, plan, b, c, p, s, average, o, C);
    } else {
      if (wide && blocks.cb == kBlockNCHW)
        pool_one<false, kBlockNCHW, false, kAvx2>(x, m, H, W, plan, b, c, p, s, average, o, C);
      else
        pool_one<false, 1, false, kAvx2>(x, m, H, W, plan, b, c, p, s, average, o, C);
    }
  }
}

at::Tensor box_pool_cpu(const at::Tensor& features, const at::Tensor& boxes, const at::Tensor& batch_idx,
                        int64_t in_h, int64_t in_w, bool average, const std::optional<at::Tensor>& index) {
  TORCH_CHECK(features.dim() == 4, "lgd_ops.box_pool: features must be [B, C, H, W], got ", features.sizes());
  check_box_args(boxes, batch_idx, in_h, in_w, features, "features");
  const int64_t B = features.size(0), C = features.size(1), H = features.size(2), W = features.size(3);
  check_level_index(index, boxes.size(0), B, features);
  // Boxes covering nothing (and boxes of no valid image) keep this zero row.
  at::Tensor out = at::zeros({boxes.size(0), C}, features.options());
  if (out.numel() == 0 || H == 0 || W == 0) return out;
  const BoxPlan plan = box_plan(boxes, batch_idx, index, B, in_h, in_w, H, W);
  const at::Tensor feat = kernel_layout(features) ? features : features.contiguous();
  const MapLayout m = layout_of(feat);
  const Blocks blocks(C, m.channels_last, plan, H, W, at::get_num_threads());
  const bool avx2 = use_avx2();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, feat.scalar_type(), "box_pool_cpu", [&] {
    const scalar_t* f = feat.const_data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, B * blocks.per_image, blocks.grain(H, W), [&](int64_t begin, int64_t end) {
      if (avx2) pool_blocks<scalar_t, true>(f, m, blocks, H, W, plan, average, o, begin, end);
      else pool_blocks<scalar_t, false>(f, m, blocks, H, W, plan, average, o, begin, end);
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lgd_ops, CPU, m) { m.impl("box_pool", &box_pool_cpu); }

}  // namespace lgd_ops
