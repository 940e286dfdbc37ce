// ctest for the arithmetic shared by the CPU and CUDA kernels (csrc/common/*.h), without torch:
// the docs/method.md §1 cell rule on hand-worked boxes, the CUDA banded box sweeps (test_box_sweeps.cpp), the
// normalized-MSE plane terms against a direct two-pass computation,
// and the CUDA channels_last normalized_mse schedule (tiles, rows and their merges) emulated thread by thread
// against float64 two-pass moments.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <random>
#include <vector>

#include "../common/box_math.h"
#include "../common/nmse_math.h"
#include "kernel_math_tests.h"

using lgd_ops::box_cells;
using lgd_ops::CellRange;

static int failures = 0;

void expect(bool ok, const char* what) {
  if (!ok) {
    std::printf("FAIL: %s\n", what);
    ++failures;
  }
}

static bool same(CellRange r, int x0, int x1, int y0, int y1) {
  return r.x0 == x0 && r.x1 == x1 && r.y0 == y0 && r.y1 == y1;
}

static void test_box_cells() {
  // 100x200 input, 10x20 level: rx = ry = 0.1. Box (15, 5, 42, 30): cols 1.5..4.2 -> 2..4, rows 0.5..3 -> 1..3.
  expect(same(box_cells(15, 5, 42, 30, 100, 200, 10, 20), 2, 4, 1, 3), "interior box");
  // Edges on the grid are inside (inclusive rule, no +0.5 offset): cols 1..4, rows 0..2.
  expect(same(box_cells(10, 0, 40, 20, 100, 200, 10, 20), 1, 4, 0, 2), "box on grid lines");
  // Past the edge: clamped to [0, 199] x [0, 99] -> cols 0..19 (19.9 floors to 19), rows 0..9.
  expect(same(box_cells(-50, -50, 500, 500, 100, 200, 10, 20), 0, 19, 0, 9), "box past every edge");
  expect(box_cells(30, 10, 30, 40, 100, 200, 10, 20).empty(), "zero-width box covers nothing");
  expect(box_cells(30, 10, 20, 40, 100, 200, 10, 20).empty(), "x2 < x1 covers nothing");
  expect(box_cells(300, 10, 400, 40, 100, 200, 10, 20).empty(), "box right of the image covers nothing");
  // A small box between cells of a coarse level: cols 1.2..1.8 contain no integer.
  expect(box_cells(12, 12, 18, 18, 100, 200, 10, 20).empty(), "small box between cells");
  const double nan = std::numeric_limits<double>::quiet_NaN();
  expect(box_cells(nan, 0, 10, 10, 100, 200, 10, 20).empty(), "NaN box covers nothing");
  const double inf = std::numeric_limits<double>::infinity();
  expect(same(box_cells(0, 0, inf, inf, 100, 200, 10, 20), 0, 19, 0, 9), "inf clamps to the edge");
  expect(same(box_cells(0, 0, 150, 90, 100, 200, 1, 1), 0, 0, 0, 0), "1x1 level");
  expect(box_cells(0, 0, 10, 10, 100, 200, 0, 0).empty(), "empty level");
  expect(box_cells(15, 5, 42, 30, 100, 200, 10, 20).count() == 9, "cell count");
}

static void test_nmse_terms() {
  const int n = 7;
  const double s[n] = {0.3, -1.2, 2.5, 0.0, 4.1, -0.7, 1.1};
  const double t[n] = {1.0, 0.2, -0.4, 2.2, 0.9, 0.1, -1.5};
  const double eps = 1e-5;
  double ms = 0, mt = 0;
  for (int i = 0; i < n; ++i) ms += s[i] / n, mt += t[i] / n;
  double s_m2 = 0, t_m2 = 0, st_c = 0;
  for (int i = 0; i < n; ++i) {
    s_m2 += (s[i] - ms) * (s[i] - ms);
    t_m2 += (t[i] - mt) * (t[i] - mt);
    st_c += (s[i] - ms) * (t[i] - mt);
  }
  const double rs = 1.0 / std::sqrt(s_m2 / n + eps), rt = 1.0 / std::sqrt(t_m2 / n + eps);
  double loss = 0, k = 0;
  for (int i = 0; i < n; ++i) {
    const double d = (s[i] - ms) * rs - (t[i] - mt) * rt;
    loss += d * d;
    k += d * (s[i] - ms) * rs / n;
  }
  const lgd_ops::PlaneTerms p = lgd_ops::nmse_plane_terms(n, s_m2, t_m2, st_c, eps);
  expect(std::fabs(p.loss - loss) < 1e-12, "plane loss");
  expect(std::fabs(p.k - k) < 1e-12, "plane k");
  expect(std::fabs(p.s_rstd - rs) < 1e-12 && std::fabs(p.t_rstd - rt) < 1e-12, "plane rstd");
  // Gradient of the plane loss / M against central differences.
  const double M = n, h = 1e-6;
  for (int i = 0; i < n; ++i) {
    double sp[n], sm[n];
    for (int j = 0; j < n; ++j) sp[j] = sm[j] = s[j];
    sp[i] += h;
    sm[i] -= h;
    auto plane_loss = [&](const double* x) {
      double m = 0, m2 = 0, c = 0;
      for (int j = 0; j < n; ++j) m += x[j] / n;
      for (int j = 0; j < n; ++j) m2 += (x[j] - m) * (x[j] - m), c += (x[j] - m) * (t[j] - mt);
      return lgd_ops::nmse_plane_terms(n, m2, t_m2, c, eps).loss / M;
    };
    const double numeric = (plane_loss(sp) - plane_loss(sm)) / (2 * h);
    const double analytic = lgd_ops::nmse_grad<double>(s[i], t[i], ms, rs, mt, rt, k, 2.0 / M);
    expect(std::fabs(numeric - analytic) < 1e-7, "plane gradient");
  }
  // A constant plane normalizes to zero: loss is the teacher's normalized energy.
  const lgd_ops::PlaneTerms c = lgd_ops::nmse_plane_terms(n, 0.0, t_m2, 0.0, eps);
  expect(std::fabs(c.loss - n * (t_m2 / n) * rt * rt) < 1e-12 && c.k == 0.0, "constant student plane");
  // A non-finite input gives NaN moments: the loss must stay NaN (not clamped to 0 or a finite value).
  const double nan = std::numeric_limits<double>::quiet_NaN();
  expect(std::isnan(lgd_ops::nmse_plane_terms(n, nan, t_m2, nan, eps).loss), "NaN student moments");
  expect(std::isnan(lgd_ops::nmse_plane_terms(n, s_m2, nan, nan, eps).loss), "NaN teacher moments");
}

// ---- the CUDA channels_last normalized_mse forward, every thread emulated (the kernels' order of merges) ----

using lgd_ops::kNmseLanes;
using lgd_ops::kNmseRows;
using lgd_ops::kNmseTile;
using lgd_ops::NmseMoments;

// row_tree (normalized_mse_kernel.cu) for one lane: row r takes row r + h for h = kNmseRows / 2, ..., 1.
static NmseMoments emulate_row_tree(std::vector<NmseMoments> rows) {
  for (int h = kNmseRows / 2; h > 0; h /= 2)
    for (int r = 0; r < h; ++r) rows[r] = lgd_ops::nmse_merge(rows[r], rows[r + h]);
  return rows[0];
}

// nmse_tile_moments_kernel then nmse_tile_merge_kernel on one channels_last level of B images x n positions x C
// channels (element (b, p, c) at (b * n + p) * C + c): the plane statistics in plane order b * C + c.
static std::vector<lgd_ops::PlaneStats> emulate_nmse_channels_last(const std::vector<float>& s,
                                                                    const std::vector<float>& t, int64_t B,
                                                                    int64_t n, int64_t C, double eps) {
  const int64_t tiles = lgd_ops::nmse_tiles(n), runs = (C + kNmseLanes - 1) / kNmseLanes, planes = B * C;
  std::vector<double> part(5 * tiles * planes, std::numeric_limits<double>::quiet_NaN());  // unwritten: NaN
  const int64_t parts = tiles * planes;
  for (int64_t local = 0; local < B * tiles * runs; ++local) {
    const lgd_ops::NmseTilePlace tp = lgd_ops::nmse_tile_place(local, tiles, runs);
    for (int lane = 0; lane < kNmseLanes; ++lane) {
      const int64_t c = tp.c0 + lane;
      std::vector<NmseMoments> rows(kNmseRows);
      for (int row = 0; row < kNmseRows; ++row) {
        lgd_ops::NmseSums m{0, 0, 0, 0, 0};
        if (c < C) {
          const double s0 = s[tp.b * n * C + c], t0 = t[tp.b * n * C + c];
          for (int64_t i = tp.tile * kNmseTile + row; i < lgd_ops::nmse_tile_end(n, tp.tile); i += kNmseRows)
            lgd_ops::nmse_add(m, double(s[(tp.b * n + i) * C + c]) - s0, double(t[(tp.b * n + i) * C + c]) - t0);
        }
        rows[row] = lgd_ops::nmse_moments(c < C ? double(lgd_ops::nmse_row_count(n, tp.tile, row)) : 0.0, m);
      }
      const NmseMoments r = emulate_row_tree(rows);
      if (c < C) {
        const int64_t o = lgd_ops::nmse_part_index(tp.tile, planes, tp.b, C, c);
        part[o] = r.mx, part[parts + o] = r.my, part[2 * parts + o] = r.m2x, part[3 * parts + o] = r.m2y;
        part[4 * parts + o] = r.cxy;
      }
    }
  }
  std::vector<lgd_ops::PlaneStats> out(planes);
  for (int64_t local = 0; local < B * runs; ++local) {
    const int64_t b = local / runs;
    for (int lane = 0; lane < kNmseLanes; ++lane) {
      const int64_t c = (local - b * runs) * kNmseLanes + lane;
      std::vector<NmseMoments> rows(kNmseRows, NmseMoments{0, 0, 0, 0, 0, 0});
      if (c < C)
        for (int row = 0; row < kNmseRows; ++row)
          for (int64_t tile = row; tile < tiles; tile += kNmseRows) {
            const int64_t o = lgd_ops::nmse_part_index(tile, planes, b, C, c);
            rows[row] = lgd_ops::nmse_merge(
                rows[row], {double(lgd_ops::nmse_tile_end(n, tile) - tile * kNmseTile), part[o], part[parts + o],
                            part[2 * parts + o], part[3 * parts + o], part[4 * parts + o]});
          }
      const NmseMoments m = emulate_row_tree(rows);
      if (c < C) out[b * C + c] = lgd_ops::nmse_plane_stats(s[b * n * C + c], t[b * n * C + c], m, eps);
    }
  }
  return out;
}

// The float64 two-pass statistics of every plane against the emulated schedule, on maps whose planes sit far from
// zero (offset): the moments about the plane's first element keep their precision, and Chan's merge too.
static void check_nmse_channels_last(int64_t B, int64_t n, int64_t C, double offset, std::mt19937& rng) {
  std::normal_distribution<float> normal;
  std::vector<float> s(B * n * C), t(B * n * C);
  for (size_t i = 0; i < s.size(); ++i) {
    s[i] = float(offset + normal(rng));
    t[i] = float(0.5 * normal(rng) - offset);
  }
  const double eps = 1e-5;
  const std::vector<lgd_ops::PlaneStats> got = emulate_nmse_channels_last(s, t, B, n, C, eps);
  char what[160];
  std::snprintf(what, sizeof(what), "channels_last nmse schedule vs float64 two-pass: B=%lld n=%lld C=%lld",
                (long long)B, (long long)n, (long long)C);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t c = 0; c < C; ++c) {
      auto at = [&](const std::vector<float>& x, int64_t i) { return double(x[(b * n + i) * C + c]); };
      double ms = 0, mt = 0;
      for (int64_t i = 0; i < n; ++i) ms += at(s, i), mt += at(t, i);
      ms /= double(n), mt /= double(n);
      double s_m2 = 0, t_m2 = 0, st_c = 0;
      for (int64_t i = 0; i < n; ++i) {
        s_m2 += (at(s, i) - ms) * (at(s, i) - ms);
        t_m2 += (at(t, i) - mt) * (at(t, i) - mt);
        st_c += (at(s, i) - ms) * (at(t, i) - mt);
      }
      const lgd_ops::PlaneTerms want = lgd_ops::nmse_plane_terms(double(n), s_m2, t_m2, st_c, eps);
      const lgd_ops::PlaneStats& p = got[b * C + c];
      const double tol = 1e-11;
      const bool ok = std::fabs(p.s_mean - ms) <= tol * (1 + std::fabs(ms)) &&
                      std::fabs(p.t_mean - mt) <= tol * (1 + std::fabs(mt)) &&
                      std::fabs(p.s_rstd - want.s_rstd) <= tol * want.s_rstd &&
                      std::fabs(p.t_rstd - want.t_rstd) <= tol * want.t_rstd &&
                      std::fabs(p.loss - want.loss) <= tol * (1 + double(n)) && std::fabs(p.k - want.k) <= tol;
      expect(ok, what);
      if (!ok) return;
    }
}

static void test_nmse_channels_last_schedule() {
  // Blocks are numbered image, tile, run of channels, and cover every (image, tile, channel) once.
  for (int64_t tiles : {1, 3}) {
    std::vector<int> seen(2 * tiles * 3 * kNmseLanes, 0);
    for (int64_t local = 0; local < 2 * tiles * 3; ++local) {
      const lgd_ops::NmseTilePlace tp = lgd_ops::nmse_tile_place(local, tiles, 3);
      expect(tp.c0 % kNmseLanes == 0 && tp.b < 2 && tp.tile < tiles, "tile place in range");
      expect(local == (tp.b * tiles + tp.tile) * 3 + tp.c0 / kNmseLanes, "blocks in memory order");
      for (int lane = 0; lane < kNmseLanes; ++lane) ++seen[(tp.b * tiles + tp.tile) * 3 * kNmseLanes + tp.c0 + lane];
    }
    expect(std::all_of(seen.begin(), seen.end(), [](int k) { return k == 1; }), "every channel of every tile once");
  }
  std::mt19937 rng(11);
  // Single positions, a partial row, exactly one tile, a tail tile of one position, more tiles than rows (a row
  // merges several tiles), the RetinaNet P3 level (100 x 152) with a partial run of channels.
  const int64_t shapes[][3] = {{1, 1, 1},     {2, 5, 3},     {1, kNmseTile, 33}, {2, kNmseTile + 1, 7},
                               {1, 9 * kNmseTile + 100, 2}, {2, 100 * 152, 40}};
  for (const auto& sh : shapes) {
    check_nmse_channels_last(sh[0], sh[1], sh[2], 0.0, rng);
    check_nmse_channels_last(sh[0], sh[1], sh[2], 1000.0, rng);
  }
  // Chan's merge: an empty side leaves the other unchanged; NaN moments stay NaN.
  const NmseMoments a{3, 1, 2, 4, 5, 6}, none{0, 0, 0, 0, 0, 0};
  const NmseMoments l = lgd_ops::nmse_merge(none, a), r = lgd_ops::nmse_merge(a, none);
  expect(l.n == 3 && l.m2x == 4 && r.cxy == 6 && r.mx == 1, "merge with an empty run");
  const double nan = std::numeric_limits<double>::quiet_NaN();
  expect(std::isnan(lgd_ops::nmse_merge(a, {2, nan, 0, nan, 0, nan}).m2x), "NaN moments stay NaN");
}

int main() {
  test_box_cells();
  test_box_sweep_schedule();
  test_nmse_terms();
  test_nmse_channels_last_schedule();
  if (failures) {
    std::printf("%d check(s) failed\n", failures);
    return 1;
  }
  std::printf("all kernel-math checks passed\n");
  return 0;
}
