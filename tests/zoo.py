"""Small models built from the classes of Hugging Face transformers and timm, with
random weights and no download, and inputs for them.

timm needs torchvision, and transformers imports it where it is installed. The torchvision wheel on the test machines is built for a
CUDA torch and fails to import beside the CPU torch, so both are imported after it
through gradood.testing.import_torchvision, which skips its compiled operators
(a test-machine workaround: on a user's machine torchvision matches torch).
"""

from __future__ import annotations

import pytest
import torch

from gradood.testing import import_torchvision

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48)


def transformers_module():
    try:  # transformers imports torchvision where it is installed (its image processors)
        import_torchvision()
    except ImportError:
        pass
    return pytest.importorskip("transformers")


def timm_module():
    try:
        import_torchvision()
    except ImportError as error:
        pytest.skip(f"timm needs torchvision, which does not import here: {error}")
    return pytest.importorskip("timm")


def hf_vit(num_labels: int = 5):
    T = transformers_module()
    config = T.ViTConfig(**TINY, image_size=32, patch_size=8, num_labels=num_labels)
    return T.ViTForImageClassification(config).eval()


def hf_deit_distilled(num_labels: int = 5):
    T = transformers_module()
    config = T.DeiTConfig(**TINY, image_size=32, patch_size=8, num_labels=num_labels)
    return T.DeiTForImageClassificationWithTeacher(config).eval()


def hf_convnext(num_labels: int = 5):
    T = transformers_module()
    config = T.ConvNextConfig(num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], num_labels=num_labels)
    return T.ConvNextForImageClassification(config).eval()


def hf_bit(num_labels: int = 5, padding=None):
    """Hugging Face BiT: WeightStandardizedConv2d (with a dynamic 'SAME' pad module where
    padding='SAME') and GroupNormActivation."""
    T = transformers_module()
    config = T.BitConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_groups=4, global_padding=padding,
                         num_labels=num_labels)
    return T.BitForImageClassification(config).eval()


def hf_gemma(num_labels: int = 3):
    """Gemma: a scaled word embedding (an nn.Embedding subclass multiplying its output),
    RMSNorm with (1 + weight), grouped-query attention, rotary positions."""
    T = transformers_module()
    config = T.GemmaConfig(vocab_size=100, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                           num_key_value_heads=1, head_dim=8, intermediate_size=24, num_labels=num_labels, pad_token_id=0)
    return T.GemmaForSequenceClassification(config).eval()


def hf_qwen2_moe(num_labels: int = 3):
    """A mixture-of-experts decoder: tokens routed to experts through torch._grouped_mm,
    which has no float64 kernel on the CPU."""
    T = transformers_module()
    config = T.Qwen2MoeConfig(vocab_size=100, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                              num_key_value_heads=1, intermediate_size=24, moe_intermediate_size=8,
                              shared_expert_intermediate_size=8, num_experts=4, num_experts_per_tok=2,
                              num_labels=num_labels, pad_token_id=0)
    return T.Qwen2MoeForSequenceClassification(config).eval()


def hf_bert(num_labels: int = 3):
    T = transformers_module()
    config = T.BertConfig(**TINY, vocab_size=100, max_position_embeddings=32, num_labels=num_labels)
    return T.BertForSequenceClassification(config).eval()


def hf_distilbert(num_labels: int = 3):
    T = transformers_module()
    config = T.DistilBertConfig(dim=32, n_layers=2, n_heads=2, hidden_dim=48, vocab_size=100,
                                max_position_embeddings=32, num_labels=num_labels)
    return T.DistilBertForSequenceClassification(config).eval()


def hf_gpt2(num_labels: int = 3):
    T = transformers_module()
    config = T.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=100, n_positions=32, num_labels=num_labels,
                          pad_token_id=0, bos_token_id=1, eos_token_id=1)
    return T.GPT2ForSequenceClassification(config).eval()


def image_batch(batch: int = 4, size: int = 32, generator_seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(generator_seed)
    return {"pixel_values": torch.randn(batch, 3, size, size, generator=generator)}


def text_batch(batch: int = 4, length: int = 7, vocab: int = 100, generator_seed: int = 0) -> dict:
    """Token ids (1 ... vocab-1) with right padding (id 0, mask 0) in the first sample."""
    generator = torch.Generator().manual_seed(generator_seed)
    ids = torch.randint(2, vocab, (batch, length), generator=generator)
    mask = torch.ones_like(ids)
    ids[0, length - 2 :] = 0
    mask[0, length - 2 :] = 0
    return {"input_ids": ids, "attention_mask": mask}
