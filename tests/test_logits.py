"""distillab.logits: chunked KD with the family's logit transform equals the loss on model(...).logits, for tiny real
models of every family whose logit path differs from Llama's (and Llama itself), values and gradients in float64."""

from __future__ import annotations

import pytest
import torch
import transformers

from distillab.errors import UserError
from distillab.logits import IDENTITY_ARCHITECTURES, KNOWN_ARCHITECTURES, logit_transform, text_config
from distillab.losses import TeacherDist, chunked_kd_loss, kd_loss
from tests.helpers import TINY_DIMS

VOCAB = 48
TINY = dict(vocab_size=VOCAB, **TINY_DIMS, head_dim=8, max_position_embeddings=64)

# family -> (config class, model class, the settings that make its transform matter at this size). Random tiny models
# have logits near 0, where a softcap of 30 or a scale near 1 is invisible: the settings push them into the range
# where skipping the transform changes the loss (checked by the last assert of the test).
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(final_logit_softcapping=0.7)),
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(final_logit_softcapping=0.7)),
    "cohere": ("CohereConfig", "CohereForCausalLM", dict(logit_scale=4.0)),
    "cohere2": ("Cohere2Config", "Cohere2ForCausalLM", dict(logit_scale=4.0)),
    "granite": ("GraniteConfig", "GraniteForCausalLM", dict(logits_scaling=0.25)),
    "granitemoe": (
        "GraniteMoeConfig",
        "GraniteMoeForCausalLM",
        dict(logits_scaling=0.25, num_local_experts=2, num_experts_per_tok=1, experts_implementation="eager"),
    ),  # the grouped-mm kernel has no float64
    "hyperclovax": ("HyperCLOVAXConfig", "HyperCLOVAXForCausalLM", dict(logits_scaling=4.0)),
}


def tiny_model(family):
    config_name, model_name, settings = FAMILIES[family]
    torch.manual_seed(0)
    config = getattr(transformers, config_name)(**TINY, initializer_range=0.5, **settings)
    return getattr(transformers, model_name)(config).double().eval()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_chunked_with_transform_equals_model_logits(family):
    model = tiny_model(family)
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, VOCAB, (2, 7), generator=g)
    mask = torch.rand(2, 7, generator=g) > 0.3
    teacher = TeacherDist(logits=torch.randn(2, 7, VOCAB, generator=g, dtype=torch.float64) * 3)
    params = [p for p in model.parameters() if p.requires_grad]

    want = kd_loss("jsd", model(input_ids=input_ids).logits, teacher, mask, temperature=1.3, beta=0.3)
    want_grads = torch.autograd.grad(want, params)

    transform = logit_transform(model)
    hidden = model.model(input_ids=input_ids).last_hidden_state  # (B, T, H), as train.hidden_states makes it
    weight = model.get_output_embeddings().weight  # (V, H)
    got = chunked_kd_loss(
        "jsd", hidden, weight, teacher, mask, chunk_size=3, temperature=1.3, beta=0.3, logit_transform=transform
    )
    got_grads = torch.autograd.grad(got, params)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    for p_got, p_want in zip(got_grads, want_grads):
        torch.testing.assert_close(p_got, p_want, rtol=1e-9, atol=1e-12)
    if family != "llama":  # the transform matters here: without it the loss is measurably wrong
        hidden = model.model(input_ids=input_ids).last_hidden_state
        plain = chunked_kd_loss("jsd", hidden, weight, teacher, mask, chunk_size=3, temperature=1.3, beta=0.3)
        assert abs(plain.item() - want.item()) > 1e-3 * abs(want.item())


def test_config_route_and_unknown_architectures():
    cohere = transformers.CohereConfig(**TINY, logit_scale=0.5, architectures=["CohereForCausalLM"])
    assert logit_transform(cohere)(torch.tensor([2.0])).item() == 1.0
    granite = transformers.GraniteConfig(**TINY, logits_scaling=8.0, architectures=["GraniteForCausalLM"])
    assert logit_transform(granite)(torch.tensor([2.0])).item() == 0.25
    no_cap = transformers.Gemma3TextConfig(**TINY, final_logit_softcapping=None, architectures=["Gemma3ForCausalLM"])
    assert logit_transform(no_cap)(torch.tensor([100.0])).item() == 100.0
    with pytest.raises(UserError, match="does not know what XLNetLMHeadModel does .* train.chunk_size = 0"):
        logit_transform(transformers.LlamaConfig(**TINY, architectures=["XLNetLMHeadModel"]))
    with pytest.raises(UserError, match="names no architecture"):
        logit_transform(transformers.LlamaConfig(**TINY))
    assert "PhiForCausalLM" not in KNOWN_ARCHITECTURES  # its lm_head has a bias
    assert {"LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM", "Phi3ForCausalLM"} <= IDENTITY_ARCHITECTURES


def test_a_head_with_a_bias_is_refused():
    config = transformers.PhiConfig(**{k: v for k, v in TINY.items() if k != "head_dim"})
    with pytest.raises(UserError, match="PhiForCausalLM's lm_head has a bias"):
        logit_transform(transformers.PhiForCausalLM(config))


def test_text_config_of_multimodal_configs():
    text = transformers.Gemma3TextConfig(**TINY, final_logit_softcapping=5.0)
    multimodal = transformers.Gemma3Config(text_config=text.to_dict(), architectures=["Gemma3ForConditionalGeneration"])
    assert text_config(multimodal).vocab_size == VOCAB and text_config(text) is text
    # Gemma3ForConditionalGeneration's forward ignores the text config's softcap (Gemma3ForCausalLM applies it)
    assert logit_transform(multimodal)(torch.tensor([100.0])).item() == 100.0
    gemma3n = transformers.Gemma3nConfig()
    assert text_config(gemma3n) is gemma3n.text_config
    gemma3n.architectures = ["Gemma3nForConditionalGeneration"]
    cap = gemma3n.text_config.final_logit_softcapping
    assert logit_transform(gemma3n)(torch.tensor([1e6])).item() == pytest.approx(cap)
