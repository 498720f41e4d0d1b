"""Tiny random-weight models built from configs (no downloads), shared by the tests."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# Tiny models gain nothing from intra-op threads, and on a shared 2-core machine competing threads
# made single tests up to 8x slower.
torch.set_num_threads(1)


def tiny_bert(num_labels=3, seed=0):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                        intermediate_size=64, num_labels=num_labels, max_position_embeddings=64)
    return BertForSequenceClassification(config).eval()


def tiny_gpt2(seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=120, n_embd=32, n_layer=2, n_head=2, n_positions=64,
                        bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config).eval()


def tiny_llama(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=120, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         bos_token_id=0, eos_token_id=1, pad_token_id=0)
    return LlamaForCausalLM(config).eval()


def tiny_vit(num_labels=3, seed=0):
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    config = ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
                       num_attention_heads=2, intermediate_size=64, num_labels=num_labels)
    return ViTForImageClassification(config).eval()


# A 3-stage EfficientNet-Lite (stem 8, blocks of width 8 / 12 / 16, head 32), for 32 x 32 images.
TINY_CNN_STAGES = [[1, 3, 1, 1, 8, 8], [2, 3, 2, 4, 8, 12], [1, 5, 2, 4, 12, 16]]


def tiny_cnn(num_labels=3, seed=0):
    """A tiny random EfficientNet-Lite (the architecture of the built-in efficientnet-lite0), with random
    BatchNorm statistics so that they matter."""
    from peftkit.vision.efficientnet import EfficientNetLiteConfig, EfficientNetLiteForImageClassification

    torch.manual_seed(seed)
    config = EfficientNetLiteConfig(stages=TINY_CNN_STAGES, stem_channels=8, head_channels=32, num_labels=num_labels,
                                    image_size=32, dropout_rate=0.0)
    model = EfficientNetLiteForImageClassification(config)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 1.5)
    return model.eval()


# ChatML, as SmolLM2-Instruct and Qwen use it (without SmolLM2's default system prompt).
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def byte_level_tokenizer(chat_template=CHATML):
    """A small byte-level BPE tokenizer (GPT-2 / SmolLM2 style) trained here, so no download is needed;
    byte-level decoding gives the exact text back, which the label checks rely on."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = ["Hello there, how are you? I am fine. The capital of France is Paris. system user assistant"] * 5
    backend.train_from_iterator(corpus, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.chat_template = chat_template
    return tokenizer


def tiny_chat_model_folder(folder, seed=0):
    """Save a tiny Llama with the byte-level ChatML tokenizer into `folder` (a causal LM folder, as smollm2's)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = byte_level_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def randomise(model, seed=3, scale=0.1):
    """Give every trainable tensor a non-trivial value, as training would: zero-initialised factors (LoRA's B,
    LoHa's w2_b, ...) become random, so a test sees a real update. Deterministic given `seed`."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, parameter in sorted(model.named_parameters(), key=lambda item: item[0]):
            if parameter.requires_grad:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * scale)


def logits(model, *args, **kwargs):
    """The model's output without gradients: `.logits` for Hugging Face models, the tensor for plain modules."""
    with torch.no_grad():
        out = model(*args, **kwargs)
    return out if isinstance(out, torch.Tensor) else out.logits


TINY_MODELS = {"bert": tiny_bert, "gpt2": tiny_gpt2, "llama": tiny_llama}


@pytest.fixture
def pixel_values():
    generator = torch.Generator().manual_seed(2)
    return torch.randn(2, 3, 16, 16, generator=generator)


@pytest.fixture
def input_ids():
    generator = torch.Generator().manual_seed(1)
    return torch.randint(2, 120, (2, 9), generator=generator)


class ConvNet(torch.nn.Module):
    """A plain PyTorch model (no transformers) with Conv2d, Linear and Embedding layers."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.norm = torch.nn.BatchNorm2d(8)
        self.embed = torch.nn.Embedding(10, 8)
        self.head = torch.nn.Linear(8, 4)

    def forward(self, image, label_ids):
        features = self.norm(self.conv(image)).mean(dim=(2, 3))
        return self.head(features + self.embed(label_ids))


@pytest.fixture(scope="module")
def tiny_model_folder(tmp_path_factory):
    """A 32-wide, 2-layer BERT with minilm's tokenizer, saved as a local Hugging Face folder (CLI-level tests)."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from peftkit import zoo

    folder = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = AutoTokenizer.from_pretrained(zoo.resolve_model("minilm"))
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                                                     num_attention_heads=2, intermediate_size=64, num_labels=2))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
