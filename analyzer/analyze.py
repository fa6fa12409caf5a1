"""`attrib.analyze`: the analyses over a recorded run, one function each."""

from attrib.analyzer.path_kernel import PathKernelResult, path_kernel, quadrature_rule

__all__ = ["PathKernelResult", "path_kernel", "quadrature_rule"]
