"""A tiny random LLaMA saved by transformers, with a byte-level BPE tokenizer trained on a few lines
of real text: both transformers and llamakin load the same directory (no network needed)."""

from __future__ import annotations

import json
from pathlib import Path

TEXT = """\
Shall I compare thee to a summer's day? Thou art more lovely and more temperate:
Rough winds do shake the darling buds of May, And summer's lease hath all too short a date;
Sometime too hot the eye of heaven shines, And often is his gold complexion dimm'd;
And every fair from fair sometime declines, By chance or nature's changing course untrimm'd;
But thy eternal summer shall not fade, Nor lose possession of that fair thou ow'st;
Nor shall Death brag thou wander'st in his shade, When in eternal lines to time thou grow'st:
So long as men can breathe or eyes can see, So long lives this, and this gives life to thee.
In the beginning God created the heaven and the earth. And the earth was without form, and void;
and darkness was upon the face of the deep. And the Spirit of God moved upon the face of the waters.
And God said, Let there be light: and there was light. 0123456789 + - = ( ) [ ] { } ! ? ; : , .
"""

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_llama_dir(root: Path, context: int = 96, seed: int = 0, bos: bool = False) -> Path:
    """``root/model``: config.json + safetensors (transformers) + tokenizer.json/tokenizer_config.json.

    ``bos``: the tokenizer prepends ``<s>`` (a post-processor, as Llama tokenizers do)."""
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    target = root / "model"
    if (target / "config.json").is_file():
        return target
    specials = ["<|endoftext|>", "<s>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=specials,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([TEXT] * 4, trainer=trainer)
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
        )
    target.mkdir(parents=True)
    tok.save(str(target / "tokenizer.json"))
    (target / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "eos_token": "<|endoftext|>",
                "pad_token": "<|endoftext|>",
                **({"bos_token": "<s>"} if bos else {}),
                "chat_template": CHATML,
                "model_max_length": context,
            }
        )
    )
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=context,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=tok.token_to_id("<s>"),
        eos_token_id=tok.token_to_id("<|endoftext|>"),
        pad_token_id=tok.token_to_id("<|endoftext|>"),
    )
    model = transformers.LlamaForCausalLM(config)
    # larger weights than the default init: sharper, more varied distributions
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    model.save_pretrained(target)
    return target
