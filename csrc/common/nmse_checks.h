// Argument checks and sizes shared by the CPU and CUDA normalized_mse kernels.
#pragma once

#include <ATen/ATen.h>

namespace lgd_ops {

// Throws a c10::Error naming the level unless student/teacher are equal-length lists of equal,
// non-empty [B, C, H, W] maps of one dtype on one device.
inline void check_levels(at::TensorList student, at::TensorList teacher) {
  TORCH_CHECK(!student.empty() && student.size() == teacher.size(),
              "lgd_ops.normalized_mse: student and teacher must be equal-length non-empty lists, got ",
              student.size(), " and ", teacher.size());
  for (size_t l = 0; l < student.size(); ++l) {
    TORCH_CHECK(student[l].dim() == 4 && student[l].sizes() == teacher[l].sizes(), "lgd_ops.normalized_mse: level ",
                l, " student ", student[l].sizes(), " and teacher ", teacher[l].sizes(),
                " must be equal [B, C, H, W] shapes");
    TORCH_CHECK(student[l].numel() > 0, "lgd_ops.normalized_mse: level ", l, " is empty");
    TORCH_CHECK(student[l].scalar_type() == student[0].scalar_type() &&
                    teacher[l].scalar_type() == student[0].scalar_type(),
                "lgd_ops.normalized_mse: all maps must share one dtype");
    TORCH_CHECK(student[l].device() == student[0].device() && teacher[l].device() == student[0].device(),
                "lgd_ops.normalized_mse: all maps must be on one device");
  }
}

// Number of (b, c) planes over all levels; *total = number of elements.
inline int64_t count_planes(at::TensorList xs, int64_t* total) {
  int64_t planes = 0;
  *total = 0;
  for (const auto& x : xs) {
    planes += x.size(0) * x.size(1);
    *total += x.numel();
  }
  return planes;
}

}  // namespace lgd_ops
