// Argument checks every box kernel (CPU and CUDA) runs before touching memory, so a direct
// torch.ops.lgd_ops call with bad shapes raises instead of reading out of bounds.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace lgd_ops {

// Checks the box arguments every box op takes; throws a c10::Error naming the argument.
inline void check_box_args(const at::Tensor& boxes, const at::Tensor& batch_idx, int64_t in_h,
                           int64_t in_w, const at::Tensor& like, const char* like_name) {
  TORCH_CHECK(boxes.dim() == 2 && boxes.size(1) == 4, "lgd_ops: boxes must be [N, 4], got ",
              boxes.sizes());
  TORCH_CHECK(at::isFloatingType(boxes.scalar_type()), "lgd_ops: boxes must be floating point, got ",
              boxes.scalar_type());
  TORCH_CHECK(batch_idx.dim() == 1 && batch_idx.size(0) == boxes.size(0),
              "lgd_ops: batch_idx must be [N] with N = boxes.size(0) = ", boxes.size(0), ", got ",
              batch_idx.sizes());
  TORCH_CHECK(batch_idx.scalar_type() == at::kLong, "lgd_ops: batch_idx must be int64, got ",
              batch_idx.scalar_type());
  TORCH_CHECK(in_h > 0 && in_w > 0, "lgd_ops: image_size must be positive, got (", in_h, ", ",
              in_w, ")");
  TORCH_CHECK(boxes.device() == like.device() && batch_idx.device() == like.device(),
              "lgd_ops: boxes, batch_idx and ", like_name, " must be on one device");
}

// Checks a box op's level index (lgd_ops._boxes.level_index) of n boxes over `batch` images, when given: its size
// alone ties it to (n, batch), so this reads no value (no device sync) and a stale index from another batch fails.
inline void check_level_index(const std::optional<at::Tensor>& index, int64_t n, int64_t batch,
                              const at::Tensor& like) {
  if (!index.has_value()) return;
  const at::Tensor& t = *index;
  TORCH_CHECK(t.dim() == 1 && t.numel() == 8 * n + batch + 1, "lgd_ops: index must be a level index of ", n,
              " boxes over ", batch, " images (8 * N + batch + 1 = ", 8 * n + batch + 1, " entries), got shape ",
              t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kInt, "lgd_ops: index must be int32, got ", t.scalar_type());
  TORCH_CHECK(t.device() == like.device(), "lgd_ops: index must be on ", like.device(), ", got ", t.device());
  TORCH_CHECK(t.is_contiguous(), "lgd_ops: index must be contiguous");
}

}  // namespace lgd_ops
