"""LeanNullExpertMoELayer: the null-expert layer with the lean dispatcher and experts."""

from megatron_null_moe.layer import NullExpertMoELayer
from megatron_null_moe.lean.dispatcher import LeanTokenDispatcher
from megatron_null_moe.lean.support import validate_lean_layer


class LeanNullExpertMoELayer(NullExpertMoELayer):
    """NullExpertMoELayer whose dispatch waits on the host at most once (never with EP = 1 and
    the worst-case buffer, see LeanTokenDispatcher).

    Its spec's experts must be LeanGroupedExperts (``with_null_experts(...,
    expert_path="lean")`` sets both).
    """

    def __init__(self, config, submodules=None, layer_number=None, pg_collection=None,
                 is_mtp_layer=False, name=None):
        validate_lean_layer(config)
        super().__init__(config=config, submodules=submodules, layer_number=layer_number,
                         pg_collection=pg_collection, is_mtp_layer=is_mtp_layer, name=name)

    @staticmethod
    def dispatcher_class(config):
        return LeanTokenDispatcher

    def build_token_dispatcher(self, config, pg_collection):
        """LeanTokenDispatcher with the buffer setting of the router's NullExpertConfig."""
        return LeanTokenDispatcher(
            self.num_local_experts, self.local_expert_indices, config=config,
            pg_collection=pg_collection, lean_buffer=self.router.null_config.lean_buffer)
