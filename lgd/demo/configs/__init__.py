"""The demo's LazyConfig file, for lgd-demo and lgd-train --config-file; load it with LazyConfig.load(path)."""
