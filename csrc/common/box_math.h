// Per-box arithmetic shared by every kernel (CPU and CUDA) and by the ctest target.
// It fixes docs/method.md §1 in one place: which cells of a level grid a box covers.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define LGD_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define LGD_HOST_DEVICE inline
#endif

namespace lgd_ops {

// Inclusive cell rectangle [x0, x1] x [y0, y1] of a level grid; empty when x0 > x1 or y0 > y1.
struct CellRange {
  int32_t x0, x1, y0, y1;

  LGD_HOST_DEVICE bool empty() const { return x0 > x1 || y0 > y1; }
  LGD_HOST_DEVICE int64_t count() const {
    return empty() ? 0 : int64_t(x1 - x0 + 1) * int64_t(y1 - y0 + 1);
  }
};

LGD_HOST_DEVICE double clamp_coord(double v, double hi) {
  return v < 0.0 ? 0.0 : (v > hi ? hi : v);  // +-inf clamp to the edge like any other value
}

// Cells (i, j) of an h x w grid with x1*rx <= i <= x2*rx and y1*ry <= j <= y2*ry, where
// rx = w / in_w and ry = h / in_h (feature size over padded input size, not 1/stride).
// The box is first clamped to [0, in_w-1] x [0, in_h-1]; x2 <= x1 or y2 <= y1 (after the
// clamp) or any NaN coordinate covers nothing. All arithmetic is in double so that every
// backend (and the reference, which compares float64 grids) picks exactly the same cells.
LGD_HOST_DEVICE CellRange box_cells(double bx1, double by1, double bx2, double by2,
                                    int64_t in_h, int64_t in_w, int64_t h, int64_t w) {
  const CellRange none{0, -1, 0, -1};
  if (bx1 != bx1 || by1 != by1 || bx2 != bx2 || by2 != by2) return none;  // NaN
  if (h <= 0 || w <= 0 || in_h <= 0 || in_w <= 0) return none;
  const double x1 = clamp_coord(bx1, double(in_w - 1));
  const double y1 = clamp_coord(by1, double(in_h - 1));
  const double x2 = clamp_coord(bx2, double(in_w - 1));
  const double y2 = clamp_coord(by2, double(in_h - 1));
  if (x2 <= x1 || y2 <= y1) return none;
  const double rx = double(w) / double(in_w);
  const double ry = double(h) / double(in_h);
  const double fx1 = std::floor(x2 * rx), fy1 = std::floor(y2 * ry);
  CellRange r;
  r.x0 = int32_t(std::ceil(x1 * rx));
  r.y0 = int32_t(std::ceil(y1 * ry));
  r.x1 = int32_t(fx1 < double(w - 1) ? fx1 : double(w - 1));
  r.y1 = int32_t(fy1 < double(h - 1) ? fy1 : double(h - 1));
  return r;
}

}  // namespace lgd_ops
