#!/usr/bin/env python3
"""Write a tiny random-weight Hugging Face model that `transformers serve` can load.

Needs torch, transformers and tokenizers: run it with the python of the venv
that tools/setup-transformers.sh makes (tested with transformers 5.24.0 and
torch 2.13.0). Offline (nothing is downloaded; HF_HUB_OFFLINE=1 is fine) and
deterministic (seeded weights, tokenizer trained on a fixed corpus).

  python make_tiny_hf.py OUTDIR                  # --kind llm: chat/completions
  python make_tiny_hf.py OUTDIR --kind whisper   # /v1/audio/transcriptions

llm: LlamaForCausalLM (hidden 64, 2 layers, 4 query / 2 KV heads) with a
byte-level BPE tokenizer trained offline (about 450 tokens), ChatML control
tokens and a ChatML chat template. The tokenizer returns only input_ids and
attention_mask: a token_type_ids output makes generate() fail inside the
server.

whisper: WhisperForConditionalGeneration (d_model 64, 1 encoder + 1 decoder
layer) with a WhisperProcessor: the stock 80-bin WhisperFeatureExtractor and a
WhisperTokenizer built from a byte-level BPE trained offline, plus the special
tokens Whisper's generate() needs (<|endoftext|>, <|startoftranscript|>,
<|en|>, <|translate|>, <|transcribe|>, <|startoflm|>, <|startofprev|>,
<|nospeech|>, <|notimestamps|>). The generation config forces English
transcription without timestamps, keeps the other special tokens out of the
output (so the text is never empty) and stops after 8 new tokens.
"""

import argparse
import json

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

SEED = 0

CORPUS = [
    "Hello, how are you today?",
    "I am a tiny language model used for testing.",
    "The quick brown fox jumps over the lazy dog.",
    "user assistant system: say hi, please answer briefly.",
    "0123456789 abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ .,;:!?'\"()[]{}<>-_/\\|@#$%^&*+=~`",
] * 20

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + (message['content'] if message['content'] is string else '')"
    " + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# In Whisper's order: <|endoftext|> first, <|notimestamps|> last (generate()
# treats ids above <|notimestamps|> as timestamps, and the one below it as
# "no speech").
WHISPER_SPECIAL = [
    "<|endoftext|>",
    "<|startoftranscript|>",
    "<|en|>",
    "<|translate|>",
    "<|transcribe|>",
    "<|startoflm|>",
    "<|startofprev|>",
    "<|nospeech|>",
    "<|notimestamps|>",
]


def train_bpe(vocab_size, special_tokens):
    """A byte-level BPE trained on CORPUS (deterministic: the corpus is fixed)."""
    tok = Tokenizer(models.BPE(unk_token=special_tokens[0] if special_tokens else None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    return tok


def make_llm(out):
    from transformers import (
        GenerationConfig,
        LlamaConfig,
        LlamaForCausalLM,
        PreTrainedTokenizerFast,
    )

    tok = train_bpe(512, ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"])
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="<|im_end|>",
        unk_token="<unk>",
        pad_token="</s>",
        model_input_names=["input_ids", "attention_mask"],
    )
    hf_tok.chat_template = CHATML

    cfg = LlamaConfig(
        vocab_size=len(hf_tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=hf_tok.bos_token_id,
        eos_token_id=hf_tok.eos_token_id,
        pad_token_id=hf_tok.pad_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg)
    model.generation_config = GenerationConfig(
        bos_token_id=cfg.bos_token_id,
        eos_token_id=cfg.eos_token_id,
        pad_token_id=cfg.pad_token_id,
        max_new_tokens=16,
    )
    model.save_pretrained(out)
    hf_tok.save_pretrained(out)
    return len(hf_tok), model


def make_whisper(out):
    from transformers import (
        GenerationConfig,
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
        WhisperProcessor,
        WhisperTokenizer,
    )

    bpe = json.loads(train_bpe(320, []).to_str())["model"]
    merges = [
        tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in bpe["merges"]
    ]
    tokenizer = WhisperTokenizer(
        vocab=bpe["vocab"],
        merges=merges,
        unk_token="<|endoftext|>",
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=WHISPER_SPECIAL[1:],
        model_input_names=["input_ids", "attention_mask"],
    )
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in WHISPER_SPECIAL}
    assert ids["<|notimestamps|>"] == len(tokenizer) - 1, ids
    processor = WhisperProcessor(
        feature_extractor=WhisperFeatureExtractor(feature_size=80, sampling_rate=16000),
        tokenizer=tokenizer,
    )

    eot = ids["<|endoftext|>"]
    cfg = WhisperConfig(
        vocab_size=len(tokenizer),
        num_mel_bins=80,
        d_model=64,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=128,
        decoder_ffn_dim=128,
        max_source_positions=1500,  # 30 s of 10 ms frames, halved by the conv stem
        max_target_positions=64,
        bos_token_id=eot,
        eos_token_id=eot,
        pad_token_id=eot,
        decoder_start_token_id=ids["<|startoftranscript|>"],
        suppress_tokens=[],
        begin_suppress_tokens=[eot],
    )
    model = WhisperForConditionalGeneration(cfg)
    model.generation_config = GenerationConfig(
        bos_token_id=eot,
        eos_token_id=eot,
        pad_token_id=eot,
        decoder_start_token_id=ids["<|startoftranscript|>"],
        is_multilingual=True,
        language="<|en|>",
        task="transcribe",
        lang_to_id={"<|en|>": ids["<|en|>"]},
        task_to_id={
            "translate": ids["<|translate|>"],
            "transcribe": ids["<|transcribe|>"],
        },
        no_timestamps_token_id=ids["<|notimestamps|>"],
        return_timestamps=False,
        # Random weights: keep the prompt tokens out of the output, so the
        # decoded text (special tokens skipped) is never empty.
        suppress_tokens=[ids[t] for t in WHISPER_SPECIAL[1:]],
        begin_suppress_tokens=[eot],
        max_length=8,  # Whisper generate() counts new tokens only here
    )
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return len(tokenizer), model


KINDS = {"llm": make_llm, "whisper": make_whisper}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("outdir", help="directory to write (created if missing)")
    parser.add_argument(
        "--kind",
        choices=sorted(KINDS),
        default="llm",
        help="what to build (default: llm)",
    )
    args = parser.parse_args()
    torch.manual_seed(SEED)
    vocab, model = KINDS[args.kind](args.outdir)
    params = sum(p.numel() for p in model.parameters())
    print(f"saved {args.kind} to {args.outdir}: vocab {vocab}, {params} parameters")


if __name__ == "__main__":
    main()
