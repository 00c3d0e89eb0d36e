"""The caption tokenizer: a byte-level BPE trained in-process on the crawl's own captions.

No hub download: the vocabulary comes from the data it will caption. Byte-level BPE never produces
an unknown token (any web caption encodes) and decodes back to the exact text.
"""

from __future__ import annotations

from collections.abc import Iterable

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK]


def train_tokenizer(captions: Iterable[str], vocab_size: int):
    """Train a lower-cased byte-level BPE on `captions`; returns a PreTrainedTokenizerFast.

    Args:
        captions: training text (empty strings are fine, they are skipped).
        vocab_size: upper bound of the vocabulary (the 256 byte symbols and 4 specials included);
            a small crawl may yield fewer tokens.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=max(vocab_size, 300), special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator((c for c in captions if c), trainer=trainer)
    return wrap_tokenizer(tok.to_str())


def wrap_tokenizer(tokenizer_json: str):
    """A PreTrainedTokenizerFast around a serialised `tokenizers` model with our special tokens."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(tokenizer_json),
                                   pad_token=PAD, bos_token=BOS, eos_token=EOS, unk_token=UNK)
