// ctest for the arithmetic shared by the CPU and CUDA kernels (csrc/common/*.h), without torch:
// the docs/method.md §1 cell rule on hand-worked boxes, the CUDA box sweeps (box_sweep_math.h) run with a
// warp's 32 lanes emulated by loops against direct sums, the normalized-MSE plane terms against a
// direct two-pass computation, and the CUDA channels_last normalized_mse schedule (tiles, rows and their merges)
// emulated thread by thread against float64 two-pass moments.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <random>
#include <vector>

#include "../common/box_math.h"
#include "../common/box_sweep_math.h"
#include "../common/nmse_math.h"

using lgd_ops::box_cells;
using lgd_ops::CellRange;

static int failures = 0;

static void expect(bool ok, const char* what) {
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

// ---- the CUDA box sweeps, one channel's warp emulated lane by lane (the kernels' order of additions) ----

using lgd_ops::Chunk;
using lgd_ops::kSweepLanes;

// warp_exclusive_carry (cuda_boxes.cuh): the Hillis-Steele steps over the lanes, then each lane takes the
// inclusive value of the lane before it.
template <typename acc_t>
static std::vector<acc_t> lane_carries(const std::vector<acc_t>& partial) {
  std::vector<acc_t> incl = partial;
  for (int d = 1; d < kSweepLanes; d *= 2) {
    const std::vector<acc_t> prev = incl;
    for (int l = 0; l < kSweepLanes; ++l) incl[l] = lgd_ops::scan_step(prev[l], l >= d ? prev[l - d] : prev[l], l, d);
  }
  std::vector<acc_t> carry(kSweepLanes, acc_t(0));
  for (int l = 1; l < kSweepLanes; ++l) carry[l] = incl[l - 1];
  return carry;
}

struct Event {
  int32_t row;
  int64_t id;  // 2 * box + (bottom ? 1 : 0)
};

// The image's events sorted by row, box order within a row (plan_events' stable sort).
static std::vector<Event> sweep_events(const std::vector<CellRange>& boxes) {
  std::vector<Event> ev;
  for (size_t n = 0; n < boxes.size(); ++n)
    if (!boxes[n].empty())
      for (int bottom = 0; bottom < 2; ++bottom)
        ev.push_back({lgd_ops::event_row(boxes[n], bottom == 0), int64_t(2 * n + bottom)});
  std::stable_sort(ev.begin(), ev.end(), [](const Event& a, const Event& b) { return a.row < b.row; });
  return ev;
}

// box_pool_sweep_kernel for one (b, c) plane x [H][W] (sum mode).
template <typename acc_t>
static std::vector<acc_t> emulate_pool(const std::vector<float>& x, int64_t H, int64_t W,
                                       const std::vector<CellRange>& boxes) {
  std::vector<acc_t> col(W, 0), pre(W + 1, 0), partial(boxes.size(), 0), out(boxes.size(), 0);
  const std::vector<Event> ev = sweep_events(boxes);
  size_t p = 0;
  for (int64_t j = 0; p < ev.size(); ++j) {
    if (ev[p].row == j) {
      size_t q = p + 1;
      while (q < ev.size() && ev[q].row == j) ++q;
      std::vector<acc_t> partials(kSweepLanes);
      for (int l = 0; l < kSweepLanes; ++l) partials[l] = lgd_ops::chunk_total(col.data(), lgd_ops::lane_chunk(W, l));
      const std::vector<acc_t> carry = lane_carries(partials);
      for (int l = 0; l < kSweepLanes; ++l)
        lgd_ops::chunk_prefix(col.data(), pre.data(), lgd_ops::lane_chunk(W, l), carry[l]);
      for (size_t e = p; e < q; ++e) {
        const int64_t n = ev[e].id / 2;
        const bool top = ev[e].id % 2 == 0;
        const CellRange& r = boxes[n];
        const acc_t sum = lgd_ops::pool_event_update(top ? acc_t(0) : partial[n],
                                                     lgd_ops::range_from_prefix(pre.data(), r.x0, r.x1), top);
        if (top) {
          partial[n] = sum;
        } else {
          out[n] = lgd_ops::is_finite_value(sum) ? sum : lgd_ops::direct_box_sum<acc_t>(x.data(), W, 1, r);
        }
      }
      p = q;
      if (p == ev.size()) break;
    }
    if (j == H) break;
    for (int64_t i = 0; i < W; ++i) col[i] += static_cast<acc_t>(x[j * W + i]);
  }
  return out;
}

// box_fill_sweep_kernel for one (b, c) plane (non-finite values left out, as the kernel's sweep does).
template <typename acc_t>
static std::vector<acc_t> emulate_fill(const std::vector<float>& v, int64_t H, int64_t W,
                                       const std::vector<CellRange>& boxes, bool average) {
  std::vector<acc_t> col(W, 0), diff(W + 1, 0), out(H * W, 0);
  const std::vector<Event> ev = sweep_events(boxes);
  size_t p = 0;
  for (int64_t j = 0; j < H; ++j) {
    if (p < ev.size() && ev[p].row == j) {
      size_t q = p + 1;
      while (q < ev.size() && ev[q].row == j) ++q;
      for (int l = 0; l < kSweepLanes; ++l)
        for (size_t e = p; e < q; ++e) {  // each lane walks the row's events in order
          const int64_t n = ev[e].id / 2;
          const CellRange& r = boxes[n];
          acc_t val = static_cast<acc_t>(v[n]);
          if (!lgd_ops::is_finite_value(val)) val = 0;
          const acc_t amount = lgd_ops::fill_event_amount(lgd_ops::fill_box_value(val, r, average), ev[e].id % 2 == 0);
          if (lgd_ops::lane_of_column(W, r.x0) == l) diff[r.x0] += amount;
          if (r.x1 + 1 < W && lgd_ops::lane_of_column(W, r.x1 + 1) == l) diff[r.x1 + 1] -= amount;
        }
      std::vector<acc_t> partials(kSweepLanes);
      for (int l = 0; l < kSweepLanes; ++l) partials[l] = lgd_ops::chunk_total(diff.data(), lgd_ops::lane_chunk(W, l));
      const std::vector<acc_t> carry = lane_carries(partials);
      for (int l = 0; l < kSweepLanes; ++l)
        lgd_ops::chunk_apply_diff(diff.data(), col.data(), lgd_ops::lane_chunk(W, l), carry[l]);
      p = q;
    }
    for (int64_t i = 0; i < W; ++i) out[j * W + i] = col[i];
  }
  return out;
}

static void test_lane_chunks() {
  for (int64_t W : {1, 5, 31, 32, 33, 64, 100, 337}) {
    int64_t next = 0;
    for (int l = 0; l < kSweepLanes; ++l) {
      const Chunk ch = lgd_ops::lane_chunk(W, l);
      expect(ch.begin == next && ch.end >= ch.begin && ch.end <= W, "lane chunks tile the row in order");
      for (int64_t i = ch.begin; i < ch.end; ++i) expect(lgd_ops::lane_of_column(W, i) == l, "lane_of_column");
      next = ch.end;
    }
    expect(next == W, "lane chunks cover the row");
  }
}

template <typename acc_t>
static void check_sweeps(int64_t H, int64_t W, int nboxes, std::mt19937& rng, double tol, const char* what) {
  std::normal_distribution<float> normal;
  std::uniform_int_distribution<int> col(0, int(W) - 1), row(0, int(H) - 1);
  std::vector<float> x(H * W);
  for (float& v : x) v = normal(rng);
  std::vector<CellRange> boxes;
  std::vector<float> v(nboxes);
  for (int n = 0; n < nboxes; ++n) {
    const int xa = col(rng), xb = col(rng), ya = row(rng), yb = row(rng);
    CellRange r{std::min(xa, xb), std::max(xa, xb), std::min(ya, yb), std::max(ya, yb)};
    if (n == 0) r = {0, int(W) - 1, 0, int(H) - 1};  // the whole map (a context box)
    if (n % 7 == 3) r.x1 = r.x0 - 1;                 // covers nothing
    boxes.push_back(r);
    v[n] = normal(rng);
  }
  const std::vector<acc_t> pooled = emulate_pool<acc_t>(x, H, W, boxes);
  const std::vector<acc_t> filled = emulate_fill<acc_t>(v, H, W, boxes, /*average=*/true);
  std::vector<double> painted(H * W, 0.0);
  for (int n = 0; n < nboxes; ++n) {
    const CellRange& r = boxes[n];
    double sum = 0, mass = 1;
    for (int32_t j = r.y0; j <= r.y1; ++j)
      for (int32_t i = r.x0; i <= r.x1; ++i) {
        sum += x[j * W + i];
        painted[j * W + i] += double(v[n]) / double(r.count());
      }
    for (int64_t j = 0; j <= std::min<int64_t>(r.y1, H - 1); ++j)
      for (int64_t i = 0; i <= std::min<int64_t>(r.x1, W - 1); ++i) mass += std::fabs(x[j * W + i]);
    if (r.empty()) sum = 0;
    expect(std::fabs(double(pooled[n]) - sum) <= tol * mass, what);
  }
  double fill_mass = 1;
  for (float a : v) fill_mass += std::fabs(a);
  for (int64_t k = 0; k < H * W; ++k) expect(std::fabs(double(filled[k]) - painted[k]) <= tol * fill_mass, what);
}

static void test_box_sweeps() {
  std::mt19937 rng(7);
  const int64_t sizes[][2] = {{1, 1}, {3, 5}, {8, 10}, {13, 31}, {25, 32}, {7, 33}, {50, 76}, {100, 152}};
  for (const auto& hw : sizes)
    for (int nboxes : {1, 7, 60}) {
      check_sweeps<double>(hw[0], hw[1], nboxes, rng, 1e-13, "double sweep vs direct sums");
      check_sweeps<float>(hw[0], hw[1], nboxes, rng, 2e-5, "float sweep vs direct sums");
    }
  // A NaN and an inf in the map reach only the boxes covering them (the direct re-sum); in fill a NaN
  // value is left out of the sweep, so it spreads to no cell (the kernel adds it to its own box afterwards).
  const int64_t H = 6, W = 9;
  std::vector<float> x(H * W, 1.0f);
  x[2 * W + 3] = std::numeric_limits<float>::quiet_NaN();
  x[4 * W + 7] = std::numeric_limits<float>::infinity();
  const std::vector<CellRange> boxes = {{0, 8, 0, 5}, {3, 3, 2, 2}, {0, 2, 3, 5}, {4, 8, 0, 3}, {7, 8, 4, 5}};
  const std::vector<double> pooled = emulate_pool<double>(x, H, W, boxes);
  expect(std::isnan(pooled[0]) && std::isnan(pooled[1]), "NaN cell reaches the boxes covering it");
  expect(pooled[2] == 9.0 && pooled[3] == 20.0, "NaN and inf cells reach no other box");
  expect(std::isinf(pooled[4]) && pooled[4] > 0, "inf cell reaches the box covering it");
  std::vector<float> v = {1.0f, std::numeric_limits<float>::quiet_NaN(), 2.0f, 3.0f, 4.0f};
  const std::vector<double> filled = emulate_fill<double>(v, H, W, boxes, false);
  expect(std::all_of(filled.begin(), filled.end(), [](double a) { return std::isfinite(a); }),
         "a NaN value stays out of the fill sweep");
  expect(filled[5 * W + 8] == 5.0 && filled[0] == 1.0 && filled[3 * W + 0] == 3.0, "fill sweep cell values");
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
  test_lane_chunks();
  test_box_sweeps();
  test_nmse_terms();
  test_nmse_channels_last_schedule();
  if (failures) {
    std::printf("%d check(s) failed\n", failures);
    return 1;
  }
  std::printf("all kernel-math checks passed\n");
  return 0;
}
