"""LazyConfig files for lgd-train (lgd.train_net); load them with detectron2.config.LazyConfig.load(path)."""
