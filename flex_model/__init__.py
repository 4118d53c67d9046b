"""flex_model: full, unsharded activations and gradients of sharded models, through hooks.

``FlexModel`` wraps any ``nn.Module``; ``HookFunction`` names a submodule
and an editing function. See README.md for the map of the package.
"""
from torch import nn

from flex_model.collectives import HookFailure
from flex_model.firing import Registration
from flex_model.flex_model import FlexModel, HookHandle
from flex_model.hook_function import EditingFunction, HookFunction, HookType, Scope, ShardInfo, ShardwiseEdit
from flex_model.layout import FAIRSCALE_ORDER, MEGATRON_ORDER, ParallelLayout
from flex_model.routing import Router, RouteActivation, RouteParameters
from flex_model.ablation import Ablation, RunningMean
from flex_model.expansion import Expanded, ExpandedUnits, Expansion, expand
from flex_model.activations import ActivationDataset, ActivationReader, ShardCorrupted, dump_activations
from flex_model.cache import ActivationCache, run_with_cache
from flex_model.hook_points import HookPoint
from flex_model.patching import Sweep, patching_sweep
from flex_model.generation import Generation, GenerationContext, StepCaptures, generate, generation_context


class DummyModule(nn.Module):
    """An identity module: place it anywhere in a model to get a hook point there."""

    def forward(self, x):
        return x


__all__ = ["FlexModel", "HookFunction", "HookHandle", "HookType", "Registration", "DummyModule", "EditingFunction",
           "ShardwiseEdit", "ShardInfo", "ParallelLayout", "FAIRSCALE_ORDER", "MEGATRON_ORDER", "HookFailure",
           "Router", "RouteActivation", "RouteParameters", "Ablation", "RunningMean",
           "Expanded", "ExpandedUnits", "Expansion", "expand",
           "dump_activations", "ActivationReader", "ActivationDataset", "ShardCorrupted", "Scope", "HookPoint",
           "run_with_cache", "ActivationCache", "patching_sweep", "Sweep",
           "generate", "Generation", "GenerationContext", "StepCaptures", "generation_context"]
__version__ = "0.2.0"
