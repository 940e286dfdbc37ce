// CUDA-side preparation shared by the box kernels: each box's cell range on the level grid
// (box_cells, the same arithmetic as the CPU kernels) and the boxes grouped by image.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include "box_math.h"

namespace lgd_ops {

struct CudaBoxPlan {
  at::Tensor cells;  // int32 [N, 4] = (x0, x1, y0, y1) per box in input order; empty for invalid boxes
  at::Tensor order;  // int64 box ids, grouped by image (stable), valid non-empty boxes first
  at::Tensor start;  // int64 [batch + 1]: boxes of image b are order[start[b] .. start[b + 1])
};

namespace {  // one copy per translation unit (this header is included by several .cu files)

__global__ void box_cells_kernel(const double* __restrict__ boxes, const int64_t* __restrict__ batch_idx,
                                 int64_t n, int64_t batch, int64_t in_h, int64_t in_w, int64_t h,
                                 int64_t w, int32_t* __restrict__ cells, int64_t* __restrict__ keys) {
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i >= n) return;
  const int64_t img = batch_idx[i];
  CellRange r{0, -1, 0, -1};
  if (img >= 0 && img < batch)
    r = box_cells(boxes[4 * i], boxes[4 * i + 1], boxes[4 * i + 2], boxes[4 * i + 3], in_h, in_w, h, w);
  cells[4 * i] = r.x0;
  cells[4 * i + 1] = r.x1;
  cells[4 * i + 2] = r.y0;
  cells[4 * i + 3] = r.y1;
  keys[i] = r.empty() ? batch : img;  // boxes covering nothing sort after every image
}

}  // namespace

inline CudaBoxPlan plan_boxes(const at::Tensor& boxes, const at::Tensor& batch_idx, int64_t batch,
                              int64_t in_h, int64_t in_w, int64_t h, int64_t w) {
  const int64_t n = boxes.size(0);
  const at::Tensor bx = boxes.to(at::kDouble).contiguous();
  const at::Tensor bi = batch_idx.contiguous();
  CudaBoxPlan plan;
  plan.cells = at::empty({n, 4}, boxes.options().dtype(at::kInt));
  at::Tensor keys = at::empty({n}, boxes.options().dtype(at::kLong));
  if (n > 0) {
    const int threads = 256;
    box_cells_kernel<<<(n + threads - 1) / threads, threads, 0, at::cuda::getCurrentCUDAStream()>>>(
        bx.data_ptr<double>(), bi.data_ptr<int64_t>(), n, batch, in_h, in_w, h, w,
        plan.cells.data_ptr<int32_t>(), keys.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  auto sorted = at::sort(keys, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  plan.order = std::get<1>(sorted);
  plan.start = at::searchsorted(std::get<0>(sorted), at::arange(batch + 1, keys.options()));
  return plan;
}

}  // namespace lgd_ops
