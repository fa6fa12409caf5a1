"""`attrib.analyze`: the analyses over a recorded run, one function each."""

from attrib.analyzer.checkpoint_methods import grad_cos, grad_dot, tracin
from attrib.analyzer.influence_function import InfluenceResult, influence
from attrib.analyzer.linear_response import LinearResponseResult, linear_response
from attrib.analyzer.path_kernel import PathKernelResult, path_kernel, quadrature_rule
from attrib.analyzer.projected import projected_influence, test_gradients
from attrib.analyzer.results import save
from attrib.analyzer.shifts import (
                                    ablate,
                                    neuron_examples,
                                    save_tokens,
                                    token_enrichment,
                                    top_neurons,
)
from attrib.analyzer.stages import StageReport, agreement, stage_report, stages
from attrib.analyzer.trak import trak

__all__ = ["InfluenceResult", "LinearResponseResult", "PathKernelResult", "StageReport", "ablate",
           "agreement", "grad_cos", "grad_dot", "influence", "linear_response",
           "neuron_examples", "path_kernel", "projected_influence", "quadrature_rule", "save",
           "save_tokens", "stage_report", "stages", "test_gradients", "token_enrichment",
           "top_neurons", "tracin", "trak"]
