// CUDA box_fill: a gather, one thread per output cell and 8 channels, looping over its image's
// boxes in a fixed order and adding the value of every box that covers the cell. Every output
// element is written once by one thread (no atomics), so the result is deterministic; reads of the
// box list are warp-uniform broadcasts. A scatter over box rectangles would need float atomics.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "../../common/box_checks.h"
#include "../../common/cuda_boxes.cuh"

namespace lgd_ops {
namespace {

constexpr int kThreads = 256;
constexpr int kChannels = 8;  // channels per thread

template <typename scalar_t>
__global__ void box_fill_kernel(const scalar_t* __restrict__ values, const int32_t* __restrict__ cells,
                                const int64_t* __restrict__ order, const int64_t* __restrict__ start,
                                int64_t C, int64_t H, int64_t W, bool average, bool channels_last,
                                scalar_t* __restrict__ out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t p = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t c0 = int64_t(blockIdx.y) * kChannels;
  const int64_t b = blockIdx.z;
  if (p >= H * W) return;
  const int32_t j = int32_t(p / W), i = int32_t(p % W);
  acc_t acc[kChannels];
#pragma unroll
  for (int q = 0; q < kChannels; ++q) acc[q] = 0;
  for (int64_t k = start[b]; k < start[b + 1]; ++k) {
    const int64_t n = order[k];
    const CellRange r{cells[4 * n], cells[4 * n + 1], cells[4 * n + 2], cells[4 * n + 3]};
    if (i < r.x0 || i > r.x1 || j < r.y0 || j > r.y1) continue;
    const acc_t scale = average ? acc_t(1) / acc_t(r.count()) : acc_t(1);
#pragma unroll
    for (int q = 0; q < kChannels; ++q)
      if (c0 + q < C) acc[q] += static_cast<acc_t>(values[n * C + c0 + q]) * scale;
  }
#pragma unroll
  for (int q = 0; q < kChannels; ++q)
    if (c0 + q < C)
      out[channels_last ? (b * H * W + p) * C + c0 + q : (b * C + c0 + q) * H * W + p] = static_cast<scalar_t>(acc[q]);
}

at::Tensor box_fill_cuda(const at::Tensor& values, const at::Tensor& boxes, const at::Tensor& batch_idx,
                         int64_t in_h, int64_t in_w, int64_t batch, int64_t out_h, int64_t out_w, bool average,
                         bool channels_last) {
  TORCH_CHECK(values.dim() == 2 && values.size(0) == boxes.size(0),
              "lgd_ops.box_fill: values must be [N, C] with N = boxes.size(0), got ", values.sizes());
  TORCH_CHECK(batch >= 0 && out_h >= 0 && out_w >= 0, "lgd_ops.box_fill: output size must be non-negative, got (",
              batch, ", ", out_h, ", ", out_w, ")");
  TORCH_CHECK(batch <= 65535, "lgd_ops.box_fill: at most 65535 images per call on CUDA, got ", batch);
  check_box_args(boxes, batch_idx, in_h, in_w, values, "values");
  const c10::cuda::CUDAGuard guard(values.device());
  const int64_t C = values.size(1);
  at::Tensor out = at::empty({batch, C, out_h, out_w}, values.options().memory_format(
      channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  const CudaBoxPlan plan = plan_boxes(boxes, batch_idx, batch, in_h, in_w, out_h, out_w);
  const at::Tensor vals = values.contiguous();
  const dim3 grid((out_h * out_w + kThreads - 1) / kThreads, (C + kChannels - 1) / kChannels, batch);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, vals.scalar_type(), "box_fill_cuda", [&] {
    box_fill_kernel<scalar_t><<<grid, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        vals.data_ptr<scalar_t>(), plan.cells.data_ptr<int32_t>(), plan.order.data_ptr<int64_t>(),
        plan.start.data_ptr<int64_t>(), C, out_h, out_w, average, channels_last, out.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lgd_ops, CUDA, m) { m.impl("box_fill", &box_fill_cuda); }

}  // namespace lgd_ops
