"""Small tokenizers of every family vk must be exact under, trained offline on vk's corpus.

Each is built like the real models' tokenizer.json (same normalizer, pre-tokenizer, model type and decoder),
with a small vocabulary trained by the ``tokenizers`` library on vk/data/moby-dick.txt, so the tests need no
download. ``build(name, directory)`` writes ``tokenizer.json`` there.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

CORPUS = Path(__file__).resolve().parent.parent / "vk" / "data" / "moby-dick.txt"

# special tokens of the chat templates in tests/data/templates, added to every family (as real models have them)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>",
           "<|end_header_id|>", "<|eot_id|>", "<s>", "</s>", "<unk>", "[INST]", "[/INST]", "<|system|>", "<|user|>",
           "<|assistant|>", "<|end|>", "<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>",
           "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>",
           "[CLS]", "[SEP]", "[PAD]", "[UNK]", "[MASK]"]

LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")

FAMILIES = ("gpt2", "llama3", "llama2", "mistral", "t5", "bert")


def _lines():
    text = CORPUS.read_text(encoding="utf-8")
    step = 2000
    return [text[i:i + step] for i in range(0, len(text), step)]


def build(name: str, directory: Path, vocab_size: int = 4000) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    if name in ("gpt2", "llama3"):
        tok = Tokenizer(models.BPE())
        if name == "gpt2":
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        else:
            tok.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        tok.decoder = decoders.ByteLevel()
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        tok.train_from_iterator(_lines(), trainer)
    elif name in ("llama2", "mistral"):
        # SentencePiece BPE with a prepended '▁' (no split on spaces): trained with words split, then saved the
        # way the converted Llama-2 (normalizer Prepend + Replace) and Mistral (Metaspace, prepend "first") are.
        tok = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True, byte_fallback=True))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL, show_progress=False,
                                      initial_alphabet=[chr(b) for b in range(32, 127)])
        tok.train_from_iterator(_lines(), trainer)
        if name == "llama2":
            tok.pre_tokenizer = None
            tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
            tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                             decoders.Strip(" ", 1, 0)])
        else:
            tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
            tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    elif name == "t5":
        tok = Tokenizer(models.Unigram())
        tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(Regex(" {2,}"), " ")])
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")])
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
        trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=SPECIAL, unk_token="<unk>",
                                          show_progress=False)
        tok.train_from_iterator(_lines(), trainer)
    elif name == "bert":
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=SPECIAL, show_progress=False)
        tok.train_from_iterator(_lines(), trainer)
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))])
        # as the unmodified sentence-transformers MiniLM tokenizer.json ships: truncation and padding on
        tok.enable_truncation(max_length=128)
        tok.enable_padding(length=128, pad_id=tok.token_to_id("[PAD]"), pad_token="[PAD]")
    else:
        raise ValueError(name)
    tok.save(str(directory / "tokenizer.json"))
    return directory
