// Per-plane and per-element arithmetic of the normalized-MSE loss (docs/method.md §4), shared by the
// CPU and CUDA kernels and the ctest target. xs = (s - mean_s) * rstd_s, xt likewise for the
// teacher; the loss of a plane is sum (xs - xt)^2 and only the student receives a gradient.
#pragma once

#include <cmath>
#include <cstdint>

#include "box_math.h"

namespace lgd_ops {

// What a (b, c) plane contributes, from its central moments (sums of squared/cross deviations
// about the exact means). `k` = mean((xs - xt) * xs), the one constant the gradient needs, so the
// backward pass is a single elementwise sweep that never stores a normalized map.
struct PlaneTerms {
  double s_rstd, t_rstd, loss, k;
};

LGD_HOST_DEVICE PlaneTerms nmse_plane_terms(double n, double s_m2, double t_m2, double st_c,
                                            double eps) {
  PlaneTerms p;
  // Biased (InstanceNorm) moments; rounding can leave a one-pass sum of squares slightly negative.
  // The clamps test `< 0` so that a NaN (a non-finite input) passes through to the loss.
  const double vs = s_m2 < 0.0 ? 0.0 : s_m2 / n, vt = t_m2 < 0.0 ? 0.0 : t_m2 / n, cst = st_c / n;
  p.s_rstd = 1.0 / std::sqrt(vs + eps);
  p.t_rstd = 1.0 / std::sqrt(vt + eps);
  const double ss = vs * p.s_rstd * p.s_rstd;     // mean(xs^2)
  const double tt = vt * p.t_rstd * p.t_rstd;     // mean(xt^2)
  const double st = cst * p.s_rstd * p.t_rstd;    // mean(xs * xt)
  const double per_elem = ss + tt - 2.0 * st;
  p.loss = per_elem < 0.0 ? 0.0 : n * per_elem;
  p.k = ss - st;
  return p;
}

// ---- Moments of runs of a plane, merged (Chan et al.'s pairwise update) ----
// The CUDA channels_last kernels split a plane's positions into tiles and a tile's positions over the rows of a
// block; each (row, channel) thread sums deviations from the plane's first element, and the partial moments are
// merged in a fixed order: a tree over the rows, then over the tiles. csrc/tests emulates that order.

constexpr int kNmseLanes = 32;        // channels of a block: one warp's lanes, consecutive in memory
constexpr int kNmseRows = 8;          // position rows of a block (one warp each); a power of two
constexpr int64_t kNmseTile = 512;    // positions of a tile (one block of the channels_last sweeps)

// Sums of x = s - s0 and y = t - t0 (s0, t0: the plane's first elements), their squares and product.
struct NmseSums {
  double x, y, xx, yy, xy;
};

LGD_HOST_DEVICE void nmse_add(NmseSums& m, double x, double y) {
  m.x += x;
  m.y += y;
  m.xx += x * x;
  m.yy += y * y;
  m.xy += x * y;
}

// Moments of n elements: means of x and y, and sums of squared / cross deviations about those means.
struct NmseMoments {
  double n, mx, my, m2x, m2y, cxy;
};

LGD_HOST_DEVICE NmseMoments nmse_moments(double n, const NmseSums& m) {
  if (n == 0.0) return {0.0, 0.0, 0.0, 0.0, 0.0, 0.0};
  return {n, m.x / n, m.y / n, m.xx - m.x * m.x / n, m.yy - m.y * m.y / n, m.xy - m.x * m.y / n};
}

// The moments of the union of two disjoint runs. An empty run leaves the other unchanged (no 0 / 0).
LGD_HOST_DEVICE NmseMoments nmse_merge(const NmseMoments& a, const NmseMoments& b) {
  if (b.n == 0.0) return a;
  if (a.n == 0.0) return b;
  const double n = a.n + b.n, f = b.n / n, w = a.n * f;  // w = na * nb / n
  const double dx = b.mx - a.mx, dy = b.my - a.my;
  return {n, a.mx + dx * f, a.my + dy * f, a.m2x + b.m2x + dx * dx * w, a.m2y + b.m2y + dy * dy * w,
          a.cxy + b.cxy + dx * dy * w};
}

// The tiles of a plane of n positions, and where tile `tile` ends (it begins at tile * kNmseTile).
LGD_HOST_DEVICE int64_t nmse_tiles(int64_t n) { return (n + kNmseTile - 1) / kNmseTile; }

LGD_HOST_DEVICE int64_t nmse_tile_end(int64_t n, int64_t tile) {
  return (tile + 1) * kNmseTile < n ? (tile + 1) * kNmseTile : n;
}

// Positions of tile `tile` that a block's row `row` sums: tile * kNmseTile + row, + kNmseRows, ... < the tile's end.
LGD_HOST_DEVICE int64_t nmse_row_count(int64_t n, int64_t tile, int row) {
  const int64_t first = tile * kNmseTile + row, end = nmse_tile_end(n, tile);
  return first < end ? (end - first + kNmseRows - 1) / kNmseRows : 0;
}

// A channels_last block's place: image b, channels [c0, c0 + kNmseLanes), tile `tile` of the level's planes,
// from its index `local` in the level; blocks are numbered in memory order (image, tile, run of channels).
struct NmseTilePlace {
  int64_t b, c0, tile;
};

LGD_HOST_DEVICE NmseTilePlace nmse_tile_place(int64_t local, int64_t tiles, int64_t runs) {
  const int64_t r = local / runs, b = r / tiles;
  return {b, (local - r * runs) * kNmseLanes, r - b * tiles};
}

// Where the partial moments of tile `tile` of plane (b, c) go, in a level's slice of the workspace: the
// planes of a tile side by side, so a block's lanes write (and the merge's lanes read) consecutive addresses.
LGD_HOST_DEVICE int64_t nmse_part_index(int64_t tile, int64_t planes, int64_t b, int64_t channels, int64_t c) {
  return tile * planes + b * channels + c;
}

// What the kernels keep of a plane: the statistics the backward reads and the plane's loss, from the moments
// of all n elements about the first elements s0, t0.
struct PlaneStats {
  double s_mean, s_rstd, t_mean, t_rstd, k, loss;
};

LGD_HOST_DEVICE PlaneStats nmse_plane_stats(double s0, double t0, const NmseMoments& m, double eps) {
  const PlaneTerms r = nmse_plane_terms(m.n, m.m2x, m.m2y, m.cxy, eps);
  return {s0 + m.mx, r.s_rstd, t0 + m.my, r.t_rstd, r.k, r.loss};
}

// d loss / d s for one element, `scale` = grad_out * 2 / (total number of student elements).
// The mean(xs - xt) term of the InstanceNorm backward is zero because both maps are centred.
template <typename acc_t>
LGD_HOST_DEVICE acc_t nmse_grad(acc_t s, acc_t t, acc_t s_mean, acc_t s_rstd, acc_t t_mean,
                                acc_t t_rstd, acc_t k, acc_t scale) {
  const acc_t xs = (s - s_mean) * s_rstd;
  const acc_t xt = (t - t_mean) * t_rstd;
  return scale * s_rstd * ((xs - xt) - xs * k);
}

}  // namespace lgd_ops
