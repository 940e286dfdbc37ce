// CPU-side preparation shared by the box kernels: each box's cell range on the level grid, the boxes
// grouped by image (a (b, c) plane visits only its own image's boxes), and each image's row events
// for the kernels' top-to-bottom sweep (csrc/common/cpu_box_sweep.inc), grouped by row.
// The plan is built per call, in O(N + batch + event rows): from the level index when the caller gives one
// (lgd_ops._boxes.level_index: cells and events already sorted on the host, once per batch and level), else
// from the boxes themselves. Both give the same plan, so the kernels' results do not depend on which.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <optional>
#include <vector>

#include "box_checks.h"
#include "box_math.h"

namespace lgd_ops {

// A box enters the sweep at row y0 (top) and leaves before row y1 + 1 (bottom).
struct SweepEvent {
  int32_t x0, x1;  // the box's columns
  int32_t slot;    // the box's index among its image's boxes (order[start[b] + slot])
  bool top;
};

// The events of one image on one row: events[begin, end); width = sum of their column counts.
struct SweepRow {
  int32_t row;
  int64_t begin, end, width;
};

struct BoxPlan {
  std::vector<CellRange> cells;   // per box, in input order
  std::vector<int64_t> order;     // box ids of boxes covering a cell, grouped by image, input order inside one
  std::vector<int64_t> start;     // boxes of image b: order[start[b] .. start[b + 1])
  std::vector<int64_t> area;      // total cells covered by image b's boxes (overlaps counted twice)
  std::vector<SweepEvent> events; // image b: events[2 * start[b] .. 2 * start[b + 1]), sorted by row (stable)
  std::vector<SweepRow> rows;     // image b: rows[row_start[b] .. row_start[b + 1]), increasing row
  std::vector<int64_t> row_start;
};

// Event k of image im, at `row`, into the plan's rows (rows[row_start[im] ..) is the image's, events by row).
inline void add_to_rows(BoxPlan& plan, int64_t im, int64_t k, int32_t row) {
  if (plan.rows.size() == size_t(plan.row_start[im]) || plan.rows.back().row != row)
    plan.rows.push_back({row, k, k, 0});
  plan.rows.back().end = k + 1;
  plan.rows.back().width += plan.events[k].x1 - plan.events[k].x0 + 1;
}

// The plan of the boxes themselves. Boxes whose batch index is outside [0, batch) cover nothing (the Python
// API rejects them first).
inline BoxPlan plan_from_boxes(const at::Tensor& boxes, const at::Tensor& batch_idx, int64_t batch, int64_t in_h,
                               int64_t in_w, int64_t h, int64_t w) {
  const int64_t n = boxes.size(0);
  const at::Tensor bx = boxes.to(at::kDouble).contiguous();
  const at::Tensor bi = batch_idx.contiguous();
  const double* b = bx.data_ptr<double>();
  const int64_t* img = bi.data_ptr<int64_t>();
  BoxPlan out;
  out.cells.resize(n);
  out.order.resize(n);
  out.start.assign(batch + 1, 0);
  out.area.assign(batch, 0);
  for (int64_t i = 0; i < n; ++i) {
    const bool valid = img[i] >= 0 && img[i] < batch;
    out.cells[i] = valid ? box_cells(b[4 * i], b[4 * i + 1], b[4 * i + 2], b[4 * i + 3], in_h, in_w, h, w)
                         : CellRange{0, -1, 0, -1};
    if (valid && !out.cells[i].empty()) {
      ++out.start[img[i] + 1];
      out.area[img[i]] += out.cells[i].count();
    }
  }
  for (int64_t i = 0; i < batch; ++i) out.start[i + 1] += out.start[i];
  std::vector<int64_t> fill(out.start.begin(), out.start.end() - 1);
  int64_t used = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (img[i] >= 0 && img[i] < batch && !out.cells[i].empty()) {
      out.order[fill[img[i]]++] = i;
      ++used;
    }
  }
  out.order.resize(used);
  out.events.reserve(2 * used);
  out.row_start.assign(batch + 1, 0);
  for (int64_t im = 0; im < batch; ++im) {
    const int64_t first = int64_t(out.events.size());
    for (int64_t k = out.start[im]; k < out.start[im + 1]; ++k) {
      const CellRange r = out.cells[out.order[k]];
      const int32_t slot = int32_t(k - out.start[im]);
      out.events.push_back({r.x0, r.x1, slot, true});
      out.events.push_back({r.x0, r.x1, slot, false});
    }
    auto row_of = [&](const SweepEvent& e) {
      const CellRange r = out.cells[out.order[out.start[im] + e.slot]];
      return e.top ? r.y0 : r.y1 + 1;
    };
    std::stable_sort(out.events.begin() + first, out.events.end(),
                     [&](const SweepEvent& a, const SweepEvent& e) { return row_of(a) < row_of(e); });
    for (int64_t k = first; k < int64_t(out.events.size()); ++k) add_to_rows(out, im, k, row_of(out.events[k]));
    out.row_start[im + 1] = int64_t(out.rows.size());
  }
  return out;
}

// The plan read from a level index of n boxes over `batch` images on an h x w level (its layout:
// lgd_ops._boxes.level_index; its size, dtype, device and contiguity checked by check_level_index). The events
// come sorted as plan_from_boxes sorts them (by row, then box, top before bottom), so the plans are the same.
// Every entry the sweeps use to address memory is checked on the way (one pass, no extra cost), so a raw call
// with a corrupt index raises instead of reading outside the map.
inline BoxPlan plan_from_index(const at::Tensor& index, int64_t n, int64_t batch, int64_t h, int64_t w) {
  const int32_t* cells = index.const_data_ptr<int32_t>();
  const int32_t* ids = cells + 6 * n;
  const int32_t* start = cells + 8 * n;
  BoxPlan out;
  out.cells.resize(n);
  for (int64_t i = 0; i < n; ++i)
    out.cells[i] = {cells[4 * i], cells[4 * i + 1], cells[4 * i + 2], cells[4 * i + 3]};
  std::vector<int64_t> image(n, -1);  // each covering box's image, from its top event
  out.start.assign(batch + 1, 0);
  out.area.assign(batch, 0);
  TORCH_CHECK(start[0] >= 0, "lgd_ops: corrupt level index (event start ", start[0], ")");
  for (int64_t b = 0; b < batch; ++b) {
    TORCH_CHECK(start[b] <= start[b + 1] && start[b + 1] <= 2 * n, "lgd_ops: corrupt level index (events of image ",
                b, ": [", start[b], ", ", start[b + 1], "))");
    for (int64_t e = start[b]; e < start[b + 1]; ++e) {
      const int64_t id = ids[e], box = id / 2;
      TORCH_CHECK(id >= 0 && id < 2 * n, "lgd_ops: corrupt level index (event id ", id, ")");
      if (id % 2) continue;
      const CellRange r = out.cells[box];
      TORCH_CHECK(image[box] < 0 && r.x0 >= 0 && r.x0 <= r.x1 && r.x1 < w && r.y0 >= 0 && r.y0 <= r.y1 && r.y1 < h,
                  "lgd_ops: corrupt level index (box ", box, " on a ", h, " x ", w, " level)");
      image[box] = b;
      ++out.start[b + 1];
      out.area[b] += r.count();
    }
  }
  for (int64_t b = 0; b < batch; ++b) out.start[b + 1] += out.start[b];
  std::vector<int64_t> fill(out.start.begin(), out.start.end() - 1), slot(n, 0);
  out.order.resize(out.start[batch]);
  for (int64_t i = 0; i < n; ++i) {
    if (image[i] < 0) continue;
    slot[i] = fill[image[i]] - out.start[image[i]];
    out.order[fill[image[i]]++] = i;
  }
  out.events.reserve(2 * out.order.size());
  out.row_start.assign(batch + 1, 0);
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t e = start[b]; e < start[b + 1]; ++e) {
      const int64_t box = ids[e] / 2;
      const bool top = ids[e] % 2 == 0;
      TORCH_CHECK(image[box] == b, "lgd_ops: corrupt level index (box ", box, " in image ", b, ")");
      const CellRange r = out.cells[box];
      out.events.push_back({r.x0, r.x1, int32_t(slot[box]), top});
      add_to_rows(out, b, int64_t(out.events.size()) - 1, top ? r.y0 : r.y1 + 1);
    }
    out.row_start[b + 1] = int64_t(out.rows.size());
  }
  return out;
}

// The plan of a call: from its level index when given (checked by check_level_index), else from the boxes.
inline BoxPlan box_plan(const at::Tensor& boxes, const at::Tensor& batch_idx, const std::optional<at::Tensor>& index,
                        int64_t batch, int64_t in_h, int64_t in_w, int64_t h, int64_t w) {
  if (index.has_value()) return plan_from_index(*index, boxes.size(0), batch, h, w);
  return plan_from_boxes(boxes, batch_idx, batch, in_h, in_w, h, w);
}

// Where element (b, c, j, i) of a [B, C, H, W] map lives: b * sb + c * sc + j * sh + i * sw.
struct MapLayout {
  int64_t sb, sc, sh, sw;
  bool channels_last;
};

// The layout the kernels read or write a map in without a copy: NCHW-contiguous or channels_last.
inline bool kernel_layout(const at::Tensor& x) {
  return x.is_contiguous() || x.is_contiguous(at::MemoryFormat::ChannelsLast);
}

inline MapLayout layout_of(const at::Tensor& x) {
  // A tensor contiguous in both formats (C == 1 or H == W == 1) takes the NCHW path.
  return {x.stride(0), x.stride(1), x.stride(2), x.stride(3), !x.is_contiguous()};
}

// Whether an event row of the sweeps (cpu_box_sweep.inc) goes through a row prefix (cost ~W per channel, then
// O(1) per event) rather than each event's own columns (cost ~kEventCost + width per event and channel).
constexpr int64_t kEventCost = 12;

constexpr int kBlockCL = 32;       // channels per block of a channels_last map
constexpr int kBlockCLWide = 128;  // ... while the images have enough of them for every thread
constexpr int kBlockNCHW = 8;  // planes per block of an NCHW map with many events for its size
constexpr int64_t kCellsPerEvent = 512;

// The blocks of one image: C / cb blocks of cb channels, then the C % cb remaining channels one by one.
// channels_last: cb = kBlockCLWide while B * C / kBlockCLWide blocks keep `threads` threads busy, else kBlockCL:
// a block reads cb channels of each position at a stride of C, and 128 fp32 channels (512 contiguous bytes) suit
// the hardware prefetchers better than 32 (fp32 pool and fill faster; bfloat16 the same). The block's state,
// 2 W cb accumulators, stays in L2.
// NCHW: kBlockNCHW planes per block (transposed into the [i][c] state, so event rows run across channels) once
// an image has more than one event per kCellsPerEvent cells of the level, else one plane per block: a
// contiguous stream is faster while events are rare, and with many events the event rows' work across 8
// channels at once outweighs the transposes (from a few boxes per image on the finest levels, from one box on
// the coarse ones).
// channels_last blocks with more than one event per kCellsPerEvent cells keep integral rows (cpu_box_sweep.inc:
// IR): every event then reads two positions whatever its width and no event row needs a row prefix; with rarer
// events the column sums' cheaper row pass wins.
struct Blocks {
  int64_t C, full, per_image;
  int64_t most;  // boxes of the image with the most (sizes the kernels' per-box scratch)
  int cb;
  bool integral_rows;  // channels_last blocks sweep with integral rows (cpu_box_sweep.inc: IR; box_fill: float maps)
  Blocks(int64_t channels, bool channels_last, const BoxPlan& plan, int64_t H, int64_t W, int threads)
      : C(channels) {
    const int64_t images = int64_t(plan.start.size()) - 1;
    most = 0;
    for (int64_t b = 0; b < images; ++b) most = std::max(most, plan.start[b + 1] - plan.start[b]);
    if (channels_last)
      cb = images * (channels / kBlockCLWide) >= threads && channels >= kBlockCLWide ? kBlockCLWide : kBlockCL;
    else
      cb = 2 * most * kCellsPerEvent > H * W ? kBlockNCHW : 1;
    integral_rows = channels_last && cb > 1 && 2 * most * kCellsPerEvent > H * W;
    full = channels / cb;
    per_image = full + channels % cb;
  }
  // Blocks per parallel_for task: a task of at least ATen's grain of cells (and events), so a small map runs on
  // one thread instead of waking the pool for a few hundred cells (a sleeping thread costs more than the work).
  int64_t grain(int64_t H, int64_t W) const {
    const int64_t work = int64_t(cb) * (H * W + 2 * most);
    return std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(1, work));
  }
  // (image, first channel, whether it is a full block) of block blk
  void at(int64_t blk, int64_t* b, int64_t* c0, bool* wide) const {
    *b = blk / per_image;
    const int64_t q = blk % per_image;
    *wide = q < full;
    *c0 = *wide ? q * cb : full * cb + (q - full);
  }
};

}  // namespace lgd_ops
