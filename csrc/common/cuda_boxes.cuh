// CUDA-side preparation shared by the box kernels: each box's cell range on the level grid
// (box_cells, the same arithmetic as the CPU kernels), the boxes grouped by image (the direct kernels), and
// the boxes' top/bottom events sorted by (image, row) with the warp scan of the row sweeps
// (box_sweep_math.h holds their arithmetic). Nothing here syncs with the host.
// Both plans depend only on the boxes and the level, so each is built once per (boxes, level, stream) and
// reused by every call on them (box_pool's forward and its box_fill backward, each level's call):
// cached_box_plan and cached_event_plan keep them in PlanCache<CudaBoxPlan, 7> and
// PlanCache<CudaEventPlan, 7> (plan_cache.h; the CPU plans have their own, cpu_boxes.h), keyed on the
// boxes/batch_idx tensors' identity and version, the sizes, the device and the stream.
#pragma once

#include <type_traits>

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>

#include "box_math.h"
#include "box_sweep_math.h"
#include "plan_cache.h"

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

// Event i of box i / 2 (top when i is even): key image * (H + 2) + event_row, or batch * (H + 2) (after every
// image) for a box that covers nothing or names no image.
__global__ void box_events_kernel(const int32_t* __restrict__ cells, const int64_t* __restrict__ batch_idx,
                                  int64_t n, int64_t batch, int64_t h, int64_t* __restrict__ keys) {
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i >= 2 * n) return;
  const int64_t box = i / 2, img = batch_idx[box];
  const CellRange r{cells[4 * box], cells[4 * box + 1], cells[4 * box + 2], cells[4 * box + 3]};
  const bool valid = img >= 0 && img < batch && !r.empty();
  keys[i] = valid ? img * (h + 2) + event_row(r, i % 2 == 0) : batch * (h + 2);
}

}  // namespace

// The sweeps accumulate in double for float/double maps and in float for half/bfloat16 (box_sweep_math.h).
template <typename scalar_t>
using sweep_acc_t = std::conditional_t<(sizeof(scalar_t) >= 4), double, float>;

constexpr int kSweepThreads = 256;        // 8 warps: up to 8 channels per block, one warp each
constexpr int64_t kSweepMinCells = 64;    // maps with fewer cells keep the direct kernels (a guess: untimed on GPU)
constexpr size_t kSweepSharedBytes = 48 * 1024;  // without opting in to more shared memory per block

// Channels per sweep block: up to 8 (one warp each) while its two rows of state, CB * (2W + 1) accumulators,
// fit in kSweepSharedBytes; 0 when the map is too small (or one channel's rows too wide) for a sweep.
inline int sweep_channels(int64_t C, int64_t H, int64_t W, size_t acc_bytes) {
  if (H * W < kSweepMinCells) return 0;
  for (int cb = 8; cb >= 1; cb /= 2)
    if (cb <= C || cb == 1)
      if (size_t(cb) * size_t(2 * W + 1) * acc_bytes <= kSweepSharedBytes) return cb;
  return 0;
}

struct CudaEventPlan {
  at::Tensor key;    // int64 [2N] event keys image * (H + 2) + row, ascending
  at::Tensor id;     // int64 [2N] event ids 2 * box + (bottom ? 1 : 0), in key order (box order within a row)
  at::Tensor start;  // int64 [batch + 1]: image b's events are [start[b], start[b + 1])
};

inline CudaEventPlan plan_events(const at::Tensor& cells, const at::Tensor& batch_idx, int64_t batch, int64_t h) {
  const int64_t n = cells.size(0);
  at::Tensor keys = at::empty({2 * n}, batch_idx.options().dtype(at::kLong));
  if (n > 0) {
    const at::Tensor bi = batch_idx.contiguous();
    const int threads = 256;
    box_events_kernel<<<(2 * n + threads - 1) / threads, threads, 0, at::cuda::getCurrentCUDAStream()>>>(
        cells.data_ptr<int32_t>(), bi.data_ptr<int64_t>(), n, batch, h, keys.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  auto sorted = at::sort(keys, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  CudaEventPlan plan;
  plan.key = std::get<0>(sorted);
  plan.id = std::get<1>(sorted);
  plan.start = at::searchsorted(plan.key, at::arange(batch + 1, keys.options()) * (h + 2));
  return plan;
}

// The sum of the chunks of the lanes before this one (a Hillis-Steele scan over the warp's 32 lanes, in the
// fixed order scan_step fixes; every lane of the warp must call it).
template <typename acc_t>
__device__ __forceinline__ acc_t warp_exclusive_carry(acc_t partial, int lane) {
  acc_t incl = partial;
#pragma unroll
  for (int d = 1; d < kSweepLanes; d *= 2) incl = scan_step(incl, __shfl_up_sync(0xffffffffu, incl, d), lane, d);
  const acc_t before = __shfl_up_sync(0xffffffffu, incl, 1);
  return lane == 0 ? acc_t(0) : before;
}

__device__ __forceinline__ CellRange load_cells(const int32_t* cells, int64_t n) {
  return CellRange{cells[4 * n], cells[4 * n + 1], cells[4 * n + 2], cells[4 * n + 3]};
}

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

// A cached plan of (boxes, batch_idx) on an h x w level, made by build() on a miss. The key holds the current
// stream (rather than record_stream on a shared plan): a plan's tensors are written on the stream that built
// it, so a call on another stream would also need an event to wait for them; with one plan per stream every
// read is ordered after the writes, and the caching allocator hands the plan's memory, once freed, only to
// later work on that stream. Under CUDA graph capture the cache is bypassed: a plan built there is written
// only when the graph replays, and a cached plan read by the graph could be freed before a replay.
template <typename Plan, typename Build>
std::shared_ptr<const Plan> cached_cuda_plan(const at::Tensor& boxes, const at::Tensor& batch_idx, int64_t batch,
                                             int64_t in_h, int64_t in_w, int64_t h, int64_t w, Build&& build) {
  if (c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None)
    return std::make_shared<const Plan>(build());
  const c10::cuda::CUDAStream stream = at::cuda::getCurrentCUDAStream();
  return cached_plan<Plan>(boxes, batch_idx, {batch, in_h, in_w, h, w, stream.device_index(), stream.id()},
                           std::forward<Build>(build));
}

inline std::shared_ptr<const CudaBoxPlan> cached_box_plan(const at::Tensor& boxes, const at::Tensor& batch_idx,
                                                          int64_t batch, int64_t in_h, int64_t in_w, int64_t h,
                                                          int64_t w) {
  return cached_cuda_plan<CudaBoxPlan>(boxes, batch_idx, batch, in_h, in_w, h, w,
                                       [&] { return plan_boxes(boxes, batch_idx, batch, in_h, in_w, h, w); });
}

// The events of plan = cached_box_plan(boxes, batch_idx, batch, in_h, in_w, h, w) (the same key).
inline std::shared_ptr<const CudaEventPlan> cached_event_plan(const at::Tensor& boxes, const at::Tensor& batch_idx,
                                                              int64_t batch, int64_t in_h, int64_t in_w,
                                                              int64_t h, int64_t w, const CudaBoxPlan& plan) {
  return cached_cuda_plan<CudaEventPlan>(boxes, batch_idx, batch, in_h, in_w, h, w,
                                         [&] { return plan_events(plan.cells, batch_idx, batch, h); });
}

}  // namespace lgd_ops
