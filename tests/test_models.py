"""Loading: the check that a tokenizer built from a GGUF file adds the BOS token the file asks for."""

import pytest

from patchattn.errors import ModelLoadError
from patchattn.models import check_gguf_tokenizer

pytestmark = pytest.mark.internals  # CI runs these on the oldest supported transformers too

gguf = pytest.importorskip("gguf")


def _gguf_with_tokenizer_fields(path, add_bos: bool | None, bos: int = 2, tokens=None):
    writer = gguf.GGUFWriter(str(path), "llama")
    if tokens is not None:
        writer.add_token_list(tokens)
    if add_bos is not None:
        writer.add_bool("tokenizer.ggml.add_bos_token", add_bos)
    writer.add_uint32("tokenizer.ggml.bos_token_id", bos)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


class _Tokenizer:
    def __init__(self, prefix, vocab=None, whole=True):
        self.prefix, self.vocab, self.whole = prefix, vocab or {}, whole

    def __call__(self, text, add_special_tokens=True):
        word = "\u2581" + text.strip()
        if word in self.vocab:  # whole: the word's token; else split in two pieces
            ids = [self.vocab[word]] if self.whole else [900, 901]
        else:
            ids = [300]
        return {"input_ids": (self.prefix if add_special_tokens else []) + ids}


def test_a_tokenizer_that_drops_the_files_bos_is_refused(tmp_path):
    path = _gguf_with_tokenizer_fields(tmp_path / "m.gguf", add_bos=True)
    with pytest.raises(ModelLoadError, match="does not add its BOS token .id 2.*upgrade transformers"):
        check_gguf_tokenizer(path, _Tokenizer([]))
    check_gguf_tokenizer(path, _Tokenizer([2]))


@pytest.mark.parametrize("add_bos", [False, None])
def test_files_without_a_bos_need_none(tmp_path, add_bos):
    check_gguf_tokenizer(_gguf_with_tokenizer_fields(tmp_path / "m.gguf", add_bos=add_bos), _Tokenizer([]))


def test_an_unreadable_file_is_left_to_transformers(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf")
    check_gguf_tokenizer(bad, _Tokenizer([]))  # transformers reports it when it reads the file


def test_a_tokenizer_that_splits_the_files_words_is_refused(tmp_path):
    words = ["<pad>", "<bos>", "\u2581hello", "\u2581world", "\u2581house", "\u2581garden", "ab", "\u2581x"]
    path = _gguf_with_tokenizer_fields(tmp_path / "m.gguf", add_bos=True, tokens=words)
    vocab = {w: i for i, w in enumerate(words)}
    check_gguf_tokenizer(path, _Tokenizer([2], vocab, whole=True))
    with pytest.raises(ModelLoadError, match="splits 100% of the file's whole-word tokens"):
        check_gguf_tokenizer(path, _Tokenizer([2], vocab, whole=False))
