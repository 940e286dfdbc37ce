"""Reading `.pkl` weight files without running code from them.

detectron2's model zoo and ImageNet backbones are `.pkl` files, which detectron2 reads with plain
pickle.load: a crafted file runs any function it names while it is read. Weight files only need containers,
numbers, strings and numpy arrays, so load_weights_pickle resolves only the globals those are rebuilt from
(ALLOWED) and refuses any other global before it is called, naming the file and the global.
"""
import importlib
import pickle

__all__ = ["ALLOWED", "UnsafePickleError", "load_weights_pickle"]

# the globals a pickled dict of numpy arrays needs: containers, numpy arrays (all pickle protocols: _reconstruct,
# _frombuffer for protocol 5), dtypes and scalars, and _codecs.encode (bytes in protocol 2, Python 2 files)
ALLOWED = frozenset({
    ("collections", "OrderedDict"),
    ("_codecs", "encode"),
    ("numpy", "dtype"),
    ("numpy", "ndarray"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy._core.numeric", "_frombuffer"),
})
# numpy < 2's names, in the files detectron2 publishes, read as the installed numpy's
_RENAMED = {"numpy.core.multiarray": "numpy._core.multiarray", "numpy.core.numeric": "numpy._core.numeric"}


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle that names a global no weight file needs; `name` is that global, module.qualname."""

    def __init__(self, path, name):
        super().__init__(f"{path} needs {name}, which is not weights: refused before anything in it ran (a .pkl "
                         "may hold only dicts, lists, tuples, numbers, strings and numpy arrays)")
        self.path, self.name = path, name


class _WeightsUnpickler(pickle.Unpickler):
    def __init__(self, file, path):
        super().__init__(file, encoding="latin1")  # Python 2 pickles' numpy buffers are latin-1 str
        self.path = path

    def find_class(self, module, name):
        module = _RENAMED.get(module, module)
        if (module, name) not in ALLOWED:
            raise UnsafePickleError(self.path, f"{module}.{name}")
        return getattr(importlib.import_module(module), name)


def load_weights_pickle(path):
    """The object pickled in `path`, built only from ALLOWED globals; UnsafePickleError (naming `path` and the
    global) when the pickle names any other."""
    with open(path, "rb") as f:
        return _WeightsUnpickler(f, path).load()
