"""Tokenizers: byte-level round trips, special tokens, chat template, HF tokenizer.json loader."""
import pytest
from hypothesis import given, settings, strategies as st

from ring_jax.config import ConfigError
from ring_jax.data.tokenizer import ByteTokenizer, ChatTemplate, HFTokenizer, get_tokenizer


@pytest.fixture(scope="module")
def byte_tok():
    return ByteTokenizer()


def test_byte_vocab_fits_tiny_models(byte_tok):
    assert byte_tok.vocab_size <= 512
    ids = {byte_tok.pad_id, byte_tok.bos_id, byte_tok.eos_id}
    assert len(ids) == 3 and all(256 <= i < byte_tok.vocab_size for i in ids)


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_byte_roundtrip_any_text(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


def test_specials_are_single_ids(byte_tok):
    ids = byte_tok.encode("a</think>b<|im_end|>")
    # A bug that byte-encodes the specials would give 1 + 8 + 1 + 10 ids.
    assert ids == [ord("a"), byte_tok.token_to_id("</think>"), ord("b"), byte_tok.eos_id]
    assert byte_tok.decode(ids, skip_special=True) == "ab"


def test_decode_tolerates_garbage_ids(byte_tok):
    # Split multi-byte chars and out-of-vocab ids (a sampler bug or padded vocab) never raise.
    text = byte_tok.decode([0xE2, 0x82, byte_tok.eos_id, 500, 65])
    assert text.endswith("<|im_end|>A")


def test_chat_template_thinking_section(byte_tok):
    on = byte_tok.apply_chat_template("1+2=?", thinking=True)
    off = byte_tok.apply_chat_template("1+2=?", thinking=False)
    assert on == "<|im_start|>user\n1+2=?<|im_end|>\n<|im_start|>assistant\n<think>"
    assert off == on + "</think>"
    assert byte_tok.decode(byte_tok.encode(on)) == on
    bare = ByteTokenizer(template="bare").apply_chat_template("12+34", thinking=True)
    assert bare == "12+34\n<think>"


def test_bad_template_rejected():
    with pytest.raises(ConfigError, match="user_turn"):
        ChatTemplate(user_turn="no placeholder")
    with pytest.raises(ConfigError, match="template"):
        ByteTokenizer(template="nope")


@pytest.fixture(scope="module")
def tiny_bpe_path(tmp_path_factory):
    """A small byte-level BPE trained offline in the test (the format of a real checkpoint's)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    corpus = [f"What is {a} + {b}? The answer is {a + b}." for a in range(50) for b in range(20)]
    tok.train_from_iterator(corpus, trainer)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return str(path)


def test_hf_tokenizer_json(tiny_bpe_path):
    tok = get_tokenizer("hf", path=tiny_bpe_path, eos_token="<|im_end|>",
                        pad_token="<|endoftext|>")
    assert tok.eos_id == tok.token_to_id("<|im_end|>") and tok.bos_id == tok.eos_id
    assert tok.pad_id == tok.token_to_id("<|endoftext|>")
    text = tok.apply_chat_template("What is 3 + 4?", thinking=True)
    ids = tok.encode(text)
    assert tok.token_to_id("<think>") == ids[-1]  # the think tag is one added token
    assert tok.decode(ids) == text
    assert all(0 <= i < tok.vocab_size for i in ids)
    with pytest.raises(ConfigError, match="eos_token"):
        HFTokenizer(tiny_bpe_path, eos_token="<|missing|>")
