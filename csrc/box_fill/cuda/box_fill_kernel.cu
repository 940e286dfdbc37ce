// CUDA box_fill. The sweep (box_fill_sweep_kernel): one block per (image, up to 8 channels) walks the output
// top to bottom keeping the current row of each channel in shared memory; on a row where boxes start or end,
// each channel's warp puts the boxes' +-values into a difference row (only the lane owning a column writes
// it, boxes in a fixed order) and adds its scan to the row (a difference map and its 2-D prefix, one row at a
// time: csrc/common/box_sweep_math.h has the arithmetic, order and error bound). Cost O(B*C*H*W + N*C)
// whatever the boxes' sizes, every output element written once, no atomics: bit-identical run to run.
// Non-finite values are left out of the sweep and added to their own box's cells afterwards.
// The gather (box_fill_kernel: one thread per output cell and 8 channels loops over its image's boxes, O(H*W*N)
// per plane) stays for maps under kSweepMinCells cells and rows too wide for a sweep block's shared memory
// (cuda_boxes.cuh); that threshold is a guess, untimed on a GPU.
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

// grid (channel blocks, images); shared: col [CB][W] and diff [CB][W + 1] accumulators. values: [N, C]
// contiguous. CL: channels_last output (the row writes run along channels, so writes are coalesced).
template <typename scalar_t, typename acc_t, bool CL>
__global__ void __launch_bounds__(kSweepThreads) box_fill_sweep_kernel(
    const scalar_t* __restrict__ values, int64_t C, int64_t H, int64_t W, int CB,
    const int64_t* __restrict__ ev_key, const int64_t* __restrict__ ev_id, const int64_t* __restrict__ ev_start,
    const int32_t* __restrict__ cells, bool average, scalar_t* __restrict__ out, int64_t sb, int64_t sc,
    int64_t sh, int64_t sw) {
  extern __shared__ __align__(sizeof(double)) unsigned char sweep_shared[];
  __shared__ int non_finite;
  acc_t* col = reinterpret_cast<acc_t*>(sweep_shared);
  acc_t* diff = col + CB * W;
  const int64_t b = blockIdx.y, c0 = int64_t(blockIdx.x) * CB;
  const int tid = threadIdx.x, warp = tid / kSweepLanes, lane = tid % kSweepLanes;
  const int64_t span = CB * W, base = b * (H + 2), pend = ev_start[b + 1], c = c0 + warp;
  const bool owner = warp < CB && c < C;
  scalar_t* o = out + b * sb + c0 * sc;
  for (int64_t e = tid; e < CB * (2 * W + 1); e += kSweepThreads) col[e] = 0;  // col and diff
  if (tid == 0) non_finite = 0;
  __syncthreads();
  for (int64_t j = 0, p = ev_start[b]; j < H; ++j) {
    if (p < pend && ev_key[p] == base + j) {  // an event row (the same branch in every thread)
      int64_t q = p + 1;
      while (q < pend && ev_key[q] == base + j) ++q;
      if (owner) {
        acc_t* cw = col + warp * W;
        acc_t* dw = diff + warp * (W + 1);
        for (int64_t e = p; e < q; ++e) {  // every lane walks the row's events in order
          const int64_t n = ev_id[e] / 2;
          const CellRange r = load_cells(cells, n);
          acc_t v = static_cast<acc_t>(values[n * C + c]);
          if (!is_finite_value(v)) {  // added after the sweep: it would stay in the columns past the box
            if (lane == 0) atomicOr(&non_finite, 1);
            v = 0;
          }
          const acc_t amount = fill_event_amount(fill_box_value(v, r, average), ev_id[e] % 2 == 0);
          if (lane_of_column(W, r.x0) == lane) dw[r.x0] += amount;
          if (r.x1 + 1 < W && lane_of_column(W, r.x1 + 1) == lane) dw[r.x1 + 1] -= amount;
        }
        const Chunk ch = lane_chunk(W, lane);
        chunk_apply_diff(dw, cw, ch, warp_exclusive_carry(chunk_total(dw, ch), lane));
      }
      __syncthreads();
      p = q;
    }
    scalar_t* orow = o + j * sh;
    for (int64_t e = tid; e < span; e += kSweepThreads) {
      const int64_t cc = CL ? e % CB : e / W, i = CL ? e / CB : e % W;
      if (c0 + cc < C) orow[cc * sc + i * sw] = static_cast<scalar_t>(col[cc * W + i]);
    }
    __syncthreads();
  }
  if (!non_finite || !owner || lane != 0) return;
  // Non-finite values (NaN - NaN, inf - inf never cancel) go straight into their own box's cells, one thread
  // per channel, boxes in event order.
  for (int64_t e = ev_start[b]; e < pend; ++e) {
    if (ev_id[e] % 2 != 0) continue;  // each box once, at its top event
    const int64_t n = ev_id[e] / 2;
    const CellRange r = load_cells(cells, n);
    const acc_t v = static_cast<acc_t>(values[n * C + c]);
    if (is_finite_value(v)) continue;
    const acc_t value = fill_box_value(v, r, average);
    scalar_t* oc = o + warp * sc;
    for (int32_t j = r.y0; j <= r.y1; ++j)
      for (int32_t i = r.x0; i <= r.x1; ++i) {
        scalar_t& cell = oc[j * sh + i * sw];
        cell = static_cast<scalar_t>(static_cast<acc_t>(cell) + value);
      }
  }
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
  const auto plan = cached_box_plan(boxes, batch_idx, batch, in_h, in_w, out_h, out_w);
  const at::Tensor vals = values.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, vals.scalar_type(), "box_fill_cuda", [&] {
    using acc_t = sweep_acc_t<scalar_t>;
    const int cb = sweep_channels(C, out_h, out_w, sizeof(acc_t));
    if (cb > 0) {
      const auto ev = cached_event_plan(boxes, batch_idx, batch, in_h, in_w, out_h, out_w, *plan);
      const dim3 grid((C + cb - 1) / cb, batch);
      const size_t shared = size_t(cb) * size_t(2 * out_w + 1) * sizeof(acc_t);
      auto kernel = channels_last ? box_fill_sweep_kernel<scalar_t, acc_t, true>
                                  : box_fill_sweep_kernel<scalar_t, acc_t, false>;
      kernel<<<grid, kSweepThreads, shared, at::cuda::getCurrentCUDAStream()>>>(
          vals.data_ptr<scalar_t>(), C, out_h, out_w, cb, ev->key.data_ptr<int64_t>(), ev->id.data_ptr<int64_t>(),
          ev->start.data_ptr<int64_t>(), plan->cells.data_ptr<int32_t>(), average, out.data_ptr<scalar_t>(),
          out.stride(0), out.stride(1), out.stride(2), out.stride(3));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
    const dim3 grid((out_h * out_w + kThreads - 1) / kThreads, (C + kChannels - 1) / kChannels, batch);
    box_fill_kernel<scalar_t><<<grid, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        vals.data_ptr<scalar_t>(), plan->cells.data_ptr<int32_t>(), plan->order.data_ptr<int64_t>(),
        plan->start.data_ptr<int64_t>(), C, out_h, out_w, average, channels_last, out.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lgd_ops, CUDA, m) { m.impl("box_fill", &box_fill_cuda); }

}  // namespace lgd_ops
