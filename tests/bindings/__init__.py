"""The TensorRT path checked against the real TensorRT and pycuda bindings, without a GPU.

TensorRT's libraries cannot be installed here, but its compiled Python bindings can be loaded:
the ``tensorrt-cu12-bindings`` (10.x) and ``tensorrt-cu13-bindings`` (11.x) wheels import only a
handful of unversioned symbols from libnvinfer, libnvonnxparser and libnvinfer_plugin, and stub
libraries defining them (``wheels.build_stubs``, compiled with gcc) let ``import tensorrt`` give
the real pybind11 classes. pybind11 converts every argument before any C++ runs, so calling a
method on ``Cls.__new__(Cls)`` in a forked child says for certain whether the real binding
accepts the argument types (``replay``). pycuda builds only with a CUDA toolkit, so its driver
wrapper is read from the source package instead (``pycuda_source``).

* ``recorder``: a pytest plugin that records every TensorRT and pycuda name the GPU modules
  read or call while the emulated suites run (argument types, enum members, return types).
* ``sites``: the AST walk that lists the GPU call sites in those modules, so that none escapes.
* ``calls``: argument descriptors, their materialisation in a module, and the negative controls.
* ``wheels``: where the wheels and the sdist are cached (never in the repository) and how they
  are fetched (``python -m tests.bindings.wheels``, which ``.ci/run`` runs).
"""
