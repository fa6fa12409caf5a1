"""`attrib.analyze`: the analyses over a recorded run, one function each."""

from attrib.analyzer.checkpoint_methods import grad_cos, grad_dot, tracin
from attrib.analyzer.path_kernel import PathKernelResult, path_kernel, quadrature_rule
from attrib.analyzer.results import save

__all__ = ["PathKernelResult", "grad_cos", "grad_dot", "path_kernel", "quadrature_rule", "save",
           "tracin"]
