// The cache behind the box kernels' plans (cpu_boxes.h: BoxPlan; cuda_boxes.cuh: CudaBoxPlan, CudaEventPlan).
// A plan depends only on (boxes, batch_idx) and a few sizes, and the ops run on the same boxes at every level,
// forward and backward, so each plan is built once and then looked up.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <utility>
#include <vector>

namespace lgd_ops {

// One cache per (Plan, N): N sizes complete the key. An entry is reused only while both tensors are alive,
// unchanged (same TensorImpl, data pointer and version counter: an in-place edit, or a new tensor at a
// recycled address, misses) and the sizes match. Inference tensors (no version counter) are never cached.
// kEntries entries, the oldest inserted evicted first; entries of dead tensors are dropped at the next lookup.
template <typename Plan, size_t N>
class PlanCache {
 public:
  static PlanCache& instance() {
    static PlanCache cache;
    return cache;
  }

  template <typename Build>
  std::shared_ptr<const Plan> get(const at::Tensor& boxes, const at::Tensor& batch_idx, const int64_t (&dims)[N],
                                  Build&& build) {
    if (boxes.is_inference() || batch_idx.is_inference()) return std::make_shared<const Plan>(build());
    const int64_t boxes_version = boxes._version(), batch_version = batch_idx._version();
    {
      std::lock_guard<std::mutex> lock(mutex_);
      for (auto it = entries_.begin(); it != entries_.end();) {
        if (it->boxes.expired() || it->batch_idx.expired()) {
          it = entries_.erase(it);
          continue;
        }
        const auto b = it->boxes.lock(), i = it->batch_idx.lock();
        if (b.get() == boxes.unsafeGetTensorImpl() && i.get() == batch_idx.unsafeGetTensorImpl() &&
            it->boxes_data == boxes.data_ptr() && it->batch_data == batch_idx.data_ptr() &&
            it->boxes_version == boxes_version && it->batch_version == batch_version &&
            std::equal(dims, dims + N, it->dims))
          return it->plan;
        ++it;
      }
    }
    // Built outside the lock; the versions read before building, so an edit made meanwhile misses next time.
    auto plan = std::make_shared<const Plan>(build());
    Entry e{Weak(boxes.getIntrusivePtr()), Weak(batch_idx.getIntrusivePtr()), boxes.data_ptr(),
            batch_idx.data_ptr(), boxes_version, batch_version, {}, plan};
    std::copy(dims, dims + N, e.dims);
    std::lock_guard<std::mutex> lock(mutex_);
    if (entries_.size() >= kEntries) entries_.erase(entries_.begin());
    entries_.push_back(std::move(e));
    return plan;
  }

 private:
  using Weak = c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>;
  struct Entry {
    Weak boxes, batch_idx;
    const void *boxes_data, *batch_data;
    int64_t boxes_version, batch_version;
    int64_t dims[N];
    std::shared_ptr<const Plan> plan;
  };
  static constexpr size_t kEntries = 32;

  std::mutex mutex_;
  std::vector<Entry> entries_;  // most recent last
};

// The plan of (boxes, batch_idx) with sizes dims, from PlanCache<Plan, N>; build() -> Plan makes it on a miss.
template <typename Plan, size_t N, typename Build>
std::shared_ptr<const Plan> cached_plan(const at::Tensor& boxes, const at::Tensor& batch_idx,
                                        const int64_t (&dims)[N], Build&& build) {
  return PlanCache<Plan, N>::instance().get(boxes, batch_idx, dims, std::forward<Build>(build));
}

}  // namespace lgd_ops
