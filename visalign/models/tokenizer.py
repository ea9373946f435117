"""Local word-level tokenizers (no hub): a closed vocabulary wrapped as a transformers fast tokenizer."""

from __future__ import annotations

from collections.abc import Sequence

PAD, UNK, BOS, EOS = "<|pad|>", "<|unk|>", "<|startoftext|>", "<|endoftext|>"


def build_word_tokenizer(words: Sequence[str], max_length: int = 16):
    """A PreTrainedTokenizerFast over ``words`` that adds BOS/EOS and lower-cases its input.

    Ids: pad 0, unk 1, bos 2, eos 3, then the words. The EOS id is not 2 on purpose: transformers'
    CLIP text model treats eos_token_id == 2 as a legacy config and pools at argmax(input_ids).
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {PAD: 0, UNK: 1, BOS: 2, EOS: 3}
    for w in words:
        vocab.setdefault(w.lower(), len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", special_tokens=[(BOS, vocab[BOS]), (EOS, vocab[EOS])])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        model_max_length=max_length, padding_side="right")
