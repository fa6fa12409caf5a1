"""Exact path-kernel influences: the analysis (kernel), its quadrature along each segment
(quadrature), where ReLU-like kinks lie on a segment (kinks) and the per-test-point
evaluations the adaptive rule needs (points)."""

from attrib.analyzer.path_kernel.kernel import (
    TERMS,
    PathKernelResult,
    gaps_within_bound,
    path_kernel,
    release_freed_memory,
    step_stage_names,
)
from attrib.analyzer.path_kernel.quadrature import ADAPTIVE, MAX_NODES, quadrature_rule

__all__ = ["ADAPTIVE", "MAX_NODES", "TERMS", "PathKernelResult", "gaps_within_bound",
           "path_kernel", "quadrature_rule", "release_freed_memory", "step_stage_names"]
