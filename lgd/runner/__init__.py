"""The runner: builds, checks, trains and evaluates a run from its config (detectron2's engine/defaults.py for
lgd). Every command (lgd-train, lgd-eval, lgd-export, lgd-demo, lgd-bench train) goes through it.

Layers, each importing only those before it: lgd.modeling < lgd.engine < lgd.methods < lgd.runner < lgd.tools.
"""
from .build import (build_model, build_optimizer, build_schedule, build_train_loader, build_trainer, data_seed,
                    fast_path, run_device)
from .checks import (RUN_FILES, apply_dataset_arguments, check_backend, check_output_dir, check_run_inputs,
                     set_num_classes)
from .export import export_student
from .cost import COST_FILE, read_cost, read_metrics, write_cost
from .launch import launch_cpu, launch_run
from .train import evaluate, method_stages, test, train, train_stages

__all__ = ["COST_FILE", "RUN_FILES", "apply_dataset_arguments", "build_model", "build_optimizer", "build_schedule",
           "build_train_loader", "build_trainer", "check_backend", "check_output_dir", "check_run_inputs",
           "data_seed", "evaluate", "export_student", "fast_path", "launch_cpu", "launch_run", "method_stages",
           "read_cost",
           "read_metrics", "run_device", "set_num_classes", "test", "train", "train_stages", "write_cost"]
