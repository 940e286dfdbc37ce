// CPU-side preparation shared by the box kernels: each box's cell range on the level grid, the
// boxes grouped by image (a (b, c) plane visits only its own image's boxes), and each image's
// row events for the kernels' top-to-bottom sweep over a plane.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <vector>

#include "box_checks.h"
#include "box_math.h"

namespace lgd_ops {

// A box enters the sweep at row y0 (top) and leaves before row y1 + 1 (bottom).
struct RowEvent {
  int32_t row;
  bool top;
  int64_t box;  // box id
};

struct ImageBoxes {
  std::vector<CellRange> cells;  // per box, in input order
  std::vector<int64_t> order;    // box ids, grouped by image, input order inside an image
  std::vector<int64_t> start;    // boxes of image b: order[start[b] .. start[b + 1])
  std::vector<int64_t> area;     // total cells covered by image b's boxes (overlaps counted twice)
  std::vector<RowEvent> events;  // image b: events[2 * start[b] .. 2 * start[b + 1]), sorted by row
};

// Boxes whose batch index is outside [0, batch) cover nothing (the Python API rejects them first).
inline ImageBoxes index_boxes(const at::Tensor& boxes, const at::Tensor& batch_idx, int64_t batch,
                              int64_t in_h, int64_t in_w, int64_t h, int64_t w) {
  const int64_t n = boxes.size(0);
  const at::Tensor bx = boxes.to(at::kDouble).contiguous();
  const at::Tensor bi = batch_idx.contiguous();
  const double* b = bx.data_ptr<double>();
  const int64_t* img = bi.data_ptr<int64_t>();
  ImageBoxes out;
  out.cells.resize(n);
  out.order.resize(n);
  out.start.assign(batch + 1, 0);
  out.area.assign(batch, 0);
  for (int64_t i = 0; i < n; ++i) {
    const bool valid = img[i] >= 0 && img[i] < batch;
    out.cells[i] = valid ? box_cells(b[4 * i], b[4 * i + 1], b[4 * i + 2], b[4 * i + 3], in_h,
                                     in_w, h, w)
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
  for (int64_t b = 0; b < batch; ++b) {
    const auto first = out.events.end() - out.events.begin();
    for (int64_t k = out.start[b]; k < out.start[b + 1]; ++k) {
      const CellRange r = out.cells[out.order[k]];
      out.events.push_back({r.y0, true, out.order[k]});
      out.events.push_back({r.y1 + 1, false, out.order[k]});
    }
    std::stable_sort(out.events.begin() + first, out.events.end(),
                     [](const RowEvent& a, const RowEvent& e) { return a.row < e.row; });
  }
  return out;
}

}  // namespace lgd_ops
