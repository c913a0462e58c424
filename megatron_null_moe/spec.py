"""Turn any Megatron GPT layer or decoder-block spec into its null-expert version.

Every MoE layer in the spec becomes a NullExpertMoELayer with a NullExpertRouter; nothing
else changes (attention, norms, dense layers, experts, shared experts stay as they were).
The expert path picks the layer and the experts: "megatron" keeps the spec's experts with
the null-aware version of Megatron's dispatcher; "lean" uses LeanNullExpertMoELayer and
LeanGroupedExperts (device-side sort, grouped GEMMs; buffers of real rows or, with no host
wait, of the worst case: NullExpertConfig.lean_buffer).
"""

import dataclasses
import functools
from typing import Any

from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_null_moe.config import LEAN_BUFFER_FLAG, NullExpertConfig
from megatron_null_moe.layer import NullExpertMoELayer
from megatron_null_moe.lean.experts import LeanGroupedExperts
from megatron_null_moe.lean.layer import LeanNullExpertMoELayer
from megatron_null_moe.router import NullExpertRouter


def _megatron_path(submodules: MoESubmodules):
    return NullExpertMoELayer, submodules


def _lean_path(submodules: MoESubmodules):
    return LeanNullExpertMoELayer, dataclasses.replace(submodules, experts=LeanGroupedExperts)


# Expert path name (--moe-null-expert-path) -> (MoE layer class, its submodules).
EXPERT_PATHS = {"megatron": _megatron_path, "lean": _lean_path}


def with_null_experts(spec: Any, null_config: NullExpertConfig, *,
                      expert_path: str = "megatron") -> Any:
    """A copy of ``spec`` (ModuleSpec, TransformerBlockSubmodules, partial, ...) whose MoE
    layers route over null experts; every part without an MoE layer is returned as the same
    object. MoE layers appear in 0.19 specs both as ``ModuleSpec(module=MoELayer, ...)`` and
    as ``functools.partial(MoELayer, ...)``. ``expert_path``: a key of EXPERT_PATHS."""
    if expert_path not in EXPERT_PATHS:
        raise ValueError(
            f"with_null_experts: expert_path (--moe-null-expert-path)={expert_path!r}; "
            f"allowed: {', '.join(EXPERT_PATHS)}.")
    if expert_path != "lean" and null_config.lean_buffer != "auto":
        raise ValueError(
            f"with_null_experts: lean_buffer ({LEAN_BUFFER_FLAG})={null_config.lean_buffer!r} "
            f"applies to expert_path 'lean' only; allowed with {expert_path!r}: 'auto'.")
    convert = functools.partial(with_null_experts, null_config=null_config,
                                expert_path=expert_path)
    if isinstance(spec, ModuleSpec) and _is_moe_layer(spec.module):
        layer, submodules = _null_layer(spec.submodules, null_config, expert_path)
        return dataclasses.replace(spec, module=layer, submodules=submodules)
    if isinstance(spec, functools.partial) and _is_moe_layer(spec.func):
        layer, submodules = _null_layer(spec.keywords.get("submodules"), null_config,
                                        expert_path)
        return functools.partial(layer, *spec.args, **dict(spec.keywords, submodules=submodules))
    if isinstance(spec, functools.partial):
        keywords = {k: convert(v) for k, v in spec.keywords.items()}
        if _same(spec.keywords, keywords):
            return spec
        return functools.partial(spec.func, *spec.args, **keywords)
    if dataclasses.is_dataclass(spec) and not isinstance(spec, type):
        fields = {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec) if f.init}
        changed = {k: convert(v) for k, v in fields.items()}
        return spec if _same(fields, changed) else dataclasses.replace(spec, **changed)
    if isinstance(spec, (list, tuple)):
        items = [convert(item) for item in spec]
        return spec if all(a is b for a, b in zip(spec, items)) else type(spec)(items)
    return spec


def _same(before: dict, after: dict) -> bool:
    return all(after[key] is value for key, value in before.items())


def _is_moe_layer(module: Any) -> bool:
    if not (isinstance(module, type) and issubclass(module, MoELayer)):
        return False
    if module not in (MoELayer, NullExpertMoELayer, LeanNullExpertMoELayer):
        raise ValueError(
            f"with_null_experts: the spec's MoE layer is {module.__qualname__}, a subclass of "
            "MoELayer this plugin cannot swap safely; allowed: MoELayer, NullExpertMoELayer "
            "or LeanNullExpertMoELayer."
        )
    return True


def _null_layer(submodules, null_config: NullExpertConfig, expert_path: str):
    return EXPERT_PATHS[expert_path](_null_submodules(submodules, null_config))


def _null_submodules(submodules, null_config: NullExpertConfig):
    if submodules is None:
        raise ValueError("with_null_experts: an MoE layer spec without MoESubmodules.")
    router = submodules.router
    base = router.func if isinstance(router, functools.partial) else router
    if base not in (TopKRouter, NullExpertRouter):
        raise ValueError(
            f"with_null_experts: the MoE router is {getattr(base, '__qualname__', base)}; "
            "allowed: TopKRouter (replaced by NullExpertRouter) or NullExpertRouter."
        )
    return dataclasses.replace(
        submodules, router=functools.partial(NullExpertRouter, null_config=null_config)
    )
