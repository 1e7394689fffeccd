"""Offline builders of tiny Hugging Face causal LMs and WikiText-style raw files for the tests (no network).

* :func:`build_tokenizer`: a byte-level BPE (GPT-2's scheme) trained on :data:`CORPUS` with the ``tokenizers``
  library, wrapped as ``GPT2TokenizerFast`` and saved with ``save_pretrained``.
* :func:`build_gpt2`: a 2-layer GPT-2 (``n_embd`` 32, 2 heads, 64 positions; ``Conv1D`` projections, LM head
  tied to ``wte``) saved with its tokenizer, loadable by ``AutoModelForCausalLM.from_pretrained(dir)``.
* :func:`build_llama`: a 2-layer Llama (hidden 32, intermediate 64, 2 heads; ``nn.Linear`` projections,
  untied LM head) saved with the same tokenizer.
* :func:`write_wikitext`: ``wiki.{train,valid,test}.raw`` in the layout of the official distribution.
"""

from __future__ import annotations

from pathlib import Path

import torch

EOS = "<|endoftext|>"
N_POSITIONS = 64
_WORDS = ("the cat sat on a mat while the dog ran to the park , and a bird sang in the old tree . "
          "rain fell over the quiet town ; people walked home after the long day of work . "
          "in 1998 the river rose by 3 @.@ 5 metres and the bridge closed for two weeks .").split()


def wiki_lines(n_articles: int, seed: int) -> list[str]:
    """Lines in the style of the WikiText raw files: headings, blank lines and paragraphs, each ending in ``\\n``."""
    g = torch.Generator().manual_seed(seed)
    lines: list[str] = []
    for article in range(n_articles):
        lines += [" \n", f" = Article {article} = \n", " \n"]
        for _ in range(int(torch.randint(2, 4, (), generator=g))):
            words = [_WORDS[i] for i in torch.randint(0, len(_WORDS), (int(torch.randint(12, 40, (), generator=g)),),
                                                      generator=g).tolist()]
            lines.append(" " + " ".join(words) + " \n")
        lines.append(" \n")
    return lines


CORPUS: list[str] = wiki_lines(30, seed=123)


def build_tokenizer(out_dir: Path, vocab_size: int = 320) -> Path:
    """Train a tiny byte-level BPE on :data:`CORPUS`, save it as a ``GPT2TokenizerFast`` in ``out_dir``."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2TokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(CORPUS, vocab_size=vocab_size, min_frequency=1, special_tokens=[EOS],
                            show_progress=False)
    tokenizer = GPT2TokenizerFast(tokenizer_object=bpe._tokenizer, bos_token=EOS, eos_token=EOS, unk_token=EOS,
                                  model_max_length=N_POSITIONS)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def _vocab_size(model_dir: Path) -> tuple[int, int]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return len(tokenizer), int(tokenizer.convert_tokens_to_ids(EOS))


def build_gpt2(out_dir: Path, seed: int = 0) -> Path:
    """A tiny GPT-2 (random weights, seeded) and its tokenizer in ``out_dir``."""
    from transformers import GPT2Config, GPT2LMHeadModel

    build_tokenizer(out_dir)
    vocab, eos = _vocab_size(out_dir)
    config = GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=2, n_positions=N_POSITIONS,
                        bos_token_id=eos, eos_token_id=eos)
    torch.manual_seed(seed)
    GPT2LMHeadModel(config).save_pretrained(out_dir)
    return out_dir


def build_llama(out_dir: Path, seed: int = 0) -> Path:
    """A tiny Llama (random weights, seeded) with the byte-level BPE tokenizer in ``out_dir``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    build_tokenizer(out_dir)
    vocab, eos = _vocab_size(out_dir)
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=N_POSITIONS,
                         bos_token_id=eos, eos_token_id=eos, pad_token_id=eos, tie_word_embeddings=False)
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(out_dir)
    return out_dir


def write_wikitext(root: Path, subfolder: str | None = None, articles: tuple[int, int, int] = (12, 3, 3),
                   seed: int = 7) -> dict[str, str]:
    """Write ``wiki.{train,valid,test}.raw`` under ``root`` (or ``root/subfolder``); returns each split's text."""
    folder = root / subfolder if subfolder else root
    folder.mkdir(parents=True, exist_ok=True)
    texts = {}
    for offset, (split, n) in enumerate(zip(("train", "valid", "test"), articles, strict=True)):
        text = "".join(wiki_lines(n, seed + offset))
        (folder / f"wiki.{split}.raw").write_text(text, encoding="utf-8")
        texts[split] = text
    return texts
