// CPU box_fill: per block of channels of one image, the top-to-bottom sweep of csrc/common/cpu_box_sweep.inc
// (a running row of float64 values; on event rows a box's value is added to / removed from its columns
// directly, or through a difference row and one prefix sum when the row's boxes are wide: cost
// O(H*W + boxes) whatever the boxes' sizes, no scratch map). Writes an NCHW map one (b, c) plane (or 8,
// transposed: struct Blocks) per block, or a channels_last map (channels_last=true) 128 or 32 channels per
// block (float/double maps with many events: the difference map's column sums, each row's prefix taken as it is
// written). One thread owns a block and adds in a fixed order, so the output is deterministic (no atomics).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#define LGD_SWEEP_FILL
#include "../../common/cpu_box_sweeps.h"

namespace lgd_ops {
namespace {

template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same_v<scalar_t, double> || std::is_same_v<scalar_t, float>, double, float>;

// A thread's scratch for fill_sweep, sized for the widest block.
template <typename acc_t>
struct Scratch {
  acc_t *col, *diff, *scaled;
};

template <bool CL, int CB, bool IR, bool kAvx2, typename scalar_t, typename acc_t>
void fill_one(const scalar_t* v, int64_t C, scalar_t* o, const MapLayout& m, int64_t H, int64_t W, const BoxPlan& plan,
              int64_t b, bool average, const Scratch<acc_t>& s) {
  if constexpr (kAvx2) {
#if LGD_OPS_HAVE_AVX2_COPY
    isa_avx2::fill_sweep<CL, CB, IR>(v, C, o, m.sc, m.sh, m.sw, H, W, plan, b, average, s.col, s.diff, s.scaled);
#endif
  } else {
    isa_base::fill_sweep<CL, CB, IR>(v, C, o, m.sc, m.sh, m.sw, H, W, plan, b, average, s.col, s.diff, s.scaled);
  }
}

// Blocks [begin, end) of the map (struct Blocks).
template <typename scalar_t, bool kAvx2>
void fill_blocks(const scalar_t* values, scalar_t* out, const MapLayout& m, const Blocks& blocks, int64_t H,
                 int64_t W, const BoxPlan& plan, bool average, int64_t begin, int64_t end) {
  using acc_t = acc_type<scalar_t>;
  std::vector<acc_t> col(W * blocks.cb), diff((W + 1) * blocks.cb);
  std::vector<acc_t> scaled(std::max<int64_t>(blocks.most, 1) * blocks.cb);
  const Scratch<acc_t> s{col.data(), diff.data(), scaled.data()};
  const int64_t C = blocks.C;
  // Integral rows (Blocks::integral_rows) for float/double maps only: float fills are faster that way, bfloat16
  // fills slower (timed on CPU), so half maps keep the column sums.
  constexpr bool kIR = std::is_same_v<acc_t, double>;
  const bool ir = kIR && blocks.integral_rows;
  for (int64_t blk = begin; blk < end; ++blk) {
    int64_t b, c0;
    bool wide;
    blocks.at(blk, &b, &c0, &wide);
    scalar_t* o = out + b * m.sb + c0 * m.sc;
    const scalar_t* v = values + c0;
    if (m.channels_last) {
      if (wide && blocks.cb == kBlockCLWide && ir)
        fill_one<true, kBlockCLWide, kIR, kAvx2>(v, C, o, m, H, W, plan, b, average, s);
      else if (wide && blocks.cb == kBlockCLWide)
        fill_one<true, kBlockCLWide, false, kAvx2>(v, C, o, m, H, W, plan, b, average, s);
      else if (wide && ir)
        fill_one<true, kBlockCL, kIR, kAvx2>(v, C, o, m, H, W, plan, b, average, s);
      else if (wide)
        fill_one<true, kBlockCL, false, kAvx2>(v, C, o, m, H, W, plan, b, average, s);
      else
        fill_one<true, 1, false, kAvx2>(v, C, o, m, H, W, plan, b, average, s);
    } else {
      if (wide && blocks.cb == kBlockNCHW)
        fill_one<false, kBlockNCHW, false, kAvx2>(v, C, o, m, H, W, plan, b, average, s);
      else
        fill_one<false, 1, false, kAvx2>(v, C, o, m, H, W, plan, b, average, s);
    }
  }
}

at::Tensor box_fill_cpu(const at::Tensor& values, const at::Tensor& boxes, const at::Tensor& batch_idx, int64_t in_h,
                        int64_t in_w, int64_t batch, int64_t out_h, int64_t out_w, bool average, bool channels_last,
                        const std::optional<at::Tensor>& index) {
  TORCH_CHECK(values.dim() == 2 && values.size(0) == boxes.size(0),
              "lgd_ops.box_fill: values must be [N, C] with N = boxes.size(0), got ", values.sizes());
  TORCH_CHECK(batch >= 0 && out_h >= 0 && out_w >= 0, "lgd_ops.box_fill: output size must be non-negative, got (",
              batch, ", ", out_h, ", ", out_w, ")");
  check_box_args(boxes, batch_idx, in_h, in_w, values, "values");
  check_level_index(index, boxes.size(0), batch, values);
  const int64_t C = values.size(1);
  at::Tensor out = at::empty({batch, C, out_h, out_w}, values.options().memory_format(
      channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous));  // every element is written
  if (out.numel() == 0) return out;
  const BoxPlan plan = box_plan(boxes, batch_idx, index, batch, in_h, in_w, out_h, out_w);
  const at::Tensor vals = values.contiguous();
  const MapLayout m = layout_of(out);
  const Blocks blocks(C, m.channels_last, plan, out_h, out_w, at::get_num_threads());
  const bool avx2 = use_avx2();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, vals.scalar_type(), "box_fill_cpu", [&] {
    const scalar_t* v = vals.const_data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, batch * blocks.per_image, blocks.grain(out_h, out_w), [&](int64_t begin, int64_t end) {
      if (avx2) fill_blocks<scalar_t, true>(v, o, m, blocks, out_h, out_w, plan, average, begin, end);
      else fill_blocks<scalar_t, false>(v, o, m, blocks, out_h, out_w, plan, average, begin, end);
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lgd_ops, CPU, m) { m.impl("box_fill", &box_fill_cpu); }

}  // namespace lgd_ops
