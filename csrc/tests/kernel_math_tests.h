// What the parts of the test_kernel_math ctest share: its failure counter and the parts' entry points.
#pragma once

// Counts a failure (and prints `what`) when ok is false; main() returns 1 if any was counted.
void expect(bool ok, const char* what);

// test_box_sweeps.cpp: the CUDA banded box sweeps, their row walk and launch shape.
void test_box_sweep_schedule();
