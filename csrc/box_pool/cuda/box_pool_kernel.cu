// CUDA box_pool. The banded sweep: box_pool_sweep_kernel, one block per (up to 8 channels, band of rows, image),
// sweeps its band's rows keeping one row of column sums per channel in shared memory (an integral image of the
// band built a row at a time); on a row where boxes start or end, and at the band's last row for every box
// still open there, each channel's warp scans the row and writes each box's prefix P(row) to a
// [bands, N, 2, C] scratch. box_pool_reduce_kernel then adds each box's band parts P(bottom) - P(top) in band
// order (csrc/common/box_sweep_math.h: schedule, arithmetic, order and error bound). Cost O(B*C*H*W) map reads
// plus the scratch of the bands each box touches; accumulation in double for float/double maps, float for half
// maps; fixed-order adds, no atomics: bit-identical run to run. A band part that is not finite is summed again
// over the box's cells in that band, so a NaN or inf stays with the boxes covering it.
// Between event rows a thread adds its own row elements' column sums over the rows in a register loop, with no
// block barrier; barriers come only around an event row's scan.
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
  const CellRange r = load_cells(cells, box);
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

// grid (channel blocks, bands, images); shared: col and pre, CB rows of `pitch` accumulators each. CL:
// channels_last map (a thread's row elements run along channels, so loads are coalesced in either layout).
template <typename scalar_t, typename acc_t, bool CL>
__global__ void __launch_bounds__(kSweepThreads) box_pool_sweep_kernel(
    const scalar_t* __restrict__ feat, int64_t sb, int64_t sc, int64_t sh, int64_t sw, int32_t C, int32_t H,
    int32_t W, int32_t CB, int32_t pitch, int32_t R, const int32_t* __restrict__ index, int64_t N,
    acc_t* __restrict__ scratch) {
  extern __shared__ __align__(sizeof(double)) unsigned char sweep_shared[];
  acc_t* col = reinterpret_cast<acc_t*>(sweep_shared);
  acc_t* pre = col + CB * pitch;
  const int32_t c0 = int32_t(blockIdx.x) * CB, k = blockIdx.y, b = blockIdx.z;
  const int tid = threadIdx.x, warp = tid / kSweepLanes, lane = tid % kSweepLanes;
  const Band band = band_range(H, R, k);
  const IndexView ix = index_view(index, N);
  const int32_t base = b * (H + 2), first = ix.start[b];
  // Events strictly inside the band: [p, p_end); the image's events before the band's end: [first, p_end).
  const int32_t p_end = lower_bound_key(ix.keys, first, ix.start[b + 1], base + band.end);
  int32_t p = lower_bound_key(ix.keys, first, p_end, base + band.begin + 1);
  const scalar_t* x = feat + b * sb + c0 * sc;
  const WalkStep step = walk_step(CL ? CB : W, kSweepThreads);
  const Walk start = walk_start(tid, step);
  const int32_t outer = CL ? W : CB;
  for (Walk w = start; w.outer < outer; walk_next(w, step)) {
    const RowElement e = row_element(w, CL);
    col[e.cc * pitch + e.i] = 0;
  }
  const int32_t c = c0 + warp;
  for (int32_t j = band.begin;;) {
    const int32_t next = p < p_end ? ix.keys[p] - base : band.end;
    for (Walk w = start; w.outer < outer; walk_next(w, step)) {  // rows [j, next), each thread its own elements
      const RowElement e = row_element(w, CL);
      if (c0 + e.cc >= C) continue;
      const scalar_t* xe = x + e.cc * sc + e.i * sw;
      acc_t acc = col[e.cc * pitch + e.i];
#pragma unroll 4
      for (int32_t r = j; r < next; ++r) acc += static_cast<acc_t>(xe[r * sh]);
      col[e.cc * pitch + e.i] = acc;
    }
    j = next;
    int32_t q = p;
    while (q < p_end && ix.keys[q] == base + j) ++q;
    __syncthreads();
    if (warp < CB && c < C) {  // the channel's warp: P(j) of its row, then the events of row j
      acc_t* cw = col + warp * pitch;
      acc_t* pw = pre + warp * pitch;
      const Chunk ch = lane_chunk(W, lane);
      chunk_prefix(cw, pw, ch, warp_exclusive_carry(chunk_total(cw, ch), lane));
      __syncwarp();
      if (j < band.end) {
        for (int32_t e = p + lane; e < q; e += kSweepLanes) {
          const int32_t id = ix.ids[e];
          const CellRange r = load_cells(ix.cells, id / 2);
          scratch[band_slot(k, id / 2, id % 2, N, C, c)] = range_from_prefix(pw, r.x0, r.x1);
        }
      } else {  // the band's end: P(end) for every box open at its last row
        for (int32_t e = first + lane; e < p_end; e += kSweepLanes) {
          const int32_t id = ix.ids[e];
          if (id % 2 != 0) continue;
          const CellRange r = load_cells(ix.cells, id / 2);
          if (active_at(r, band.end - 1)) scratch[band_slot(k, id / 2, 1, N, C, c)] = range_from_prefix(pw, r.x0, r.x1);
        }
      }
    }
    if (j == band.end) break;
    __syncthreads();
    p = q;
  }
}

// grid (boxes, channel blocks of 256): out[n, c] = the sum of box n's band parts (pool_box_total).
template <typename scalar_t, typename acc_t>
__global__ void box_pool_reduce_kernel(const scalar_t* __restrict__ feat, int64_t sb, int64_t sc, int64_t sh,
                                       int64_t sw, int64_t C, int32_t H, int32_t R, const int32_t* __restrict__ index,
                                       const int64_t* __restrict__ batch_idx, int64_t N, int64_t B,
                                       const acc_t* __restrict__ scratch, bool average, scalar_t* __restrict__ out) {
  const int64_t n = blockIdx.x, c = int64_t(blockIdx.y) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  const CellRange r = load_cells(index, n);
  const int64_t b = batch_idx[n];
  acc_t total = 0;
  if (!r.empty() && b >= 0 && b < B)
    total = pool_box_total<acc_t>(r, H, R, scratch, N, C, n, c, feat + b * sb + c * sc, sh, sw);
  out[n * C + c] = static_cast<scalar_t>(average && !r.empty() ? total / acc_t(r.count()) : total);
}

at::Tensor box_pool_cuda(const at::Tensor& features, const at::Tensor& boxes, const at::Tensor& batch_idx,
                         int64_t in_h, int64_t in_w, bool average, const std::optional<at::Tensor>& index) {
  TORCH_CHECK(features.dim() == 4, "lgd_ops.box_pool: features must be [B, C, H, W], got ", features.sizes());
  check_box_args(boxes, batch_idx, in_h, in_w, features, "features");
  const c10::cuda::CUDAGuard guard(features.device());
  const int64_t B = features.size(0), C = features.size(1), H = features.size(2), W = features.size(3);
  const int64_t n = boxes.size(0);
  // With no image (B == 0) no box covers anything, and the sweep's grid would have no images.
  if (B == 0 || n == 0 || C == 0 || H == 0 || W == 0) return at::zeros({n, C}, features.options());
  const at::Tensor ix = level_index_or_build(index, boxes, batch_idx, B, in_h, in_w, H, W, features);
  at::Tensor out = at::empty({n, C}, features.options());
  // NCHW and channels_last maps are read in place (strides); other views are made contiguous first.
  const at::Tensor feat = features.is_contiguous() || features.is_contiguous(at::MemoryFormat::ChannelsLast)
                              ? features : features.contiguous();
  const at::Tensor bi = batch_idx.contiguous();
  const bool channels_last = !feat.is_contiguous();
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, feat.scalar_type(), "box_pool_cuda", [&] {
    using acc_t = sweep_acc_t<scalar_t>;
    const SweepLaunch l = B <= 65535 ? sweep_launch(C, H, W, B, sizeof(acc_t)) : SweepLaunch{0, 0, 0, 0, 0};
    if (l.cb > 0) {
      at::Tensor scratch =
          at::empty({l.bands, n, 2, C}, features.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
      auto kernel = channels_last ? box_pool_sweep_kernel<scalar_t, acc_t, true>
                                  : box_pool_sweep_kernel<scalar_t, acc_t, false>;
      kernel<<<dim3((C + l.cb - 1) / l.cb, l.bands, B), kSweepThreads, l.shared, stream>>>(
          feat.data_ptr<scalar_t>(), feat.stride(0), feat.stride(1), feat.stride(2), feat.stride(3), C, H, W, l.cb,
          l.pitch, l.rows, ix.data_ptr<int32_t>(), n, scratch.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      const int threads = C < 256 ? int(C) : 256;
      box_pool_reduce_kernel<scalar_t, acc_t><<<dim3(n, (C + threads - 1) / threads), threads, 0, stream>>>(
          feat.data_ptr<scalar_t>(), feat.stride(0), feat.stride(1), feat.stride(2), feat.stride(3), C, H, l.rows,
          ix.data_ptr<int32_t>(), bi.data_ptr<int64_t>(), n, B, scratch.data_ptr<acc_t>(), average,
          out.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
    const dim3 grid(n, (C + kWarpsPerBlock - 1) / kWarpsPerBlock);
    box_pool_kernel<scalar_t><<<grid, 32 * kWarpsPerBlock, 0, stream>>>(
        feat.data_ptr<scalar_t>(), ix.data_ptr<int32_t>(), bi.data_ptr<int64_t>(), n, C, feat.stride(0),
        feat.stride(1), feat.stride(2), feat.stride(3), average, out.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lgd_ops, CUDA, m) { m.impl("box_pool", &box_pool_cuda); }

}  // namespace lgd_ops
