"""lgd's training benchmarks (`lgd-bench train`): an LGD step against the baseline's, and each method's cost.
They build their runs through lgd.runner, as lgd-train does, so what they time is what users train."""
