// CUDA normalized_mse. Forward: one launch for up to kMaxLevels pyramid levels, one block per
// (image, channel) plane accumulating float64 moments about the plane's first element, reduced in
// a fixed order (deterministic) into the five per-plane statistics and the plane's loss; the loss
// is their sum. Backward: one elementwise launch over every level with only useful blocks: each block
// covers one tile of kBackwardTile elements of one (image, channel) plane, found from a per-level block
// prefix (one division per block, none per element), and reads its plane's statistics once; grad_out is
// read on the device (no host sync). No normalized map is ever stored.
// NCHW and channels_last maps are read in place by strides (plane (b, c), element f = j * W + i at
// b * sb + c * sc + f * se: se = 1 for NCHW, C for channels_last; student and teacher may differ), and the
// gradient is written in the student's layout; other views are copied to NCHW first. A channels_last plane is
// read at stride C (neighbouring blocks read the neighbouring channels, so sectors are shared through L2).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "../../common/nmse_checks.h"
#include "../../common/nmse_math.h"

namespace lgd_ops {
namespace {

constexpr int kMaxLevels = 8;
constexpr int kThreads = 256;
constexpr int64_t kBackwardTile = 8 * kThreads;  // elements of one plane per backward block

// Pointers and sizes of a group of levels, passed by value to one launch.
template <typename scalar_t>
struct Levels {
  const scalar_t* s[kMaxLevels];
  const scalar_t* t[kMaxLevels];
  scalar_t* g[kMaxLevels];
  int64_t n[kMaxLevels];            // elements per plane
  int64_t channels[kMaxLevels];
  int64_t ss[kMaxLevels][3], ts[kMaxLevels][3], gs[kMaxLevels][3];  // (sb, sc, se) of student, teacher, grad
  int64_t first[kMaxLevels + 1];    // global index of each level's first plane (+ end)
  int64_t tiles[kMaxLevels];        // backward blocks per plane: ceil(n / kBackwardTile)
  int64_t block_first[kMaxLevels + 1];  // index of each level's first backward block (+ end)
  int count;
};

template <typename scalar_t>
__device__ int level_of(const Levels<scalar_t>& lv, int64_t plane) {
  int l = 0;
  while (l + 1 < lv.count && plane >= lv.first[l + 1]) ++l;
  return l;
}

// Offset of plane `p` (the level's p-th (b, c) plane) in a map with strides st = (sb, sc, se).
__device__ __forceinline__ int64_t plane_offset(const int64_t (&st)[3], int64_t p, int64_t channels) {
  const int64_t b = p / channels;
  return b * st[0] + (p - b * channels) * st[1];
}

template <int kValues>
__device__ void block_sum(double (&v)[kValues]) {
  // Fixed-order tree: warp shuffles, then warp 0 adds the per-warp partials. Result in thread 0.
  __shared__ double partial[kValues][kThreads / 32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int k = 0; k < kValues; ++k)
    for (int offset = 16; offset > 0; offset /= 2) v[k] += __shfl_down_sync(0xffffffff, v[k], offset);
  if (lane == 0)
#pragma unroll
    for (int k = 0; k < kValues; ++k) partial[k][warp] = v[k];
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int k = 0; k < kValues; ++k) {
      v[k] = lane < kThreads / 32 ? partial[k][lane] : 0.0;
      for (int offset = 16; offset > 0; offset /= 2) v[k] += __shfl_down_sync(0xffffffff, v[k], offset);
    }
  }
}

template <typename scalar_t, typename stat_t>
__global__ void nmse_forward_kernel(Levels<scalar_t> lv, int64_t planes_total, double eps,
                                    stat_t* __restrict__ stats, double* __restrict__ plane_loss) {
  const int64_t plane = lv.first[0] + blockIdx.x;
  const int l = level_of(lv, plane);
  const int64_t n = lv.n[l], p = plane - lv.first[l], se = lv.ss[l][2], te = lv.ts[l][2];
  const scalar_t* s = lv.s[l] + plane_offset(lv.ss[l], p, lv.channels[l]);
  const scalar_t* t = lv.t[l] + plane_offset(lv.ts[l], p, lv.channels[l]);
  const double s0 = static_cast<double>(s[0]), t0 = static_cast<double>(t[0]);
  double m[5] = {0, 0, 0, 0, 0};  // sums of x, y, x^2, y^2, x*y with x = s - s0, y = t - t0
  for (int64_t i = threadIdx.x; i < n; i += kThreads) {
    const double x = static_cast<double>(s[i * se]) - s0, y = static_cast<double>(t[i * te]) - t0;
    m[0] += x;
    m[1] += y;
    m[2] += x * x;
    m[3] += y * y;
    m[4] += x * y;
  }
  block_sum(m);
  if (threadIdx.x == 0) {
    const double dn = double(n);
    const PlaneTerms r = nmse_plane_terms(dn, m[2] - m[0] * m[0] / dn, m[3] - m[1] * m[1] / dn,
                                          m[4] - m[0] * m[1] / dn, eps);
    stats[plane] = stat_t(s0 + m[0] / dn);
    stats[planes_total + plane] = stat_t(r.s_rstd);
    stats[2 * planes_total + plane] = stat_t(t0 + m[1] / dn);
    stats[3 * planes_total + plane] = stat_t(r.t_rstd);
    stats[4 * planes_total + plane] = stat_t(r.k);
    plane_loss[plane] = r.loss;
  }
}

template <typename scalar_t, typename stat_t>
__global__ void nmse_backward_kernel(Levels<scalar_t> lv, int64_t planes_total, const stat_t* __restrict__ stats,
                                     const scalar_t* __restrict__ grad_out, double inv_total) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t blk = blockIdx.x;
  int l = 0;
  while (l + 1 < lv.count && blk >= lv.block_first[l + 1]) ++l;
  const int64_t n = lv.n[l], local = blk - lv.block_first[l];
  const int64_t p = local / lv.tiles[l];  // the block's plane within the level (one division per block)
  const int64_t begin = (local - p * lv.tiles[l]) * kBackwardTile;
  const int64_t end = begin + kBackwardTile < n ? begin + kBackwardTile : n;
  const int64_t q = lv.first[l] + p;
  const acc_t scale = acc_t(static_cast<double>(grad_out[0]) * 2.0 * inv_total);
  const acc_t ms = acc_t(stats[q]), rs = acc_t(stats[planes_total + q]), mt = acc_t(stats[2 * planes_total + q]),
              rt = acc_t(stats[3 * planes_total + q]), k = acc_t(stats[4 * planes_total + q]);
  const scalar_t* s = lv.s[l] + plane_offset(lv.ss[l], p, lv.channels[l]);
  const scalar_t* t = lv.t[l] + plane_offset(lv.ts[l], p, lv.channels[l]);
  scalar_t* g = lv.g[l] + plane_offset(lv.gs[l], p, lv.channels[l]);
  const int64_t se = lv.ss[l][2], te = lv.ts[l][2], ge = lv.gs[l][2];
  for (int64_t i = begin + threadIdx.x; i < end; i += kThreads)
    g[i * ge] = static_cast<scalar_t>(
        nmse_grad<acc_t>(static_cast<acc_t>(s[i * se]), static_cast<acc_t>(t[i * te]), ms, rs, mt, rt, k, scale));
}

// (sb, sc, se) of an NCHW or channels_last map: element f = j * W + i of plane (b, c) at b*sb + c*sc + f*se.
void map_strides(const at::Tensor& x, int64_t (&st)[3]) {
  st[0] = x.stride(0);
  st[1] = x.stride(1);
  st[2] = x.is_contiguous() ? 1 : (x.size(3) > 1 ? x.stride(3) : x.stride(2));
}

// The level groups of at most kMaxLevels (the maps kept alive by the caller).
template <typename scalar_t>
std::vector<Levels<scalar_t>> group_levels(const std::vector<at::Tensor>& s, const std::vector<at::Tensor>& t,
                                           std::vector<at::Tensor>* g) {
  std::vector<Levels<scalar_t>> groups;
  int64_t first = 0;
  for (size_t l = 0; l < s.size(); ++l) {
    if (l % kMaxLevels == 0) {
      groups.emplace_back();
      groups.back().count = 0;
      groups.back().first[0] = first;
      groups.back().block_first[0] = 0;
    }
    Levels<scalar_t>& lv = groups.back();
    const int k = lv.count++;
    lv.s[k] = s[l].data_ptr<scalar_t>();
    lv.t[k] = t[l].data_ptr<scalar_t>();
    lv.g[k] = g ? (*g)[l].data_ptr<scalar_t>() : nullptr;
    lv.n[k] = s[l].size(2) * s[l].size(3);
    lv.channels[k] = s[l].size(1);
    map_strides(s[l], lv.ss[k]);
    map_strides(t[l], lv.ts[k]);
    map_strides(g ? (*g)[l] : s[l], lv.gs[k]);
    lv.tiles[k] = (lv.n[k] + kBackwardTile - 1) / kBackwardTile;
    lv.block_first[k + 1] = lv.block_first[k] + s[l].size(0) * s[l].size(1) * lv.tiles[k];
    first += s[l].size(0) * s[l].size(1);
    lv.first[k + 1] = first;
  }
  return groups;
}

// The maps as the kernels read them: NCHW and channels_last ones as they are, other views copied to NCHW.
std::vector<at::Tensor> planar(at::TensorList xs) {
  std::vector<at::Tensor> out;
  for (const auto& x : xs)
    out.push_back(x.is_contiguous() || x.is_contiguous(at::MemoryFormat::ChannelsLast) ? x : x.contiguous());
  return out;
}

std::tuple<at::Tensor, at::Tensor> normalized_mse_cuda(at::TensorList student, at::TensorList teacher, double eps) {
  check_levels(student, teacher);
  const c10::cuda::CUDAGuard guard(student[0].device());
  int64_t total = 0;
  const int64_t planes = count_planes(student, &total);
  const bool fp64 = student[0].scalar_type() == at::kDouble;
  at::Tensor stats = at::empty({5, planes}, student[0].options().dtype(fp64 ? at::kDouble : at::kFloat));
  at::Tensor plane_loss = at::zeros({planes}, student[0].options().dtype(at::kDouble));
  const auto s = planar(student), t = planar(teacher);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s[0].scalar_type(), "normalized_mse_cuda", [&] {
    using stat_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    for (const auto& lv : group_levels<scalar_t>(s, t, nullptr)) {
      const int64_t blocks = lv.first[lv.count] - lv.first[0];  // > 0: check_levels rejects empty maps
      nmse_forward_kernel<scalar_t, stat_t><<<blocks, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
          lv, planes, eps, stats.data_ptr<stat_t>(), plane_loss.data_ptr<double>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  at::Tensor loss = plane_loss.sum() / double(total);
  return {loss.to(student[0].scalar_type()), stats};
}

std::vector<at::Tensor> normalized_mse_backward_cuda(const at::Tensor& grad, at::TensorList student,
                                                     at::TensorList teacher, const at::Tensor& stats) {
  check_levels(student, teacher);
  const c10::cuda::CUDAGuard guard(student[0].device());
  int64_t total = 0;
  const int64_t planes = count_planes(student, &total);
  TORCH_CHECK(stats.dim() == 2 && stats.size(0) == 5 && stats.size(1) == planes,
              "lgd_ops.normalized_mse_backward: stats must be [5, ", planes, "], got ", stats.sizes());
  TORCH_CHECK(grad.numel() == 1, "lgd_ops.normalized_mse_backward: grad must be a scalar");
  const auto s = planar(student), t = planar(teacher);
  std::vector<at::Tensor> g;  // in the student's layout
  for (const auto& x : s)
    g.push_back(at::empty_like(x, x.is_contiguous() ? at::MemoryFormat::Contiguous : at::MemoryFormat::ChannelsLast));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s[0].scalar_type(), "normalized_mse_backward_cuda", [&] {
    using stat_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const at::Tensor st = stats.to(c10::CppTypeToScalarType<stat_t>::value).contiguous();
    const at::Tensor go = grad.to(s[0].scalar_type()).contiguous();
    for (const auto& lv : group_levels<scalar_t>(s, t, &g)) {
      // every block does work: one tile of one plane
      const int64_t blocks = lv.block_first[lv.count];
      TORCH_CHECK(blocks < (int64_t(1) << 31), "lgd_ops.normalized_mse_backward: too many elements for one launch");
      nmse_backward_kernel<scalar_t, stat_t><<<blocks, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
          lv, planes, st.data_ptr<stat_t>(), go.data_ptr<scalar_t>(), 1.0 / double(total));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return g;
}

}  // namespace

TORCH_LIBRARY_IMPL(lgd_ops, CUDA, m) {
  m.impl("normalized_mse", &normalized_mse_cuda);
  m.impl("normalized_mse_backward", &normalized_mse_backward_cuda);
}

}  // namespace lgd_ops
