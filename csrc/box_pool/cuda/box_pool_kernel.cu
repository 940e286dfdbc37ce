// CUDA box_pool. The sweep (box_pool_sweep_kernel): one block per (image, up to 8 channels) walks the map top
// to bottom keeping one row of column sums per channel in shared memory (an integral image built a row at a
// time, no scratch map); on a row where boxes start or end, each channel's warp scans the row and reads each
// box's part (csrc/common/box_sweep_math.h: arithmetic, order and error bound). Cost O(B*C*H*W + N*C)
// whatever the boxes' sizes; accumulation in double for float/double maps, float for half maps; fixed-order
// adds, no atomics: bit-identical run to run. A box whose sum is not finite is summed again over its own
// cells, so a NaN or inf stays with the boxes covering it.
// The direct kernel (box_pool_kernel: one warp per (box, channel) sums the box's rectangle, lanes along the
// row, fixed-order shuffle reduction) stays for maps under kSweepMinCells cells and rows too wide for a
// sweep block's shared memory (cuda_boxes.cuh); that threshold is a guess, untimed on a GPU.
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

// grid (channel blocks, images); shared: col [CB][W] and pre [CB][W + 1] accumulators. CL: channels_last map
// (the row adds run along channels, so reads are coalesced in either layout).
template <typename scalar_t, typename acc_t, bool CL>
__global__ void __launch_bounds__(kSweepThreads) box_pool_sweep_kernel(
    const scalar_t* __restrict__ feat, int64_t sb, int64_t sc, int64_t sh, int64_t sw, int64_t C, int64_t H,
    int64_t W, int CB, const int64_t* __restrict__ ev_key, const int64_t* __restrict__ ev_id,
    const int64_t* __restrict__ ev_start, const int32_t* __restrict__ cells, bool average,
    acc_t* __restrict__ partial, scalar_t* __restrict__ out) {
  extern __shared__ __align__(sizeof(double)) unsigned char sweep_shared[];
  acc_t* col = reinterpret_cast<acc_t*>(sweep_shared);
  acc_t* pre = col + CB * W;
  const int64_t b = blockIdx.y, c0 = int64_t(blockIdx.x) * CB;
  const int tid = threadIdx.x, warp = tid / kSweepLanes, lane = tid % kSweepLanes;
  const int64_t span = CB * W, base = b * (H + 2), pend = ev_start[b + 1];
  const scalar_t* x = feat + b * sb + c0 * sc;
  for (int64_t e = tid; e < span; e += kSweepThreads) col[e] = 0;
  __syncthreads();
  for (int64_t j = 0, p = ev_start[b]; p < pend; ++j) {
    if (ev_key[p] == base + j) {  // an event row (the same branch in every thread)
      int64_t q = p + 1;
      while (q < pend && ev_key[q] == base + j) ++q;
      const int64_t c = c0 + warp;
      if (warp < CB && c < C) {
        acc_t* cw = col + warp * W;
        acc_t* pw = pre + warp * (W + 1);
        const Chunk ch = lane_chunk(W, lane);
        chunk_prefix(cw, pw, ch, warp_exclusive_carry(chunk_total(cw, ch), lane));
        __syncwarp();
        for (int64_t e = p + lane; e < q; e += kSweepLanes) {
          const int64_t n = ev_id[e] / 2;
          const bool top = ev_id[e] % 2 == 0;
          const CellRange r = load_cells(cells, n);
          acc_t& s = partial[n * C + c];
          const acc_t sum = pool_event_update(top ? acc_t(0) : s, range_from_prefix(pw, r.x0, r.x1), top);
          if (top) {
            s = sum;
            continue;
          }
          const acc_t total = is_finite_value(sum) ? sum : direct_box_sum<acc_t>(x + warp * sc, sh, sw, r);
          out[n * C + c] = static_cast<scalar_t>(average ? total / acc_t(r.count()) : total);
        }
      }
      __syncthreads();
      p = q;
      if (p == pend) break;
    }
    if (j == H) break;
    const scalar_t* xr = x + j * sh;
    for (int64_t e = tid; e < span; e += kSweepThreads) {
      const int64_t cc = CL ? e % CB : e / W, i = CL ? e / CB : e % W;
      if (c0 + cc < C) col[cc * W + i] += static_cast<acc_t>(xr[cc * sc + i * sw]);
    }
    __syncthreads();
  }
}

at::Tensor box_pool_cuda(const at::Tensor& features, const at::Tensor& boxes, const at::Tensor& batch_idx,
                         int64_t in_h, int64_t in_w, bool average) {
  TORCH_CHECK(features.dim() == 4, "lgd_ops.box_pool: features must be [B, C, H, W], got ", features.sizes());
  check_box_args(boxes, batch_idx, in_h, in_w, features, "features");
  const c10::cuda::CUDAGuard guard(features.device());
  const int64_t B = features.size(0), C = features.size(1), H = features.size(2), W = features.size(3);
  const int64_t n = boxes.size(0);
  // With no image (B == 0) no box covers anything, and the sweep's grid would have no rows of blocks.
  if (B == 0 || n == 0 || C == 0 || H == 0 || W == 0) return at::zeros({n, C}, features.options());
  at::Tensor out = at::empty({n, C}, features.options());
  const auto plan = cached_box_plan(boxes, batch_idx, B, in_h, in_w, H, W);
  // NCHW and channels_last maps are read in place (strides); other views are made contiguous first.
  const at::Tensor feat = features.is_contiguous() || features.is_contiguous(at::MemoryFormat::ChannelsLast)
                              ? features : features.contiguous();
  const at::Tensor bi = batch_idx.contiguous();
  const bool channels_last = !feat.is_contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, feat.scalar_type(), "box_pool_cuda", [&] {
    using acc_t = sweep_acc_t<scalar_t>;
    const int cb = B <= 65535 ? sweep_channels(C, H, W, sizeof(acc_t)) : 0;
    if (cb > 0) {
      const auto ev = cached_event_plan(boxes, batch_idx, B, in_h, in_w, H, W, *plan);
      at::Tensor partial = at::empty({n, C}, features.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
      out.zero_();  // boxes covering nothing
      const dim3 grid((C + cb - 1) / cb, B);
      const size_t shared = size_t(cb) * size_t(2 * W + 1) * sizeof(acc_t);
      auto kernel = channels_last ? box_pool_sweep_kernel<scalar_t, acc_t, true>
                                  : box_pool_sweep_kernel<scalar_t, acc_t, false>;
      kernel<<<grid, kSweepThreads, shared, at::cuda::getCurrentCUDAStream()>>>(
          feat.data_ptr<scalar_t>(), feat.stride(0), feat.stride(1), feat.stride(2), feat.stride(3), C, H, W, cb,
          ev->key.data_ptr<int64_t>(), ev->id.data_ptr<int64_t>(), ev->start.data_ptr<int64_t>(),
          plan->cells.data_ptr<int32_t>(), average, partial.data_ptr<acc_t>(), out.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
    const dim3 grid(n, (C + kWarpsPerBlock - 1) / kWarpsPerBlock);
    box_pool_kernel<scalar_t><<<grid, 32 * kWarpsPerBlock, 0, at::cuda::getCurrentCUDAStream()>>>(
        feat.data_ptr<scalar_t>(), plan->cells.data_ptr<int32_t>(), bi.data_ptr<int64_t>(), n, C, feat.stride(0),
        feat.stride(1), feat.stride(2), feat.stride(3), average, out.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lgd_ops, CUDA, m) { m.impl("box_pool", &box_pool_cuda); }

}  // namespace lgd_ops
