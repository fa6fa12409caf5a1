"""`attrib.analyze`: the analyses over a recorded run, one function each."""

from attrib.analyzer.checkpoint_methods import grad_cos, grad_dot, tracin
from attrib.analyzer.linear_response import LinearResponseResult, linear_response
from attrib.analyzer.path_kernel import PathKernelResult, path_kernel, quadrature_rule
from attrib.analyzer.results import save
from attrib.analyzer.stages import StageReport, agreement, stage_report, stages

__all__ = ["LinearResponseResult", "PathKernelResult", "StageReport", "agreement", "grad_cos",
           "grad_dot", "linear_response", "path_kernel", "quadrature_rule", "save",
           "stage_report", "stages", "tracin"]
