"""What a model does to its logits after its lm_head, read per model family, so chunked KD matches model(...).logits.

Chunked KD (losses.chunked_kd_loss) makes logits itself, ``hidden @ lm_head.weight.T``, a chunk at a time. Most families
stop there, but some apply one more elementwise step in their ``ForCausalLM.forward``, and skipping it trains against
different logits than the model samples from. Checked against transformers 5.24's modeling code:

    Gemma 2, Gemma 3 (text), Gemma 3n, Gemma 4, VaultGemma, NanoChat, PaliGemma
                          tanh(logits / c) * c, c = final_logit_softcapping of the text config, when it is set
    Gemma3ForConditionalGeneration
                          nothing: unlike Gemma3ForCausalLM it ignores final_logit_softcapping (null in every Gemma 3
                          checkpoint anyway)
    Cohere, Cohere 2, Cohere 2 MoE, Cohere Compass
                          logits * logit_scale
    Granite, Granite MoE (and their SWA, hybrid, shared variants)
                          logits / logits_scaling
    HyperCLOVA X          logits * logits_scaling (the same config name as Granite's, the opposite operation)
    Falcon H1             logits * lm_head_multiplier

Every other architecture must be in IDENTITY_ARCHITECTURES (its forward is ``logits = self.lm_head(hidden_states)``
with a bias-free head), or logit_transform refuses it: an architecture nobody has read could do anything.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import Tensor

from distillab.errors import UserError

# forward: `logits = self.lm_head(hidden_states)`, lm_head = nn.Linear(..., bias=False): read in transformers 5.24
IDENTITY_ARCHITECTURES: frozenset[str] = frozenset(
    {
        "ApertusForCausalLM",
        "ArceeForCausalLM",
        "BloomForCausalLM",
        "DbrxForCausalLM",
        "DeepseekV2ForCausalLM",
        "DeepseekV3ForCausalLM",
        "DiffLlamaForCausalLM",
        "Ernie4_5ForCausalLM",
        "Exaone4ForCausalLM",
        "FlexOlmoForCausalLM",
        "Gemma3ForConditionalGeneration",
        "GemmaForCausalLM",
        "Glm4ForCausalLM",
        "Glm4MoeForCausalLM",
        "GlmForCausalLM",
        "GPT2LMHeadModel",
        "GPTBigCodeForCausalLM",
        "GPTNeoForCausalLM",
        "GPTNeoXForCausalLM",
        "GptOssForCausalLM",
        "HeliumForCausalLM",
        "HunYuanDenseV1ForCausalLM",
        "HunYuanMoEV1ForCausalLM",
        "JambaForCausalLM",
        "JetMoeForCausalLM",
        "Lfm2ForCausalLM",
        "Lfm2MoeForCausalLM",
        "Llama4ForCausalLM",
        "LlamaForCausalLM",
        "MiniCPM3ForCausalLM",
        "MiniMaxForCausalLM",
        "Ministral3ForCausalLM",
        "MinistralForCausalLM",
        "MistralForCausalLM",
        "MixtralForCausalLM",
        "MptForCausalLM",
        "NemotronForCausalLM",
        "Olmo2ForCausalLM",
        "Olmo3ForCausalLM",
        "OlmoForCausalLM",
        "OlmoeForCausalLM",
        "PersimmonForCausalLM",
        "Phi3ForCausalLM",
        "Qwen2ForCausalLM",
        "Qwen2MoeForCausalLM",
        "Qwen3ForCausalLM",
        "Qwen3MoeForCausalLM",
        "Qwen3NextForCausalLM",
        "Qwen3_5ForCausalLM",
        "Qwen3_5MoeForCausalLM",
        "SeedOssForCausalLM",
        "SmolLM3ForCausalLM",
        "StableLmForCausalLM",
        "Starcoder2ForCausalLM",
        "ZambaForCausalLM",
        "Zamba2ForCausalLM",
    }
)
SOFTCAP_ARCHITECTURES: frozenset[str] = frozenset(
    {
        "Gemma2ForCausalLM",
        "Gemma3ForCausalLM",
        "Gemma3nForCausalLM",
        "Gemma3nForConditionalGeneration",
        "Gemma4ForCausalLM",
        "Gemma4ForConditionalGeneration",
        "NanoChatForCausalLM",
        "PaliGemmaForConditionalGeneration",
        "VaultGemmaForCausalLM",
    }
)
# architecture -> the config attribute its forward multiplies (or below: divides) the logits by
MULTIPLY_ARCHITECTURES: dict[str, str] = {
    "CohereForCausalLM": "logit_scale",
    "Cohere2ForCausalLM": "logit_scale",
    "Cohere2MoeForCausalLM": "logit_scale",
    "CohereCompassForCausalLM": "logit_scale",  # None -> 1.0 in its __init__
    "HyperCLOVAXForCausalLM": "logits_scaling",
    "FalconH1ForCausalLM": "lm_head_multiplier",
}
DIVIDE_ARCHITECTURES: dict[str, str] = {
    name: "logits_scaling"
    for name in (
        "GraniteForCausalLM",
        "GraniteSWAForCausalLM",
        "GraniteMoeForCausalLM",
        "GraniteMoeSWAForCausalLM",
        "GraniteMoeHybridForCausalLM",
        "GraniteMoeSharedForCausalLM",
    )
}
KNOWN_ARCHITECTURES: frozenset[str] = (
    IDENTITY_ARCHITECTURES | SOFTCAP_ARCHITECTURES | frozenset(MULTIPLY_ARCHITECTURES) | frozenset(DIVIDE_ARCHITECTURES)
)


def text_config(config):
    """The config of the model's text output: the nested text config of a multimodal config (Gemma 3 4B+, Gemma 3n,
    Gemma 4, PaliGemma, ...), the config itself otherwise. Read vocab_size, hidden_size etc. from this."""
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def identity(logits: Tensor) -> Tensor:
    return logits


def softcap(logits: Tensor, cap: float) -> Tensor:
    """Gemma's final softcap, in the same three steps as the model (so the same rounding)."""
    return torch.tanh(logits / cap) * cap


def multiply(logits: Tensor, factor: float) -> Tensor:
    return logits * factor


def divide(logits: Tensor, divisor: float) -> Tensor:
    return logits / divisor  # not * (1 / divisor): the model divides, and this stays bit-identical to it


def logit_transform(model_or_config) -> Callable[[Tensor], Tensor]:
    """The elementwise step the model applies after its lm_head, as a function of (..., V) logits.

    model_or_config: a loaded model (a peft wrapper is unwrapped; its class names the architecture, and its lm_head
    must have no bias, which hidden @ weight.T would drop), or a config whose ``architectures`` names one. Raises
    UserError for an architecture not read (see the module docstring) or a model whose head has a bias.
    """
    model = model_or_config.get_base_model() if hasattr(model_or_config, "get_base_model") else model_or_config
    if hasattr(model, "config"):  # a model
        architecture, config = type(model).__name__, model.config
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if getattr(head, "bias", None) is not None:
            raise UserError(
                f"{architecture}'s lm_head has a bias, which chunked KD (hidden @ lm_head.T) leaves out: "
                "set train.chunk_size = 0 for this model"
            )
    else:
        config = model
        if not getattr(config, "architectures", None):
            raise UserError("the config names no architecture: pass the model itself to logit_transform")
        architecture = config.architectures[0]
    if architecture in IDENTITY_ARCHITECTURES:
        return identity
    if architecture in SOFTCAP_ARCHITECTURES:
        cap = getattr(text_config(config), "final_logit_softcapping", None)
        return identity if cap is None else functools.partial(softcap, cap=float(cap))
    if architecture in MULTIPLY_ARCHITECTURES:
        factor = getattr(config, MULTIPLY_ARCHITECTURES[architecture])
        if factor is None and architecture == "CohereCompassForCausalLM":
            factor = 1.0
        return functools.partial(multiply, factor=float(factor))
    if architecture in DIVIDE_ARCHITECTURES:
        return functools.partial(divide, divisor=float(getattr(config, DIVIDE_ARCHITECTURES[architecture])))
    raise UserError(
        f"chunked KD does not know what {architecture} does to its logits after the lm_head (read and listed in "
        "distillab/logits.py: Llama, Qwen, Mistral, Phi-3, Gemma, Cohere, Granite and more); set train.chunk_size = 0 "
        "to use the model's own logits"
    )
