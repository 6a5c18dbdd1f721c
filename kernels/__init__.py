"""fastgpt's hot-path ops, imported as `fastgpt.kernels`. Each runs a Triton kernel or its PyTorch reference,
as the backend says.

This folder sits at the top of the repository, and setuptools installs it as `fastgpt.kernels`
(pyproject.toml's package-dir; a wheel puts nothing else at the top of site-packages). From the
repository's root, though, Python also finds this folder under the bare name `kernels`, which is the import
name of Hugging Face's `kernels` package (transformers imports it). Imported under that name, this file
steps aside: it loads whatever owns `kernels` elsewhere on sys.path in its place, or fails as if nothing did.
"""

if __name__ != "fastgpt.kernels":
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _elsewhere = [p for p in sys.path if os.path.abspath(p or os.curdir) != _root]
    _spec = importlib.machinery.PathFinder.find_spec(__name__, _elsewhere)
    if _spec is None or _spec.loader is None:
        raise ModuleNotFoundError(f"No module named {__name__!r} (fastgpt's ops are fastgpt.kernels)", name=__name__)
    _module = importlib.util.module_from_spec(_spec)
    sys.modules[__name__] = _module  # the import statement returns what sys.modules holds when this file ends
    _spec.loader.exec_module(_module)
else:
    from fastgpt.kernels.attention import causal_attention
    from fastgpt.kernels.dispatch import backend, get_backend, set_backend
    from fastgpt.kernels.layer_norm import add_layer_norm, layer_norm
    from fastgpt.kernels.linear_cross_entropy import linear_cross_entropy
    from fastgpt.kernels.linear_gelu import linear_gelu

    __all__ = ["add_layer_norm", "backend", "causal_attention", "get_backend", "layer_norm", "linear_cross_entropy",
               "linear_gelu",
               "set_backend"]
