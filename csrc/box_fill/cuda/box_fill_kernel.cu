// CUDA box_fill. The banded sweep (box_fill_sweep_kernel): one block per (up to 8 channels, band of rows, image)
// writes its band's rows keeping the current row of each channel in shared memory. The band's first row starts
// from every box active there (found among the image's top events above it), later rows where boxes start or
// end apply those events: each channel's warp loads a row's events 32 at a time, one per lane, and passes them
// to every lane in event order; the lane owning a box's x0 (or x1 + 1) puts its +-value into a difference row,
// whose scan is added to the row (a difference map and its 2-D prefix, one row at a time:
// csrc/common/box_sweep_math.h has the schedule, arithmetic, order and error bound). Between event rows a thread
// stores its own row elements' constant value to every row, with no block barrier. Cost O(B*C*H*W) writes plus
// the index, every output element written once, no atomics on data: bit-identical run to run. Non-finite
// values are left out of the sweep and added to their own box's cells of the band afterwards.
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
__global__ void box_fill_kernel(const scalar_t* __restrict__ values, const int32_t* __restrict__ index, int64_t N,
                                int64_t C, int64_t H, int64_t W, bool average, bool channels_last,
                                scalar_t* __restrict__ out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t p = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t c0 = int64_t(blockIdx.y) * kChannels;
  const int64_t b = blockIdx.z;
  if (p >= H * W) return;
  const int32_t j = int32_t(p / W), i = int32_t(p % W);
  const IndexView ix = index_view(index, N);
  acc_t acc[kChannels];
#pragma unroll
  for (int q = 0; q < kChannels; ++q) acc[q] = 0;
  for (int32_t e = ix.start[b]; e < ix.start[b + 1]; ++e) {  // each box of image b once, at its top event
    if (ix.ids[e] % 2 != 0) continue;
    const int64_t n = ix.ids[e] / 2;
    const CellRange r = load_cells(ix.cells, n);
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

// A channel's warp puts the events [p, q) into its difference row dw (all of them, or with active_row >= 0 only
// the boxes active at that row, as top events): lane l loads event g + l, then every lane takes the loaded
// events in order and applies those landing in its chunk. A non-finite value counts as 0 and sets *non_finite.
template <typename scalar_t, typename acc_t>
__device__ void fill_apply_events(const IndexView& ix, int32_t p, int32_t q, int32_t active_row,
                                  const scalar_t* __restrict__ values, int64_t C, int64_t c, int32_t W, bool average,
                                  acc_t* dw, int lane, int* non_finite) {
  const Chunk ch = lane_chunk(W, lane);
  for (int32_t g = p; g < q; g += kSweepLanes) {
    int use = 0;
    int32_t x0 = 0, stop = 0;  // the box's columns [x0, stop)
    acc_t amount = 0;
    if (g + lane < q) {
      const int32_t id = ix.ids[g + lane];
      const CellRange r = load_cells(ix.cells, id / 2);
      const bool top = id % 2 == 0;
      use = active_row < 0 || (top && active_at(r, active_row));
      acc_t v = static_cast<acc_t>(values[int64_t(id / 2) * C + c]);
      if (!is_finite_value(v)) {  // added after the sweep: it would stay in the columns past the box
        if (use) atomicOr(non_finite, 1);
        v = 0;
      }
      amount = fill_event_amount(fill_box_value(v, r, average), top);
      x0 = r.x0;
      stop = r.x1 + 1;
    }
    const int m = q - g < kSweepLanes ? q - g : kSweepLanes;
    for (int s = 0; s < m; ++s) {
      const int u = __shfl_sync(0xffffffffu, use, s);
      const int32_t a = __shfl_sync(0xffffffffu, x0, s), z = __shfl_sync(0xffffffffu, stop, s);
      const acc_t am = __shfl_sync(0xffffffffu, amount, s);
      if (!u) continue;
      if (owns(ch, a)) dw[a] += am;
      if (z < W && owns(ch, z)) dw[z] -= am;
    }
  }
}

// grid (channel blocks, bands, images); shared: col and diff, CB rows of `pitch` accumulators each. values:
// [N, C] contiguous. CL: channels_last output (a thread's row elements run along channels: coalesced writes).
template <typename scalar_t, typename acc_t, bool CL>
__global__ void __launch_bounds__(kSweepThreads) box_fill_sweep_kernel(
    const scalar_t* __restrict__ values, int32_t C, int32_t H, int32_t W, int32_t CB, int32_t pitch, int32_t R,
    const int32_t* __restrict__ index, int64_t N, bool average, scalar_t* __restrict__ out, int64_t sb, int64_t sc,
    int64_t sh, int64_t sw) {
  extern __shared__ __align__(sizeof(double)) unsigned char sweep_shared[];
  __shared__ int non_finite;
  acc_t* col = reinterpret_cast<acc_t*>(sweep_shared);
  acc_t* diff = col + CB * pitch;
  const int32_t c0 = int32_t(blockIdx.x) * CB, k = blockIdx.y, b = blockIdx.z;
  const int tid = threadIdx.x, warp = tid / kSweepLanes, lane = tid % kSweepLanes;
  const Band band = band_range(H, R, k);
  const IndexView ix = index_view(index, N);
  const int32_t base = b * (H + 2), first = ix.start[b];
  // Events strictly inside the band: [p, p_end); the image's top events at rows <= band.begin: in [first, p).
  const int32_t p_end = lower_bound_key(ix.keys, first, ix.start[b + 1], base + band.end);
  int32_t p = lower_bound_key(ix.keys, first, p_end, base + band.begin + 1);
  const int32_t c = c0 + warp;
  const bool owner = warp < CB && c < C;
  scalar_t* o = out + b * sb + c0 * sc;
  const WalkStep step = walk_step(CL ? CB : W, kSweepThreads);
  const Walk start = walk_start(tid, step);
  const int32_t outer = CL ? W : CB;
  for (int32_t e = tid; e < 2 * CB * pitch; e += kSweepThreads) col[e] = 0;  // col and diff
  if (tid == 0) non_finite = 0;
  __syncthreads();
  for (int32_t j = band.begin;;) {  // j: an event row (the band's first row: the boxes active there)
    int32_t q = p;
    while (q < p_end && ix.keys[q] == base + j) ++q;
    if (owner) {
      acc_t* cw = col + warp * pitch;
      acc_t* dw = diff + warp * pitch;
      if (j == band.begin) fill_apply_events(ix, first, p, j, values, C, c, W, average, dw, lane, &non_finite);
      else fill_apply_events(ix, p, q, -1, values, C, c, W, average, dw, lane, &non_finite);
      const Chunk ch = lane_chunk(W, lane);
      chunk_apply_diff(dw, cw, ch, warp_exclusive_carry(chunk_total(dw, ch), lane));
    }
    if (j > band.begin) p = q;
    __syncthreads();
    const int32_t next = p < p_end ? ix.keys[p] - base : band.end;
    for (Walk w = start; w.outer < outer; walk_next(w, step)) {  // rows [j, next), each thread its own elements
      const RowElement e = row_element(w, CL);
      if (c0 + e.cc >= C) continue;
      scalar_t* oe = o + e.cc * sc + e.i * sw;
      const scalar_t v = static_cast<scalar_t>(col[e.cc * pitch + e.i]);
#pragma unroll 4
      for (int32_t r = j; r < next; ++r) oe[r * sh] = v;
    }
    __syncthreads();
    if (next == band.end) break;
    j = next;
  }
  if (!non_finite || !owner || lane != 0) return;
  // Non-finite values (NaN - NaN, inf - inf never cancel) go straight into their own box's cells of the band,
  // one thread per channel, boxes in event order.
  for (int32_t e = first; e < p_end; ++e) {
    if (ix.ids[e] % 2 != 0) continue;  // each box once, at its top event
    const int64_t n = ix.ids[e] / 2;
    const CellRange r = load_cells(ix.cells, n);
    const acc_t v = static_cast<acc_t>(values[n * C + c]);
    if (is_finite_value(v) || !touches(r, band)) continue;
    const acc_t value = fill_box_value(v, r, average);
    const BandRows rows = pool_band_rows(r, band);
    scalar_t* oc = o + warp * sc;
    for (int32_t j = rows.top; j < rows.bottom; ++j)
      for (int32_t i = r.x0; i <= r.x1; ++i) {
        scalar_t& cell = oc[j * sh + i * sw];
        cell = static_cast<scalar_t>(static_cast<acc_t>(cell) + value);
      }
  }
}

at::Tensor box_fill_cuda(const at::Tensor& values, const at::Tensor& boxes, const at::Tensor& batch_idx,
                         int64_t in_h, int64_t in_w, int64_t batch, int64_t out_h, int64_t out_w, bool average,
                         bool channels_last, const std::optional<at::Tensor>& index) {
  TORCH_CHECK(values.dim() == 2 && values.size(0) == boxes.size(0),
              "lgd_ops.box_fill: values must be [N, C] with N = boxes.size(0), got ", values.sizes());
  TORCH_CHECK(batch >= 0 && out_h >= 0 && out_w >= 0, "lgd_ops.box_fill: output size must be non-negative, got (",
              batch, ", ", out_h, ", ", out_w, ")");
  TORCH_CHECK(batch <= 65535, "lgd_ops.box_fill: at most 65535 images per call on CUDA, got ", batch);
  check_box_args(boxes, batch_idx, in_h, in_w, values, "values");
  const c10::cuda::CUDAGuard guard(values.device());
  const int64_t C = values.size(1), n = boxes.size(0);
  at::Tensor out = at::empty({batch, C, out_h, out_w}, values.options().memory_format(
      channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  const at::Tensor ix = level_index_or_build(index, boxes, batch_idx, batch, in_h, in_w, out_h, out_w, values);
  const at::Tensor vals = values.contiguous();
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, vals.scalar_type(), "box_fill_cuda", [&] {
    using acc_t = sweep_acc_t<scalar_t>;
    const SweepLaunch l = sweep_launch(C, out_h, out_w, batch, sizeof(acc_t));
    if (l.cb > 0) {
      auto kernel = channels_last ? box_fill_sweep_kernel<scalar_t, acc_t, true>
                                  : box_fill_sweep_kernel<scalar_t, acc_t, false>;
      kernel<<<dim3((C + l.cb - 1) / l.cb, l.bands, batch), kSweepThreads, l.shared, stream>>>(
          vals.data_ptr<scalar_t>(), C, out_h, out_w, l.cb, l.pitch, l.rows, ix.data_ptr<int32_t>(), n, average,
          out.data_ptr<scalar_t>(), out.stride(0), out.stride(1), out.stride(2), out.stride(3));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
    const dim3 grid((out_h * out_w + kThreads - 1) / kThreads, (C + kChannels - 1) / kChannels, batch);
    box_fill_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(vals.data_ptr<scalar_t>(), ix.data_ptr<int32_t>(), n,
                                                            C, out_h, out_w, average, channels_last,
                                                            out.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lgd_ops, CUDA, m) { m.impl("box_fill", &box_fill_cuda); }

}  // namespace lgd_ops
