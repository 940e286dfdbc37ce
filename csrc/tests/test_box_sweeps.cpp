// ctest, part of test_kernel_math: the CUDA banded box sweeps (csrc/common/box_sweep_math.h) run block by block,
// with a warp's 32 lanes emulated by loops, against direct float64 sums within the documented error bound; their
// row walk (coverage, load order, shared-memory banks) and launch shape at the RetinaNet / Faster R-CNN levels.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <random>
#include <utility>
#include <vector>

#include "../common/box_math.h"
#include "../common/box_sweep_math.h"
#include "kernel_math_tests.h"

using lgd_ops::CellRange;

// ---- the CUDA banded box sweeps, every block emulated band by band, a warp's 32 lanes by loops ----

using lgd_ops::Band;
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

// The level index's parts (lgd_ops/_boxes.py level_index) of boxes on images `img` of a B x H level.
struct Index {
  std::vector<CellRange> cells;
  std::vector<int32_t> keys, ids, start;
};

static Index make_index(const std::vector<CellRange>& cells, const std::vector<int>& img, int32_t B, int32_t H) {
  Index ix{cells, {}, {}, {}};
  std::vector<std::pair<int32_t, int32_t>> ev;  // (key, id)
  for (size_t n = 0; n < cells.size(); ++n)
    for (int bottom = 0; bottom < 2; ++bottom) {
      const int32_t key = cells[n].empty() ? B * (H + 2) : img[n] * (H + 2) + lgd_ops::event_row(cells[n], !bottom);
      ev.push_back({key, int32_t(2 * n + bottom)});
    }
  std::stable_sort(ev.begin(), ev.end(), [](const auto& a, const auto& b) { return a.first < b.first; });
  for (const auto& e : ev) ix.keys.push_back(e.first), ix.ids.push_back(e.second);
  for (int32_t b = 0; b <= B; ++b)
    ix.start.push_back(int32_t(std::lower_bound(ix.keys.begin(), ix.keys.end(), b * (H + 2)) - ix.keys.begin()));
  return ix;
}

// The events [first, p_end) of image b before band k's end and the events [p, p_end) strictly inside it (the
// kernels' two lower_bound_key calls).
struct BandEvents {
  Band band;
  int32_t base, first, p, p_end;
};

static BandEvents band_events(const Index& ix, int32_t b, int32_t H, int32_t R, int32_t k) {
  const Band band = lgd_ops::band_range(H, R, k);
  const int32_t base = b * (H + 2), first = ix.start[b];
  const int32_t p_end = lgd_ops::lower_bound_key(ix.keys.data(), first, ix.start[b + 1], base + band.end);
  return {band, base, first, lgd_ops::lower_bound_key(ix.keys.data(), first, p_end, base + band.begin + 1), p_end};
}

// The lane carries of one channel's warp scanning row v (each lane's chunk total, then the warp scan).
template <typename acc_t>
static std::vector<acc_t> warp_carries(const std::vector<acc_t>& v, int32_t W) {
  std::vector<acc_t> partials(kSweepLanes);
  for (int l = 0; l < kSweepLanes; ++l) partials[l] = lgd_ops::chunk_total(v.data(), lgd_ops::lane_chunk(W, l));
  return lane_carries(partials);
}

// Pool's scan of col: pre[i] = sum over i' < i of col[i'] (chunk_prefix with the lane carries).
template <typename acc_t>
static void warp_prefix(const std::vector<acc_t>& col, std::vector<acc_t>& pre, int32_t W) {
  const std::vector<acc_t> carry = warp_carries(col, W);
  for (int l = 0; l < kSweepLanes; ++l)
    lgd_ops::chunk_prefix(col.data(), pre.data(), lgd_ops::lane_chunk(W, l), carry[l]);
}

// Fill's scan: col += the prefix of diff, diff cleared (chunk_apply_diff with the lane carries).
template <typename acc_t>
static void warp_apply_diff(std::vector<acc_t>& diff, std::vector<acc_t>& col, int32_t W) {
  const std::vector<acc_t> carry = warp_carries(diff, W);
  for (int l = 0; l < kSweepLanes; ++l)
    lgd_ops::chunk_apply_diff(diff.data(), col.data(), lgd_ops::lane_chunk(W, l), carry[l]);
}

// box_pool_sweep_kernel over every (band, image) of one channel (x: [B][H][W]), then box_pool_reduce_kernel
// (sum mode). Scratch slots no band writes hold 1e30, so reading one fails the comparison.
template <typename acc_t>
static std::vector<acc_t> emulate_pool(const std::vector<float>& x, int32_t B, int32_t H, int32_t W, int32_t R,
                                       const Index& ix, const std::vector<int>& img) {
  const int64_t N = int64_t(ix.cells.size());
  const int32_t K = lgd_ops::band_count(H, R);
  std::vector<acc_t> scratch(size_t(K) * N * 2, acc_t(1e30)), col(W), pre(W + 1);
  for (int32_t b = 0; b < B; ++b)
    for (int32_t k = 0; k < K; ++k) {
      BandEvents be = band_events(ix, b, H, R, k);
      std::fill(col.begin(), col.end(), acc_t(0));
      for (int32_t j = be.band.begin;;) {
        const int32_t next = be.p < be.p_end ? ix.keys[be.p] - be.base : be.band.end;
        for (int32_t i = 0; i < W; ++i)
          for (int32_t r = j; r < next; ++r) col[i] += static_cast<acc_t>(x[(size_t(b) * H + r) * W + i]);
        j = next;
        int32_t q = be.p;
        while (q < be.p_end && ix.keys[q] == be.base + j) ++q;
        warp_prefix(col, pre, W);
        for (int lane = 0; lane < kSweepLanes; ++lane) {
          if (j < be.band.end) {
            for (int32_t e = be.p + lane; e < q; e += kSweepLanes) {
              const int32_t id = ix.ids[e];
              const CellRange& r = ix.cells[id / 2];
              scratch[lgd_ops::band_slot(k, id / 2, id % 2, N, 1, 0)] =
                  lgd_ops::range_from_prefix(pre.data(), r.x0, r.x1);
            }
          } else {
            for (int32_t e = be.first + lane; e < be.p_end; e += kSweepLanes) {
              const int32_t id = ix.ids[e];
              if (id % 2 != 0) continue;
              const CellRange& r = ix.cells[id / 2];
              if (lgd_ops::active_at(r, be.band.end - 1))
                scratch[lgd_ops::band_slot(k, id / 2, 1, N, 1, 0)] = lgd_ops::range_from_prefix(pre.data(), r.x0, r.x1);
            }
          }
        }
        if (j == be.band.end) break;
        be.p = q;
      }
    }
  std::vector<acc_t> out(N, 0);
  for (int64_t n = 0; n < N; ++n)
    out[n] = lgd_ops::pool_box_total<acc_t>(ix.cells[n], H, R, scratch.data(), N, 1, n, 0,
                                            x.data() + size_t(img[n]) * H * W, W, 1);
  return out;
}

// fill_apply_events (box_fill_kernel.cu), lane by lane: the lanes load 32 events, then each lane applies, in
// event order, those landing in its chunk.
template <typename acc_t>
static void apply_events(const Index& ix, int32_t p, int32_t q, int32_t active_row, const std::vector<float>& v,
                         int32_t W, bool average, std::vector<acc_t>& diff) {
  for (int32_t g = p; g < q; g += kSweepLanes) {
    const int m = std::min(q - g, kSweepLanes);
    std::vector<int> use(m);
    std::vector<int32_t> x0(m), stop(m);
    std::vector<acc_t> amount(m);
    for (int l = 0; l < m; ++l) {  // lane l loads event g + l
      const int32_t id = ix.ids[g + l];
      const CellRange& r = ix.cells[id / 2];
      const bool top = id % 2 == 0;
      use[l] = active_row < 0 || (top && lgd_ops::active_at(r, active_row));
      acc_t val = static_cast<acc_t>(v[id / 2]);
      if (!lgd_ops::is_finite_value(val)) val = 0;
      amount[l] = lgd_ops::fill_event_amount(lgd_ops::fill_box_value(val, r, average), top);
      x0[l] = r.x0;
      stop[l] = r.x1 + 1;
    }
    for (int lane = 0; lane < kSweepLanes; ++lane) {
      const Chunk ch = lgd_ops::lane_chunk(W, lane);
      for (int s = 0; s < m; ++s) {
        if (!use[s]) continue;
        if (lgd_ops::owns(ch, x0[s])) diff[x0[s]] += amount[s];
        if (stop[s] < W && lgd_ops::owns(ch, stop[s])) diff[stop[s]] -= amount[s];
      }
    }
  }
}

// box_fill_sweep_kernel over every (band, image) of one channel (v: [N]; non-finite values left out, as the
// sweep does): [B][H][W]. Cells no band writes hold 1e30.
template <typename acc_t>
static std::vector<acc_t> emulate_fill(const std::vector<float>& v, int32_t B, int32_t H, int32_t W, int32_t R,
                                       const Index& ix, bool average) {
  std::vector<acc_t> out(size_t(B) * H * W, acc_t(1e30)), col(W), diff(W + 1);
  for (int32_t b = 0; b < B; ++b)
    for (int32_t k = 0; k < lgd_ops::band_count(H, R); ++k) {
      BandEvents be = band_events(ix, b, H, R, k);
      std::fill(col.begin(), col.end(), acc_t(0));
      std::fill(diff.begin(), diff.end(), acc_t(0));
      for (int32_t j = be.band.begin;;) {
        int32_t q = be.p;
        while (q < be.p_end && ix.keys[q] == be.base + j) ++q;
        if (j == be.band.begin) apply_events(ix, be.first, be.p, j, v, W, average, diff);
        else apply_events(ix, be.p, q, -1, v, W, average, diff);
        warp_apply_diff(diff, col, W);
        if (j > be.band.begin) be.p = q;
        const int32_t next = be.p < be.p_end ? ix.keys[be.p] - be.base : be.band.end;
        for (int32_t r = j; r < next; ++r)
          for (int32_t i = 0; i < W; ++i) out[(size_t(b) * H + r) * W + i] = col[i];
        if (next == be.band.end) break;
        j = next;
      }
    }
  return out;
}

static void test_lane_chunks() {
  for (int64_t W : {1, 5, 31, 32, 33, 64, 100, 337}) {
    int64_t next = 0;
    for (int l = 0; l < kSweepLanes; ++l) {
      const Chunk ch = lgd_ops::lane_chunk(W, l);
      expect(ch.begin == next && ch.end >= ch.begin && ch.end <= W, "lane chunks tile the row in order");
      for (int64_t i = ch.begin; i < ch.end; ++i)
        for (int o = 0; o < kSweepLanes; ++o) expect(lgd_ops::owns(lgd_ops::lane_chunk(W, o), i) == (o == l), "owns");
      next = ch.end;
    }
    expect(next == W, "lane chunks cover the row");
  }
}

// Random boxes on B images of H x W, plus: the whole map (spans every band), rows [R, 2R) (one band exactly),
// [R - 1, R] (across a band edge), row R alone (a band's first row), rows ending at a band's last row, the
// last row, empty boxes, and a box of an image outside [0, B) (covers nothing).
static void sweep_boxes(int32_t B, int32_t H, int32_t W, int32_t R, int nboxes, std::mt19937& rng,
                        std::vector<CellRange>& cells, std::vector<int>& img) {
  std::uniform_int_distribution<int> col(0, W - 1), row(0, H - 1), image(0, B - 1);
  auto add = [&](CellRange r, int b) {
    cells.push_back(r);
    img.push_back(b);
  };
  const int32_t e = std::min(R, H - 1);
  add({0, W - 1, 0, H - 1}, 0);
  add({0, W / 2, e, std::min(2 * R, H) - 1}, B - 1);
  add({W / 3, W - 1, std::max(e - 1, 0), e}, 0);
  add({1 % W, W - 1, e, e}, B - 1);
  add({0, 0, 0, std::max(e - 1, 0)}, 0);
  add({W - 1, W - 1, H - 1, H - 1}, B - 1);
  add({3 % W, 2 % W, 0, H - 1}, 0);  // x1 < x0 for W > 3: covers nothing
  for (int n = 0; n < nboxes; ++n) {
    const int xa = col(rng), xb = col(rng), ya = row(rng), yb = row(rng);
    CellRange r{std::min(xa, xb), std::max(xa, xb), std::min(ya, yb), std::max(ya, yb)};
    if (n % 7 == 3) r.y1 = r.y0 - 1;  // covers nothing
    add(r, image(rng));
  }
  // A box naming no image covers nothing (box_cells gives (0, -1, 0, -1)).
  add({0, -1, 0, -1}, B);
}

template <typename acc_t>
static void check_sweeps(int32_t B, int32_t H, int32_t W, int32_t R, int nboxes, std::mt19937& rng) {
  const double u = std::numeric_limits<acc_t>::epsilon() / 2;
  std::normal_distribution<float> normal;
  std::vector<float> x(size_t(B) * H * W);
  for (float& a : x) a = normal(rng);
  std::vector<CellRange> cells;
  std::vector<int> img;
  sweep_boxes(B, H, W, R, nboxes, rng, cells, img);
  std::vector<float> v(cells.size());
  for (float& a : v) a = normal(rng);
  const Index ix = make_index(cells, img, B, H);
  const std::vector<acc_t> pooled = emulate_pool<acc_t>(x, B, H, W, R, ix, img);
  const std::vector<acc_t> filled = emulate_fill<acc_t>(v, B, H, W, R, ix, /*average=*/true);
  std::vector<double> painted(size_t(B) * H * W, 0.0);
  char what[160];
  std::snprintf(what, sizeof(what), "banded sweeps vs float64 direct sums: B=%d H=%d W=%d R=%d acc=%s", B, H, W, R,
                sizeof(acc_t) == 8 ? "double" : "float");
  // box_sweep_math.h's bounds: pool (R + W / 32 + 6 + bands) u sum |x| over the box's bands' rows and the
  // columns <= x1; fill (events + W / 32 + 6) u sum |v|.
  const double steps = R + W / 32.0 + 6 + lgd_ops::band_count(H, R);
  bool ok = true;
  for (size_t n = 0; n < cells.size(); ++n) {
    const CellRange& r = cells[n];
    double sum = 0, mass = 0;
    if (!r.empty()) {
      const float* plane = x.data() + size_t(img[n]) * H * W;
      for (int32_t j = r.y0; j <= r.y1; ++j)
        for (int32_t i = r.x0; i <= r.x1; ++i) {
          sum += plane[j * W + i];
          painted[(size_t(img[n]) * H + j) * W + i] += double(v[n]) / double(r.count());
        }
      for (int32_t j = r.y0 / R * R; j < std::min(H, (r.y1 / R + 1) * R); ++j)
        for (int32_t i = 0; i <= r.x1; ++i) mass += std::fabs(plane[j * W + i]);
    }
    ok = ok && std::fabs(double(pooled[n]) - sum) <= u * steps * mass;
  }
  double fill_mass = 0;
  for (float a : v) fill_mass += std::fabs(a);
  const double fill_steps = 2.0 * cells.size() + W / 32.0 + 6;
  for (size_t k = 0; k < painted.size(); ++k)
    ok = ok && std::fabs(double(filled[k]) - painted[k]) <= u * fill_steps * fill_mass;
  expect(ok, what);
}

static void test_box_sweeps() {
  std::mt19937 rng(7);
  const int32_t sizes[][2] = {{1, 1}, {3, 5}, {8, 10}, {13, 31}, {25, 32}, {7, 33}, {50, 76}, {100, 152}};
  for (const auto& hw : sizes) {
    const int32_t H = hw[0];
    // One-row bands, bands of 2 and 3 rows (a last partial band when H is not a multiple), the band rows the
    // launch picks for B = 2, C = 256 on 132 SMs, one band (the unbanded sweep).
    for (int32_t R : {1, 2, 3, lgd_ops::sweep_band_rows(H, 64, 4 * 132), H})
      for (int nboxes : {1, 60}) {
        check_sweeps<double>(2, H, hw[1], R, nboxes, rng);
        check_sweeps<float>(2, H, hw[1], R, nboxes, rng);
      }
  }
  // A NaN and an inf in the map reach only the boxes covering them (a band part's direct re-sum), in every
  // banding; in fill a NaN value is left out of the sweep, so it spreads to no cell (the kernel adds it to its
  // own box afterwards).
  const int32_t H = 6, W = 9;
  std::vector<float> x(H * W, 1.0f);
  x[2 * W + 3] = std::numeric_limits<float>::quiet_NaN();
  x[4 * W + 7] = std::numeric_limits<float>::infinity();
  const std::vector<CellRange> boxes = {{0, 8, 0, 5}, {3, 3, 2, 2}, {0, 2, 3, 5}, {4, 8, 0, 3}, {7, 8, 4, 5}};
  const std::vector<int> img(boxes.size(), 0);
  const Index ix = make_index(boxes, img, 1, H);
  for (int32_t R : {1, 2, 4, 6}) {
    const std::vector<double> pooled = emulate_pool<double>(x, 1, H, W, R, ix, img);
    expect(std::isnan(pooled[0]) && std::isnan(pooled[1]), "NaN cell reaches the boxes covering it");
    expect(pooled[2] == 9.0 && pooled[3] == 20.0, "NaN and inf cells reach no other box");
    expect(std::isinf(pooled[4]) && pooled[4] > 0, "inf cell reaches the box covering it");
    const std::vector<float> v = {1.0f, std::numeric_limits<float>::quiet_NaN(), 2.0f, 3.0f, 4.0f};
    const std::vector<double> filled = emulate_fill<double>(v, 1, H, W, R, ix, false);
    expect(std::all_of(filled.begin(), filled.end(), [](double a) { return std::isfinite(a); }),
           "a NaN value stays out of the fill sweep");
    expect(filled[5 * W + 8] == 5.0 && filled[0] == 1.0 && filled[3 * W + 0] == 3.0, "fill sweep cell values");
  }
}

// A block's threads own every row element once, in load order; in channels_last the 16 lanes of each
// half-warp hit 16 different 8-byte shared-memory slots modulo 16 (no bank conflict on doubles).
static void test_row_walk() {
  const int threads = 256;
  for (int32_t W : {1, 7, 10, 19, 38, 76, 152, 304, 336})
    for (int32_t cb : {1, 2, 4, 8})
      for (bool cl : {false, true}) {
        const lgd_ops::WalkStep step = lgd_ops::walk_step(cl ? cb : W, threads);
        const int32_t outer = cl ? W : cb, pitch = lgd_ops::sweep_pitch(W, cb);
        expect(pitch >= W + 1, "pitch holds a prefix row");
        std::vector<int> seen(size_t(cb) * W, 0);
        bool ordered = true, conflict_free = true;
        std::vector<std::vector<int32_t>> slots;  // per pass, per thread
        for (int t = 0; t < threads; ++t) {
          int pass = 0;
          for (lgd_ops::Walk w = lgd_ops::walk_start(t, step); w.outer < outer; lgd_ops::walk_next(w, step), ++pass) {
            const lgd_ops::RowElement e = lgd_ops::row_element(w, cl);
            const int64_t load = cl ? int64_t(e.i) * cb + e.cc : int64_t(e.cc) * W + e.i;
            ordered = ordered && load == int64_t(pass) * threads + t;
            ++seen[size_t(e.cc) * W + e.i];
            if (int(slots.size()) <= pass) slots.resize(pass + 1, std::vector<int32_t>(threads, -1));
            slots[pass][t] = e.cc * pitch + e.i;
          }
        }
        if (cl)
          for (const auto& pass : slots)
            for (int h = 0; h < threads; h += 16) {
              std::vector<int> bank(16, 0);
              for (int t = h; t < h + 16; ++t)
                if (pass[t] >= 0) conflict_free = conflict_free && ++bank[pass[t] % 16] == 1;
            }
        expect(std::all_of(seen.begin(), seen.end(), [](int k) { return k == 1; }),
               "row walk covers every element once");
        expect(ordered, "row walk in load order");
        expect(conflict_free, "channels_last row slots free of bank conflicts");
      }
}

// The launch shapes the issue asks for: at least 2 blocks per SM of an H100 (132 SMs), and no more than the one
// wave of 4 per SM the launch aims at, on every level of COCO RetinaNet (800 x 1216 padded input: P3-P7) and
// Faster R-CNN (P2-P6) at B = 2, C = 256, float and half maps.
static void test_sweep_occupancy() {
  const int32_t levels[][2] = {{200, 304}, {100, 152}, {50, 76}, {25, 38}, {13, 19}, {7, 10}};
  const int64_t B = 2, C = 256, sms = 132;
  for (const auto& hw : levels)
    for (int64_t acc_bytes : {8, 4}) {
      const int32_t cb = lgd_ops::sweep_block_channels(C, hw[1], acc_bytes, lgd_ops::kSweepSharedBytes);
      const int64_t per_band = (C + cb - 1) / cb * B;
      const int32_t R = lgd_ops::sweep_band_rows(hw[0], per_band, 4 * sms);
      const int64_t blocks = per_band * lgd_ops::band_count(hw[0], R);
      expect(cb == 8 && blocks >= 2 * sms && blocks <= 4 * sms, "2 to 4 sweep blocks per SM: one wave");
    }
}

void test_box_sweep_schedule() {
  test_lane_chunks();
  test_box_sweeps();
  test_row_walk();
  test_sweep_occupancy();
}
