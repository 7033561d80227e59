"""A word-level tokenizer for the toy Countdown task: one token per number, operator or tag.

A genuine ``PreTrainedTokenizerFast`` (saved with ``save_pretrained``, loaded with
``AutoTokenizer.from_pretrained``) with the chat template and special tokens of the repo's tiny
models (rlmem/models/tiny.py), so the data pipeline, the interoception tag and the verifier work
unchanged. Text is split on whitespace, digit runs and single punctuation marks; decoding joins
tokens with spaces, which the Countdown verifier accepts (``( 3 * 5 ) + 7``).
"""

from __future__ import annotations

from rlmem.data.toy import MAX_VALUE
from rlmem.models.tiny import BOS, CHAT_TEMPLATE, EOS, PAD, SPECIAL_TOKENS, UNK

SYMBOLS = ["+", "-", "*", "/", "=", "(", ")", ";", ",", ":", "%", ".", "<", ">"]


def build_toy_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = SPECIAL_TOKENS + SYMBOLS + [str(i) for i in range(MAX_VALUE + 1)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                 pre_tokenizers.Digits(individual_digits=False),
                                                 pre_tokenizers.Punctuation("isolated")])
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # no word has the prefix: a plain " ".join
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=UNK, bos_token=BOS, eos_token=EOS,
                                        pad_token=PAD, additional_special_tokens=SPECIAL_TOKENS[4:])
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer
