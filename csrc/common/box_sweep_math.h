// The per-element arithmetic of the CUDA box sweeps (csrc/box_pool/cuda, csrc/box_fill/cuda), in
// __host__ __device__ helpers so csrc/tests/test_kernel_math.cpp runs the same additions, in the same order,
// on the CPU (it emulates the 32 lanes of a warp with a loop).
//
// A sweep walks one image's (b, c) plane top to bottom keeping one row of state col[i] (pool: the column sums of
// the rows above, an integral image built one row at a time; fill: the painted value of the current row, the
// 2-D prefix of a difference map built one row at a time). An image's boxes become events, sorted by row:
//   top event    at row y0      (pool: before row y0 is added; fill: before row y0 is written)
//   bottom event at row y1 + 1  (pool: row H exists as the last event row; fill: rows past H - 1 are dropped)
// On an event row the 32 lanes of a channel's warp own consecutive chunks of the row (lane_chunk). Pool: a
// row prefix pre[i] = sum over i' < i of col[i'] (each lane sums its chunk, a Hillis-Steele scan over the lanes
// gives each chunk its carry, then each lane writes its chunk's prefixes), and a box sum is
// (bottom part) - (top part), part = pre[x1 + 1] - pre[x0]. Fill: each event adds +-v at x0 and -+v at
// x1 + 1 of a difference row (only the lane owning that column writes it, events in a fixed order), and the
// scanned difference row is added to col. Everything is added in a fixed order: bit-identical run to run.
//
// Error (acc_t double for float/double maps, float for half/bfloat16): a pool sum is a difference of two
// prefix sums over at most (y1 + 1) x (x1 + 1) cells, each formed by column sums (<= H terms), a chunk sum
// (<= ceil(W / 32)) and a 5-step scan, so |error| <= (H + W / 32 + 6) u sum_{rows <= y1, cols <= x1} |x|
// with u = 2^-53 (double). On a P2 level of an 800 x 1344 input (200 x 336 cells) with |x| <= 10 that is
// 217 * 1.1e-16 * 6.7e5 < 2e-8 absolute on a sum, below a float output's own rounding; with a float
// accumulator (u = 2^-24) the same bound is ~9, which is why float maps accumulate in double. Half/bfloat16
// maps use a float accumulator: their outputs round at 2^-11 / 2^-8 of the value, enough for maps of tens of
// rows; on full-size levels the worst case exceeds a half output's rounding. tests/test_half_accuracy.py bounds
// the error on a 200 x 304 level by the output's rounding plus 4 u times the prefix sum the box's value is
// taken from (a one-cell box at the bottom-right, a difference of the largest prefix sums, comes closest to
// it). A fill cell carries at most (events + W / 32 + 6) u sum_boxes |v| likewise.
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

// The lane whose chunk holds column i (i < W).
LGD_HOST_DEVICE int lane_of_column(int64_t W, int64_t i) {
  const int64_t per = (W + kSweepLanes - 1) / kSweepLanes;
  return int(i / per);
}

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

// Pool: what an event reads, the sum of the state over its columns [x0, x1].
template <typename acc_t>
LGD_HOST_DEVICE acc_t range_from_prefix(const acc_t* pre, int32_t x0, int32_t x1) {
  return pre[x1 + 1] - pre[x0];
}

// Pool: a top event starts a box's sum at minus the part above the box, the bottom event adds the part
// through its last row.
template <typename acc_t>
LGD_HOST_DEVICE acc_t pool_event_update(acc_t sum, acc_t part, bool top) {
  return top ? -part : sum + part;
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

// Pool, for a box whose sweep sum is not finite: its own cells summed directly, so NaN - NaN or inf - inf
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

}  // namespace lgd_ops
