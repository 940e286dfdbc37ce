// The per-element arithmetic and the block schedule of the CUDA box sweeps (csrc/box_pool/cuda,
// csrc/box_fill/cuda), in __host__ __device__ helpers so csrc/tests/test_box_sweeps.cpp runs the same additions,
// in the same order, on the CPU (it emulates the blocks, and the 32 lanes of a warp, with loops).
//
// A sweep walks rows of one image's (b, c) plane keeping one row of state col[i] (pool: the column sums of the
// rows above, an integral image built one row at a time; fill: the painted value of the current row, the 2-D
// prefix of a difference map built one row at a time). The level index (lgd_ops/_boxes.py level_index) lists an
// image's box events sorted by row:
//   top event    at row y0      (pool: before row y0 is added; fill: before row y0 is written)
//   bottom event at row y1 + 1  (pool: row H exists as the last event row; fill: rows past H - 1 are dropped)
// Bands: a plane's rows are split into bands of R rows (band_range), one block per (channels, band, image), so a
// level has enough blocks for every SM. A band sweeps only its own rows, from zero state:
//   pool: box n's part in band [r0, r1) is P(u) - P(t), P(j) the band's prefix over rows [r0, j),
//         t = max(y0, r0) (P(r0) = 0, nothing read), u = min(y1 + 1, r1) (pool_band_rows). Events strictly inside
//         the band give t or u; u = r1 is read at the band's last event row for every box active at row r1 - 1.
//         P(u) and P(t) go to a [bands, N, 2, C] scratch and a second kernel adds sum_k (P(u) - P(t)) over the
//         box's bands in ascending k (fixed order).
//   fill: the band's first row r0 applies every box active at r0 (found among the image's top events at rows
//         <= r0), then the events strictly inside the band as usual.
// A band never changes which cells a box covers: its rows [t, u) are the box's rows within the band.
// On an event row the 32 lanes of a channel's warp own consecutive chunks of the row (lane_chunk). Pool: a
// row prefix pre[i] = sum over i' < i of col[i'] (each lane sums its chunk, a Hillis-Steele scan over the lanes
// gives each chunk its carry, then each lane writes its chunk's prefixes), and a band's part of a box is
// pre[x1 + 1] - pre[x0] (range_from_prefix). Fill: a row's events are loaded 32 at a time, one per lane, then
// passed to every lane in event order; the lane owning x0 adds +-v there and the lane owning x1 + 1 adds -+v
// (fill_event_amount) to a difference row, whose scan is added to col. Everything is added in a fixed order:
// bit-identical run to run.
//
// Error (acc_t double for float/double maps, float for half/bfloat16): a band's part of a pool sum is a
// difference of two prefix sums over at most R x (x1 + 1) cells, each formed by column sums (<= R terms), a
// chunk sum (<= ceil(W / 32)) and a 5-step scan, and the box's parts over its K' <= ceil(H / R) bands are added,
// so |error| <= (R + W / 32 + 6 + K') u sum_{box's bands, cols <= x1} |x|, u = 2^-53 (double). On a P2 level of
// an 800 x 1344 input (200 x 336 cells) with |x| <= 10 that is < 2e-8 absolute on a sum even unbanded (R = H),
// below a float output's own rounding; with a float accumulator (u = 2^-24) the unbanded bound is ~9, which is
// why float maps accumulate in double. Half/bfloat16 maps use a float accumulator: their outputs round at
// 2^-11 / 2^-8 of the value, enough for maps of tens of rows; tests/test_half_accuracy.py bounds the error on a
// 200 x 304 level by the output's rounding plus 4 u times the prefix sum the box's value is taken from. A fill
// cell carries at most (events in its band up to its row + boxes active at the band's first row + W / 32 + 6)
// u sum_boxes |v| likewise.
#pragma once

#include <cmath>
#include <cstdint>

#include "box_math.h"

namespace lgd_ops {

constexpr int kSweepLanes = 32;  // one warp per channel

struct Chunk {
  int64_t begin, end;  // columns [begin, end) of a row, possibly empty
};

// The columns lane `lane` of a warp owns in a row of W cells: ceil(W / 32) consecutive ones.
LGD_HOST_DEVICE Chunk lane_chunk(int64_t W, int lane) {
  const int64_t per = (W + kSweepLanes - 1) / kSweepLanes;
  const int64_t b = per * lane < W ? per * lane : W;
  const int64_t e = b + per < W ? b + per : W;
  return {b, e};
}

// Column i lies in the chunk (its lane applies the fill events landing there).
LGD_HOST_DEVICE bool owns(Chunk ch, int64_t i) { return ch.begin <= i && i < ch.end; }

template <typename acc_t>
LGD_HOST_DEVICE acc_t chunk_total(const acc_t* v, Chunk ch) {
  acc_t s = 0;
  for (int64_t i = ch.begin; i < ch.end; ++i) s += v[i];
  return s;
}

// One step (distance d) of the inclusive Hillis-Steele scan over the lanes: `up` is the value of lane - d.
template <typename acc_t>
LGD_HOST_DEVICE acc_t scan_step(acc_t mine, acc_t up, int lane, int d) {
  return lane >= d ? up + mine : mine;
}

// Pool: pre[i + 1] = carry + sum over i' in [begin, i] of col[i'], for i in the chunk (carry: the sum of the
// chunks before it); the lane owning column 0 also writes pre[0] = 0.
template <typename acc_t>
LGD_HOST_DEVICE void chunk_prefix(const acc_t* col, acc_t* pre, Chunk ch, acc_t carry) {
  if (ch.begin == 0 && ch.end > 0) pre[0] = 0;
  acc_t run = carry;
  for (int64_t i = ch.begin; i < ch.end; ++i) {
    run += col[i];
    pre[i + 1] = run;
  }
}

// Pool: what an event reads, P(row) over its columns [x0, x1].
template <typename acc_t>
LGD_HOST_DEVICE acc_t range_from_prefix(const acc_t* pre, int32_t x0, int32_t x1) {
  return pre[x1 + 1] - pre[x0];
}

// The row of a box's top / bottom event.
LGD_HOST_DEVICE int32_t event_row(const CellRange& r, bool top) { return top ? r.y0 : r.y1 + 1; }

// Fill: the value a box paints (divided by its cell count for the backward of a mean pool), and the signed
// amount its event puts at x0 (the negated amount goes at x1 + 1).
template <typename acc_t>
LGD_HOST_DEVICE acc_t fill_box_value(acc_t v, const CellRange& r, bool average) {
  return average ? v / acc_t(r.count()) : v;
}

template <typename acc_t>
LGD_HOST_DEVICE acc_t fill_event_amount(acc_t value, bool top) {
  return top ? value : -value;
}

// Fill: col[i] += carry + sum over i' in [begin, i] of diff[i'] for i in the chunk, and the chunk of diff is
// cleared for the next event row.
template <typename acc_t>
LGD_HOST_DEVICE void chunk_apply_diff(acc_t* diff, acc_t* col, Chunk ch, acc_t carry) {
  acc_t run = carry;
  for (int64_t i = ch.begin; i < ch.end; ++i) {
    run += diff[i];
    diff[i] = 0;
    col[i] += run;
  }
}

// Pool, for a box's band part that is not finite: its own cells summed directly, so NaN - NaN or inf - inf
// never reaches a box that does not cover the NaN or inf.
template <typename acc_t, typename scalar_t>
LGD_HOST_DEVICE acc_t direct_box_sum(const scalar_t* plane, int64_t sh, int64_t sw, const CellRange& r) {
  acc_t s = 0;
  for (int32_t j = r.y0; j <= r.y1; ++j)
    for (int32_t i = r.x0; i <= r.x1; ++i) s += static_cast<acc_t>(plane[j * sh + i * sw]);
  return s;
}

template <typename acc_t>
LGD_HOST_DEVICE bool is_finite_value(acc_t v) {
  return v - v == acc_t(0);  // false for NaN and +-inf, without <cmath> overloads on device
}

// ---- the band schedule ----

// Rows [begin, end) of a plane; band k of R rows is [k R, min((k + 1) R, H)).
struct Band {
  int32_t begin, end;
};

LGD_HOST_DEVICE int32_t band_count(int32_t H, int32_t R) { return (H + R - 1) / R; }

LGD_HOST_DEVICE Band band_range(int32_t H, int32_t R, int32_t k) {
  const int32_t b = k * R, e = b + R;
  return {b, e < H ? e : H};
}

// Rows per band so that blocks_per_band * bands comes as close to target_blocks as whole bands allow without
// passing it (one wave when target_blocks is what the SMs hold at once), bands <= H; blocks_per_band = channel
// blocks x images. With blocks_per_band <= target_blocks / 2 that is more than target_blocks / 2 blocks.
LGD_HOST_DEVICE int32_t sweep_band_rows(int32_t H, int64_t blocks_per_band, int64_t target_blocks) {
  int64_t bands = target_blocks / blocks_per_band;
  bands = bands < 1 ? 1 : (bands > H ? H : bands);
  return int32_t((H + bands - 1) / bands);
}

LGD_HOST_DEVICE bool active_at(const CellRange& r, int32_t row) { return !r.empty() && r.y0 <= row && row <= r.y1; }

LGD_HOST_DEVICE bool touches(const CellRange& r, Band band) {
  return !r.empty() && r.y0 < band.end && r.y1 >= band.begin;
}

// Pool: the box's rows within the band are [top, bottom); its part is P(bottom) - P(top).
struct BandRows {
  int32_t top, bottom;
};

LGD_HOST_DEVICE BandRows pool_band_rows(const CellRange& r, Band band) {
  return {r.y0 > band.begin ? r.y0 : band.begin, r.y1 + 1 < band.end ? r.y1 + 1 : band.end};
}

// The first position in [lo, hi) of the ascending keys whose key is >= key (hi if none).
LGD_HOST_DEVICE int32_t lower_bound_key(const int32_t* keys, int32_t lo, int32_t hi, int32_t key) {
  while (lo < hi) {
    const int32_t mid = lo + (hi - lo) / 2;
    if (keys[mid] < key) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

// Scratch slot of box n's band-k part (part 0: P(top), 1: P(bottom)) for channel c: [bands, N, 2, C].
LGD_HOST_DEVICE int64_t band_slot(int32_t k, int64_t n, int part, int64_t N, int64_t C, int64_t c) {
  return ((int64_t(k) * N + n) * 2 + part) * C + c;
}

// Pool: box n's sum for channel c, the parts of its bands in ascending band order (a part that is not finite
// is summed again over its own cells of `plane`, the box's (b, c) plane).
template <typename acc_t, typename scalar_t>
LGD_HOST_DEVICE acc_t pool_box_total(const CellRange& r, int32_t H, int32_t R, const acc_t* scratch, int64_t N,
                                     int64_t C, int64_t n, int64_t c, const scalar_t* plane, int64_t sh,
                                     int64_t sw) {
  acc_t total = 0;
  if (r.empty()) return total;
  for (int32_t k = r.y0 / R; k <= r.y1 / R; ++k) {
    const Band band = band_range(H, R, k);
    const BandRows rows = pool_band_rows(r, band);
    const acc_t top = rows.top > band.begin ? scratch[band_slot(k, n, 0, N, C, c)] : acc_t(0);
    acc_t part = scratch[band_slot(k, n, 1, N, C, c)] - top;
    if (!is_finite_value(part))
      part = direct_box_sum<acc_t>(plane, sh, sw, CellRange{r.x0, r.x1, rows.top, rows.bottom - 1});
    total += part;
  }
  return total;
}

// ---- a block's row elements and their shared-memory slots ----

// The row state of CB channels x W columns lives in shared memory at cc * pitch + i. A block's threads own
// the row elements e = t, t + threads, ... in load order: e -> (channel cc, column i) with columns fastest for
// NCHW maps (coalesced along a row) and channels fastest for channels_last maps (coalesced along channels).
// The pitch (>= W + 1, the prefix/difference rows need W + 1) is = 16 / CB mod 16 in doubles (CB a power of 2
// <= 8), so in channels_last the 16 lanes of a half-warp (one 64-bit shared access wavefront), CB channels x
// 16 / CB consecutive columns, hit 16 different 8-byte bank pairs.
LGD_HOST_DEVICE int32_t sweep_pitch(int32_t W, int32_t CB) {
  const int32_t want = (16 / CB) % 16;
  int32_t p = W + 1;
  while (p % 16 != want) ++p;
  return p;
}

// A sweep block's dynamic shared memory: the 48 KB a block gets without opting in to more, less room for the
// kernels' own static shared variables.
constexpr int64_t kSweepSharedBytes = 48 * 1024 - 256;

// Channels per sweep block: up to 8 (one warp each) while its two rows of state, 2 * CB * pitch accumulators,
// fit in max_shared bytes; 0 when one channel's rows are too wide.
LGD_HOST_DEVICE int32_t sweep_block_channels(int64_t C, int32_t W, int64_t acc_bytes, int64_t max_shared) {
  for (int32_t cb = 8; cb >= 1; cb /= 2)
    if ((cb <= C || cb == 1) && 2 * cb * int64_t(sweep_pitch(W, cb)) * acc_bytes <= max_shared) return cb;
  return 0;
}

// A thread's walk over its row elements: (outer, inner) with inner the fastest index, stepped by the block's
// thread count without division (one division at the start).
struct Walk {
  int32_t outer, inner;
};

struct WalkStep {
  int32_t inner_size, d_outer, d_inner;
};

LGD_HOST_DEVICE WalkStep walk_step(int32_t inner_size, int32_t threads) {
  return {inner_size, threads / inner_size, threads % inner_size};
}

LGD_HOST_DEVICE Walk walk_start(int32_t t, const WalkStep& s) { return {t / s.inner_size, t % s.inner_size}; }

LGD_HOST_DEVICE void walk_next(Walk& w, const WalkStep& s) {
  w.outer += s.d_outer;
  w.inner += s.d_inner;
  if (w.inner >= s.inner_size) {
    w.inner -= s.inner_size;
    ++w.outer;
  }
}

// (channel, column) of a walk position: channels_last walks (column, channel), NCHW (channel, column).
struct RowElement {
  int32_t cc, i;
};

LGD_HOST_DEVICE RowElement row_element(const Walk& w, bool channels_last) {
  return channels_last ? RowElement{w.inner, w.outer} : RowElement{w.outer, w.inner};
}

}  // namespace lgd_ops
