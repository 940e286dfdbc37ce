// CUDA normalized_mse, in two schedules picked per level by the student's layout; no normalized map is ever
// stored, nothing is added atomically, and every sum runs in a fixed order, so results are identical run to run.
// Moments are float64 sums of deviations from the plane's first element (nmse_math.h).
// NCHW (and any other view, copied to NCHW first): a plane is contiguous.
//   Forward: one block per (image, channel) plane; the threads stride over the plane and their sums meet in a
//   fixed-order block reduction. Backward: one block per tile of kBackwardTile elements of one plane.
// channels_last: element (b, c, position p) at b * sb + c * sc + p * C, so a plane is read at stride C; instead a
// block owns a tile of kNmseTile positions x kNmseLanes consecutive channels of one image, its lanes on the
// channels and its kNmseRows warps on the positions, so each warp reads one run of consecutive channels per
// position (whole 32-byte sectors) and the grid has B x ceil(C / 32) x tiles blocks.
//   Forward: each thread sums its channel over the tile's positions of its row; the rows' moments are merged by
//   a tree in shared memory (Chan's update) into one partial per (tile, plane) in a workspace; a second launch
//   merges a plane's tiles, row r taking tiles r, r + kNmseRows, ... in order, then the same row tree, and
//   writes the statistics. Backward: the same tiles, each thread holding its channel's statistics.
// The teacher is read by its own strides in either schedule (coalesced when it has the student's layout), and
// the gradient is written in the student's layout. grad_out is read on the device (no host sync).
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
constexpr int kThreads = 256;                    // every kernel's block: 256 threads (32 x 8 on the tiles)
static_assert(kNmseLanes * kNmseRows == kThreads, "a channels_last block is kThreads threads");
constexpr int64_t kBackwardTile = 8 * kThreads;  // elements of one NCHW plane per backward block

// Pointers and sizes of a group of levels of one layout, passed by value to one launch; a launch's blocks are
// numbered level after level (block_first).
template <typename scalar_t>
struct Levels {
  const scalar_t* s[kMaxLevels];
  const scalar_t* t[kMaxLevels];
  scalar_t* g[kMaxLevels];
  int64_t n[kMaxLevels];  // positions (elements) per plane
  int64_t channels[kMaxLevels];
  int64_t images[kMaxLevels], planes[kMaxLevels];  // B and B * C
  int64_t ss[kMaxLevels][3], ts[kMaxLevels][3], gs[kMaxLevels][3];  // (sb, sc, se) of student, teacher, grad
  int64_t plane_first[kMaxLevels];  // global index of the level's first plane (a column of stats)
  int64_t tiles[kMaxLevels];        // tiles per plane: of kBackwardTile (NCHW) or kNmseTile (channels_last)
  int64_t runs[kMaxLevels];         // channels_last: runs of kNmseLanes channels, ceil(C / kNmseLanes)
  int64_t part_first[kMaxLevels];   // channels_last: the level's first (tile, plane) partial in the workspace
  int64_t block_first[kMaxLevels + 1];
  int count;
};

// The level of block `blk` and its index within the level.
template <typename scalar_t>
__device__ __forceinline__ int block_level(const Levels<scalar_t>& lv, int64_t blk, int64_t* local) {
  int l = 0;
  while (l + 1 < lv.count && blk >= lv.block_first[l + 1]) ++l;
  *local = blk - lv.block_first[l];
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

template <typename stat_t>
__device__ void store_stats(stat_t* stats, double* plane_loss, int64_t planes_total, int64_t q, const PlaneStats& r) {
  stats[q] = stat_t(r.s_mean);
  stats[planes_total + q] = stat_t(r.s_rstd);
  stats[2 * planes_total + q] = stat_t(r.t_mean);
  stats[3 * planes_total + q] = stat_t(r.t_rstd);
  stats[4 * planes_total + q] = stat_t(r.k);
  plane_loss[q] = r.loss;
}

template <typename scalar_t, typename stat_t>
__global__ void __launch_bounds__(kThreads) nmse_forward_kernel(Levels<scalar_t> lv, int64_t planes_total,
                                                                 double eps, stat_t* __restrict__ stats,
                                                                 double* __restrict__ plane_loss) {
  int64_t p;
  const int l = block_level(lv, blockIdx.x, &p);
  const int64_t n = lv.n[l], se = lv.ss[l][2], te = lv.ts[l][2];
  const scalar_t* s = lv.s[l] + plane_offset(lv.ss[l], p, lv.channels[l]);
  const scalar_t* t = lv.t[l] + plane_offset(lv.ts[l], p, lv.channels[l]);
  const double s0 = static_cast<double>(s[0]), t0 = static_cast<double>(t[0]);
  NmseSums m{0, 0, 0, 0, 0};
  for (int64_t i = threadIdx.x; i < n; i += kThreads)
    nmse_add(m, static_cast<double>(s[i * se]) - s0, static_cast<double>(t[i * te]) - t0);
  double v[5] = {m.x, m.y, m.xx, m.yy, m.xy};
  block_sum(v);
  if (threadIdx.x == 0)
    store_stats(stats, plane_loss, planes_total, lv.plane_first[l] + p,
                nmse_plane_stats(s0, t0, nmse_moments(double(n), {v[0], v[1], v[2], v[3], v[4]}), eps));
}

template <typename scalar_t, typename stat_t>
__global__ void __launch_bounds__(kThreads) nmse_backward_kernel(Levels<scalar_t> lv, int64_t planes_total,
                                                                  const stat_t* __restrict__ stats,
                                                                  const scalar_t* __restrict__ grad_out,
                                                                  double inv_total) {
  using acc_t = at::opmath_type<scalar_t>;
  int64_t local;
  const int l = block_level(lv, blockIdx.x, &local);
  const int64_t n = lv.n[l];
  const int64_t p = local / lv.tiles[l];  // the block's plane within the level (one division per block)
  const int64_t begin = (local - p * lv.tiles[l]) * kBackwardTile;
  const int64_t end = begin + kBackwardTile < n ? begin + kBackwardTile : n;
  const int64_t q = lv.plane_first[l] + p;
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

// ---- channels_last tiles: threadIdx.x = lane (channel c0 + lane), threadIdx.y = row ----

// Merges the block's kNmseRows moments of each lane in shared memory (structure of arrays, so a warp's 32 lanes
// touch 32 consecutive doubles): row r takes row r + h for h = kNmseRows / 2, ..., 1. The result is row 0's.
__device__ NmseMoments row_tree(NmseMoments m) {
  __shared__ double sh[6][kNmseRows][kNmseLanes];
  const int lane = threadIdx.x, row = threadIdx.y;
  for (int h = kNmseRows / 2; h > 0; h /= 2) {
    if (row >= h && row < 2 * h) {
      sh[0][row][lane] = m.n, sh[1][row][lane] = m.mx, sh[2][row][lane] = m.my;
      sh[3][row][lane] = m.m2x, sh[4][row][lane] = m.m2y, sh[5][row][lane] = m.cxy;
    }
    __syncthreads();  // rows [h, 2h) are read once, and never written again: one barrier per step
    if (row < h) {
      const int o = row + h;
      m = nmse_merge(m, {sh[0][o][lane], sh[1][o][lane], sh[2][o][lane], sh[3][o][lane], sh[4][o][lane],
                         sh[5][o][lane]});
    }
  }
  return m;
}

// What a channels_last tile block's thread reads (the prologue of the tile kernels): its level l, the tile's place,
// its channel c of C, the student and teacher planes of (image, c) with their element strides, and the tile's
// rows [first, end) of this thread's row threadIdx.y (stepping kNmseRows). The planes are dereferenced only
// when c < C.
template <typename scalar_t>
struct TileThread {
  int l;
  NmseTilePlace tp;
  int64_t C, c;
  const scalar_t* s;
  const scalar_t* t;
  int64_t se, te, first, end;
};

template <typename scalar_t>
__device__ __forceinline__ TileThread<scalar_t> tile_thread(const Levels<scalar_t>& lv) {
  int64_t local;
  TileThread<scalar_t> tt;
  tt.l = block_level(lv, blockIdx.x, &local);
  const int l = tt.l;
  tt.C = lv.channels[l];
  tt.tp = nmse_tile_place(local, lv.tiles[l], lv.runs[l]);
  tt.c = tt.tp.c0 + threadIdx.x;
  tt.s = lv.s[l] + tt.tp.b * lv.ss[l][0] + tt.c * lv.ss[l][1];
  tt.t = lv.t[l] + tt.tp.b * lv.ts[l][0] + tt.c * lv.ts[l][1];
  tt.se = lv.ss[l][2];
  tt.te = lv.ts[l][2];
  tt.first = tt.tp.tile * kNmseTile + threadIdx.y;
  tt.end = nmse_tile_end(lv.n[l], tt.tp.tile);
  return tt;
}

// Forward, first pass: the moments of one tile of kNmseLanes planes -> part[k * parts + part_first +
// nmse_part_index(...)], k = mx, my, m2x, m2y, cxy (a tile's count follows from its index).
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) nmse_tile_moments_kernel(Levels<scalar_t> lv, int64_t parts,
                                                                      double* __restrict__ part) {
  const TileThread<scalar_t> tt = tile_thread(lv);
  const int l = tt.l;
  const int64_t C = tt.C, c = tt.c;
  NmseSums m{0, 0, 0, 0, 0};
  if (c < C) {
    const double s0 = static_cast<double>(tt.s[0]), t0 = static_cast<double>(tt.t[0]);
    // unrolled so that a thread has several loads in flight (a bfloat16 load is only 2 bytes)
#pragma unroll 4
    for (int64_t i = tt.first; i < tt.end; i += kNmseRows)
      nmse_add(m, static_cast<double>(tt.s[i * tt.se]) - s0, static_cast<double>(tt.t[i * tt.te]) - t0);
  }
  const double count = c < C ? double(nmse_row_count(lv.n[l], tt.tp.tile, threadIdx.y)) : 0.0;
  const NmseMoments r = row_tree(nmse_moments(count, m));
  if (threadIdx.y == 0 && c < C) {
    const int64_t o = lv.part_first[l] + nmse_part_index(tt.tp.tile, lv.planes[l], tt.tp.b, C, c);
    part[o] = r.mx, part[parts + o] = r.my, part[2 * parts + o] = r.m2x, part[3 * parts + o] = r.m2y;
    part[4 * parts + o] = r.cxy;
  }
}

// Forward, second pass: kNmseLanes planes per block; row r merges the planes' tiles r, r + kNmseRows, ... in
// order, the row tree merges the rows, and row 0 writes the statistics and the plane's loss.
template <typename scalar_t, typename stat_t>
__global__ void __launch_bounds__(kThreads) nmse_tile_merge_kernel(Levels<scalar_t> lv, int64_t parts,
                                                                    const double* __restrict__ part,
                                                                    int64_t planes_total, double eps,
                                                                    stat_t* __restrict__ stats,
                                                                    double* __restrict__ plane_loss) {
  int64_t local;
  const int l = block_level(lv, blockIdx.x, &local);
  const int64_t n = lv.n[l], C = lv.channels[l], b = local / lv.runs[l];  // a block per (image, channel run)
  const int64_t c = (local - b * lv.runs[l]) * kNmseLanes + threadIdx.x;
  NmseMoments m{0, 0, 0, 0, 0, 0};
  if (c < C)
    for (int64_t tile = threadIdx.y; tile < lv.tiles[l]; tile += kNmseRows) {
      const int64_t o = lv.part_first[l] + nmse_part_index(tile, lv.planes[l], b, C, c);
      m = nmse_merge(m, {double(nmse_tile_end(n, tile) - tile * kNmseTile), part[o], part[parts + o],
                         part[2 * parts + o], part[3 * parts + o], part[4 * parts + o]});
    }
  m = row_tree(m);
  if (threadIdx.y == 0 && c < C) {
    const double s0 = static_cast<double>(lv.s[l][b * lv.ss[l][0] + c * lv.ss[l][1]]);
    const double t0 = static_cast<double>(lv.t[l][b * lv.ts[l][0] + c * lv.ts[l][1]]);
    store_stats(stats, plane_loss, planes_total, lv.plane_first[l] + b * C + c, nmse_plane_stats(s0, t0, m, eps));
  }
}

template <typename scalar_t, typename stat_t>
__global__ void __launch_bounds__(kThreads) nmse_tile_backward_kernel(Levels<scalar_t> lv, int64_t planes_total,
                                                                       const stat_t* __restrict__ stats,
                                                                       const scalar_t* __restrict__ grad_out,
                                                                       double inv_total) {
  using acc_t = at::opmath_type<scalar_t>;
  const TileThread<scalar_t> tt = tile_thread(lv);
  const int l = tt.l;
  if (tt.c >= tt.C) return;  // no block-wide synchronization follows
  const int64_t q = lv.plane_first[l] + tt.tp.b * tt.C + tt.c;
  const acc_t scale = acc_t(static_cast<double>(grad_out[0]) * 2.0 * inv_total);
  const acc_t ms = acc_t(stats[q]), rs = acc_t(stats[planes_total + q]), mt = acc_t(stats[2 * planes_total + q]),
              rt = acc_t(stats[3 * planes_total + q]), k = acc_t(stats[4 * planes_total + q]);
  scalar_t* g = lv.g[l] + tt.tp.b * lv.gs[l][0] + tt.c * lv.gs[l][1];
  const int64_t ge = lv.gs[l][2];
#pragma unroll 4
  for (int64_t i = tt.first; i < tt.end; i += kNmseRows)
    g[i * ge] = static_cast<scalar_t>(nmse_grad<acc_t>(static_cast<acc_t>(tt.s[i * tt.se]),
                                                       static_cast<acc_t>(tt.t[i * tt.te]), ms, rs, mt, rt, k, scale));
}

// (sb, sc, se) of an NCHW or channels_last map: element f = j * W + i of plane (b, c) at b*sb + c*sc + f*se.
void map_strides(const at::Tensor& x, int64_t (&st)[3]) {
  st[0] = x.stride(0);
  st[1] = x.stride(1);
  st[2] = x.is_contiguous() ? 1 : (x.size(3) > 1 ? x.stride(3) : x.stride(2));
}

bool is_channels_last(const at::Tensor& x) {
  return !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
}

// The levels whose student is (channels_last) or is not (NCHW) channels_last, in groups of at most kMaxLevels
// (the maps kept alive by the caller).
template <typename scalar_t>
std::vector<Levels<scalar_t>> group_levels(const std::vector<at::Tensor>& s, const std::vector<at::Tensor>& t,
                                           std::vector<at::Tensor>* g, bool channels_last) {
  std::vector<Levels<scalar_t>> groups;
  int64_t first = 0, parts = 0;
  for (size_t i = 0; i < s.size(); ++i) {
    const int64_t planes = s[i].size(0) * s[i].size(1);
    first += planes;
    if (is_channels_last(s[i]) != channels_last) continue;
    if (groups.empty() || groups.back().count == kMaxLevels) {
      groups.emplace_back();
      groups.back().count = 0;
      parts = 0;
    }
    Levels<scalar_t>& lv = groups.back();
    const int k = lv.count++;
    lv.s[k] = s[i].data_ptr<scalar_t>();
    lv.t[k] = t[i].data_ptr<scalar_t>();
    lv.g[k] = g ? (*g)[i].data_ptr<scalar_t>() : nullptr;
    lv.n[k] = s[i].size(2) * s[i].size(3);
    lv.channels[k] = s[i].size(1);
    lv.images[k] = s[i].size(0);
    lv.planes[k] = planes;
    map_strides(s[i], lv.ss[k]);
    map_strides(t[i], lv.ts[k]);
    map_strides(g ? (*g)[i] : s[i], lv.gs[k]);
    lv.plane_first[k] = first - planes;
    lv.tiles[k] = channels_last ? nmse_tiles(lv.n[k]) : (lv.n[k] + kBackwardTile - 1) / kBackwardTile;
    lv.runs[k] = (lv.channels[k] + kNmseLanes - 1) / kNmseLanes;
    lv.part_first[k] = parts;
    parts += lv.tiles[k] * planes;
  }
  return groups;
}

// The group with its blocks numbered for one launch, `blocks_of(lv, k)` blocks for level k.
template <typename scalar_t, typename BlocksOf>
Levels<scalar_t> numbered(Levels<scalar_t> lv, BlocksOf blocks_of) {
  lv.block_first[0] = 0;
  for (int k = 0; k < lv.count; ++k) lv.block_first[k + 1] = lv.block_first[k] + blocks_of(lv, k);
  TORCH_CHECK(lv.block_first[lv.count] < (int64_t(1) << 31), "lgd_ops.normalized_mse: too many blocks for one launch");
  return lv;
}

// Blocks per level: one per plane (NCHW forward), per tile of a plane (NCHW backward), per (image, tile, channel
// run) (channels_last sweeps), per (image, channel run) (channels_last merge).
template <typename scalar_t>
int64_t plane_blocks(const Levels<scalar_t>& lv, int k) { return lv.planes[k]; }
template <typename scalar_t>
int64_t plane_tile_blocks(const Levels<scalar_t>& lv, int k) { return lv.planes[k] * lv.tiles[k]; }
template <typename scalar_t>
int64_t cl_tile_blocks(const Levels<scalar_t>& lv, int k) { return lv.images[k] * lv.tiles[k] * lv.runs[k]; }
template <typename scalar_t>
int64_t cl_merge_blocks(const Levels<scalar_t>& lv, int k) { return lv.images[k] * lv.runs[k]; }

// Partials (tile, plane) of a channels_last group, the workspace's row length.
template <typename scalar_t>
int64_t group_parts(const Levels<scalar_t>& lv) {
  return lv.part_first[lv.count - 1] + lv.tiles[lv.count - 1] * lv.planes[lv.count - 1];
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
  at::Tensor plane_loss = at::empty({planes}, student[0].options().dtype(at::kDouble));
  const auto s = planar(student), t = planar(teacher);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s[0].scalar_type(), "normalized_mse_cuda", [&] {
    using stat_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    for (const auto& group : group_levels<scalar_t>(s, t, nullptr, false)) {
      const Levels<scalar_t> lv = numbered(group, plane_blocks<scalar_t>);
      nmse_forward_kernel<scalar_t, stat_t><<<lv.block_first[lv.count], kThreads, 0, stream>>>(
          lv, planes, eps, stats.data_ptr<stat_t>(), plane_loss.data_ptr<double>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    for (const auto& group : group_levels<scalar_t>(s, t, nullptr, true)) {
      const int64_t parts = group_parts(group);
      at::Tensor part = at::empty({5, parts}, plane_loss.options());
      const Levels<scalar_t> tiles = numbered(group, cl_tile_blocks<scalar_t>);
      nmse_tile_moments_kernel<scalar_t><<<tiles.block_first[tiles.count], dim3(kNmseLanes, kNmseRows), 0,
                                           stream>>>(tiles, parts, part.data_ptr<double>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      const Levels<scalar_t> runs = numbered(group, cl_merge_blocks<scalar_t>);
      nmse_tile_merge_kernel<scalar_t, stat_t><<<runs.block_first[runs.count], dim3(kNmseLanes, kNmseRows), 0,
                                                 stream>>>(runs, parts, part.data_ptr<double>(), planes, eps,
                                                           stats.data_ptr<stat_t>(), plane_loss.data_ptr<double>());
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
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s[0].scalar_type(), "normalized_mse_backward_cuda", [&] {
    using stat_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const at::Tensor st = stats.to(c10::CppTypeToScalarType<stat_t>::value).contiguous();
    const at::Tensor go = grad.to(s[0].scalar_type()).contiguous();
    // every block does work: one tile of one plane (NCHW), or of kNmseLanes planes (channels_last)
    for (const auto& group : group_levels<scalar_t>(s, t, &g, false)) {
      const Levels<scalar_t> lv = numbered(group, plane_tile_blocks<scalar_t>);
      nmse_backward_kernel<scalar_t, stat_t><<<lv.block_first[lv.count], kThreads, 0, stream>>>(
          lv, planes, st.data_ptr<stat_t>(), go.data_ptr<scalar_t>(), 1.0 / double(total));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    for (const auto& group : group_levels<scalar_t>(s, t, &g, true)) {
      const Levels<scalar_t> lv = numbered(group, cl_tile_blocks<scalar_t>);
      nmse_tile_backward_kernel<scalar_t, stat_t><<<lv.block_first[lv.count], dim3(kNmseLanes, kNmseRows), 0,
                                                    stream>>>(lv, planes, st.data_ptr<stat_t>(),
                                                              go.data_ptr<scalar_t>(), 1.0 / double(total));
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
