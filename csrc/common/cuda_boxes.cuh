// CUDA-side box preparation shared by the box kernels: the level index (lgd_ops/_boxes.py level_index) taken
// from the caller, or built on the device per call when none is given (box_cells, the same arithmetic as the
// CPU kernels, then a stable sort of the events and a searchsorted: no host sync, nothing cached), the launch
// shape of the banded row sweeps, and the warp scan they share (box_sweep_math.h holds their arithmetic).
#pragma once

#include <climits>
#include <optional>
#include <type_traits>

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include "box_checks.h"
#include "box_math.h"
#include "box_sweep_math.h"

namespace lgd_ops {

namespace {  // one copy per translation unit (this header is included by several .cu files)

// Box i's cells (x0, x1, y0, y1) and its two event keys image * (H + 2) + event_row, or batch * (H + 2) (after
// every image) for a box that covers nothing or names no image.
__global__ void box_index_kernel(const double* __restrict__ boxes, const int64_t* __restrict__ batch_idx,
                                 int64_t n, int64_t batch, int64_t in_h, int64_t in_w, int64_t h, int64_t w,
                                 int32_t* __restrict__ cells, int64_t* __restrict__ keys) {
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
  keys[2 * i] = r.empty() ? batch * (h + 2) : img * (h + 2) + event_row(r, true);
  keys[2 * i + 1] = r.empty() ? batch * (h + 2) : img * (h + 2) + event_row(r, false);
}

}  // namespace

// The level index of N boxes on an h x w level of `batch` images, built on the boxes' device.
inline at::Tensor device_level_index(const at::Tensor& boxes, const at::Tensor& batch_idx, int64_t batch,
                                     int64_t in_h, int64_t in_w, int64_t h, int64_t w) {
  TORCH_CHECK((batch + 1) * (h + 2) <= INT_MAX, "lgd_ops: ", batch, " images of ", h,
              " rows exceed the level index's int32 event keys");
  const int64_t n = boxes.size(0);
  TORCH_CHECK(8 * n + batch + 1 <= INT_MAX, "lgd_ops: ", n, " boxes exceed the level index's int32 positions");
  const at::Tensor bx = boxes.to(at::kDouble).contiguous();
  const at::Tensor bi = batch_idx.contiguous();
  at::Tensor cells = at::empty({4 * n}, boxes.options().dtype(at::kInt));
  at::Tensor keys = at::empty({2 * n}, boxes.options().dtype(at::kLong));
  if (n > 0) {
    const int threads = 256;
    box_index_kernel<<<(n + threads - 1) / threads, threads, 0, at::cuda::getCurrentCUDAStream()>>>(
        bx.data_ptr<double>(), bi.data_ptr<int64_t>(), n, batch, in_h, in_w, h, w, cells.data_ptr<int32_t>(),
        keys.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  auto sorted = at::sort(keys, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  const at::Tensor& key = std::get<0>(sorted);
  const at::Tensor start = at::searchsorted(key, at::arange(batch + 1, keys.options()) * (h + 2));
  return at::cat({cells, key.to(at::kInt), std::get<1>(sorted).to(at::kInt), start.to(at::kInt)});
}

// The caller's level index after the cheap checks (check_level_index: no sync), else one built here.
inline at::Tensor level_index_or_build(const std::optional<at::Tensor>& index, const at::Tensor& boxes,
                                       const at::Tensor& batch_idx, int64_t batch, int64_t in_h, int64_t in_w,
                                       int64_t h, int64_t w, const at::Tensor& like) {
  if (!index.has_value() || !index->defined()) return device_level_index(boxes, batch_idx, batch, in_h, in_w, h, w);
  check_level_index(index, boxes.size(0), batch, like);
  return *index;
}

// The four parts of a level index of N boxes.
struct IndexView {
  const int32_t* cells;  // [4N] (x0, x1, y0, y1) per box
  const int32_t* keys;   // [2N] ascending
  const int32_t* ids;    // [2N] 2 n (top) or 2 n + 1 (bottom), in key order
  const int32_t* start;  // [batch + 1]
};

LGD_HOST_DEVICE IndexView index_view(const int32_t* index, int64_t n) {
  return {index, index + 4 * n, index + 6 * n, index + 8 * n};
}

// The sweeps accumulate in double for float/double maps and in float for half/bfloat16 (box_sweep_math.h).
template <typename scalar_t>
using sweep_acc_t = std::conditional_t<(sizeof(scalar_t) >= 4), double, float>;

constexpr int kSweepThreads = 256;        // 8 warps: up to 8 channels per block, one warp each
constexpr int64_t kSweepMinCells = 64;    // maps with fewer cells keep the direct kernels (a guess: untimed on GPU)
// The band count aims at this many blocks per SM, at most: one wave, since an SM holds 4-5 sweep blocks (48-54
// registers x 256 threads, up to 39 KB of shared memory), and at least 2 per SM (sweep_band_rows).
constexpr int kSweepBlocksPerSm = 4;

// A banded sweep's launch: grid (ceil(C / cb), bands, B), cb channels per block (one warp each), rows of
// state at `pitch` accumulators, bands of `rows` rows.
struct SweepLaunch {
  int32_t cb, pitch, rows, bands;
  size_t shared;  // bytes: col and pre/diff rows, cb x pitch accumulators each
};

// cb = 0 when the map is too small (or one channel's rows too wide) for a sweep.
inline SweepLaunch sweep_launch(int64_t C, int64_t H, int64_t W, int64_t B, size_t acc_bytes) {
  if (H * W < kSweepMinCells || H >= INT_MAX / 2 || W >= INT_MAX / 2 || C >= INT_MAX) return {0, 0, 0, 0, 0};
  const int32_t cb = sweep_block_channels(C, int32_t(W), int64_t(acc_bytes), kSweepSharedBytes);
  if (cb == 0) return {0, 0, 0, 0, 0};
  const int32_t pitch = sweep_pitch(int32_t(W), cb);
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int32_t rows = sweep_band_rows(int32_t(H), ((C + cb - 1) / cb) * B, kSweepBlocksPerSm * sms);
  return {cb, pitch, rows, band_count(int32_t(H), rows), 2 * size_t(cb) * size_t(pitch) * acc_bytes};
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

}  // namespace lgd_ops
