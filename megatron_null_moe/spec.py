"""Turn any Megatron GPT layer or decoder-block spec into its null-expert version.

Every MoE layer in the spec becomes a NullExpertMoELayer with a NullExpertRouter; nothing
else changes (attention, norms, dense layers, experts, shared experts stay as they were).
"""

import dataclasses
import functools
from typing import Any

from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_null_moe.config import NullExpertConfig
from megatron_null_moe.layer import NullExpertMoELayer
from megatron_null_moe.router import NullExpertRouter


def with_null_experts(spec: Any, null_config: NullExpertConfig) -> Any:
    """A copy of ``spec`` (ModuleSpec, TransformerBlockSubmodules, partial, ...) whose MoE
    layers route over null experts. MoE layers appear in 0.19 specs both as
    ``ModuleSpec(module=MoELayer, ...)`` and as ``functools.partial(MoELayer, ...)``."""
    if isinstance(spec, ModuleSpec):
        if _is_moe_layer(spec.module):
            return dataclasses.replace(
                spec, module=NullExpertMoELayer,
                submodules=_null_submodules(spec.submodules, null_config),
            )
        return dataclasses.replace(spec, submodules=with_null_experts(spec.submodules, null_config))
    if isinstance(spec, functools.partial) and _is_moe_layer(spec.func):
        keywords = dict(spec.keywords)
        keywords["submodules"] = _null_submodules(keywords.get("submodules"), null_config)
        return functools.partial(NullExpertMoELayer, *spec.args, **keywords)
    if isinstance(spec, functools.partial):
        keywords = {k: with_null_experts(v, null_config) for k, v in spec.keywords.items()}
        return functools.partial(spec.func, *spec.args, **keywords)
    if dataclasses.is_dataclass(spec) and not isinstance(spec, type):
        changes = {f.name: with_null_experts(getattr(spec, f.name), null_config)
                   for f in dataclasses.fields(spec) if f.init}
        return dataclasses.replace(spec, **changes)
    if isinstance(spec, (list, tuple)):
        return type(spec)(with_null_experts(item, null_config) for item in spec)
    return spec


def _is_moe_layer(module: Any) -> bool:
    if not (isinstance(module, type) and issubclass(module, MoELayer)):
        return False
    if module not in (MoELayer, NullExpertMoELayer):
        raise ValueError(
            f"with_null_experts: the spec's MoE layer is {module.__qualname__}, a subclass of "
            "MoELayer this plugin cannot swap safely; allowed: MoELayer or NullExpertMoELayer."
        )
    return True


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
