"""NullExpertMoELayer: Megatron's MoELayer with a null-aware token dispatcher.

MoELayer builds its router from ``MoESubmodules`` but picks its dispatcher from the string
``moe_token_dispatcher_type``; this subclass only swaps in the dispatcher that sends real
assignments alone (``dispatcher_class``, which a subclass may override). Router, experts and
shared experts stay whatever the spec says.
"""

from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

from megatron_null_moe.dispatcher import NULL_AWARE_DISPATCHERS


class NullExpertMoELayer(MoELayer):
    """MoELayer whose tokens may use anywhere from 0 to K real experts."""

    def __init__(self, config, submodules=None, layer_number=None, pg_collection=None,
                 is_mtp_layer=False, name=None):
        if pg_collection is None:
            pg_collection = get_default_pg_collection()
        super().__init__(config=config, submodules=submodules, layer_number=layer_number,
                         pg_collection=pg_collection, is_mtp_layer=is_mtp_layer, name=name)
        self.token_dispatcher = self.build_token_dispatcher(config, pg_collection)
        if self.use_shared_expert and self.shared_expert_overlap:
            self.token_dispatcher.set_shared_experts(self.shared_experts)
        if hasattr(self, "_training_token_dispatcher"):
            self._training_token_dispatcher = self.token_dispatcher

    def build_token_dispatcher(self, config, pg_collection):
        """The dispatcher ``dispatcher_class`` names, built as MoELayer builds its own."""
        return self.dispatcher_class(config)(
            self.num_local_experts, self.local_expert_indices, config=config,
            pg_collection=pg_collection,
        )

    @staticmethod
    def dispatcher_class(config):
        """The null-aware version of ``moe_token_dispatcher_type``'s dispatcher."""
        dispatcher_type = config.moe_token_dispatcher_type
        if dispatcher_type not in NULL_AWARE_DISPATCHERS:
            raise ValueError(
                f"moe_token_dispatcher_type (--moe-token-dispatcher-type)={dispatcher_type!r} "
                f"has no null-aware version; allowed: {', '.join(NULL_AWARE_DISPATCHERS)}."
            )
        return NULL_AWARE_DISPATCHERS[dispatcher_type]
