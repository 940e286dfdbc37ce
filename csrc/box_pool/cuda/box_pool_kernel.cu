// CUDA box_pool: one warp per (box, channel) sums the box's rectangle directly, lanes along the
// row so reads are coalesced, then a fixed-order shuffle reduction (deterministic). Chosen over a
// summed-area table because that needs a scratch copy of the whole map (the memory LGD's
// reference wastes) while a box rectangle is read once from L2; no dense masks are built.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "../../common/box_checks.h"
#include "../../common/cuda_boxes.cuh"

namespace lgd_ops {
namespace {

constexpr int kWarpsPerBlock = 8;  // channels of one box per block

template <typename scalar_t>
__global__ void box_pool_kernel(const scalar_t* __restrict__ feat, const int32_t* __restrict__ cells,
                                const int64_t* __restrict__ batch_idx, int64_t n, int64_t C, int64_t sb,
                                int64_t sc, int64_t sh, int64_t sw, bool average, scalar_t* __restrict__ out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t box = blockIdx.x;
  const int64_t c = int64_t(blockIdx.y) * kWarpsPerBlock + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (box >= n || c >= C) return;
  const CellRange r{cells[4 * box], cells[4 * box + 1], cells[4 * box + 2], cells[4 * box + 3]};
  acc_t sum = 0;
  if (!r.empty()) {
    const scalar_t* plane = feat + batch_idx[box] * sb + c * sc;
    for (int32_t j = r.y0; j <= r.y1; ++j)
      for (int32_t i = r.x0 + lane; i <= r.x1; i += 32) sum += static_cast<acc_t>(plane[j * sh + i * sw]);
  }
  for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_down_sync(0xffffffff, sum, offset);
  if (lane == 0) {
    const acc_t count = r.empty() ? acc_t(1) : acc_t(r.count());
    out[box * C + c] = static_cast<scalar_t>(average ? sum / count : sum);
  }
}

at::Tensor box_pool_cuda(const at::Tensor& features, const at::Tensor& boxes, const at::Tensor& batch_idx,
                         int64_t in_h, int64_t in_w, bool average) {
  TORCH_CHECK(features.dim() == 4, "lgd_ops.box_pool: features must be [B, C, H, W], got ", features.sizes());
  check_box_args(boxes, batch_idx, in_h, in_w, features, "features");
  const c10::cuda::CUDAGuard guard(features.device());
  const int64_t B = features.size(0), C = features.size(1), H = features.size(2), W = features.size(3);
  const int64_t n = boxes.size(0);
  if (n == 0 || C == 0 || H == 0 || W == 0) return at::zeros({n, C}, features.options());
  at::Tensor out = at::empty({n, C}, features.options());
  const CudaBoxPlan plan = plan_boxes(boxes, batch_idx, B, in_h, in_w, H, W);
  // NCHW and channels_last maps are read in place (strides); other views are made contiguous first.
  const at::Tensor feat = features.is_contiguous() || features.is_contiguous(at::MemoryFormat::ChannelsLast)
                              ? features : features.contiguous();
  const at::Tensor bi = batch_idx.contiguous();
  const dim3 grid(n, (C + kWarpsPerBlock - 1) / kWarpsPerBlock);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, feat.scalar_type(), "box_pool_cuda", [&] {
    box_pool_kernel<scalar_t><<<grid, 32 * kWarpsPerBlock, 0, at::cuda::getCurrentCUDAStream()>>>(
        feat.data_ptr<scalar_t>(), plan.cells.data_ptr<int32_t>(), bi.data_ptr<int64_t>(), n, C, feat.stride(0),
        feat.stride(1), feat.stride(2), feat.stride(3), average, out.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lgd_ops, CUDA, m) { m.impl("box_pool", &box_pool_cuda); }

}  // namespace lgd_ops
