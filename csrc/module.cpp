// The Python module lgd_ops._C: importing it loads this library, whose static initializers
// register the lgd_ops schemas and kernels with the dispatcher. It defines no Python functions.
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
}
