"""Translate with an exported translation model: the export folder alone, no checkpoint, config or corpus."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch


def translate_from_export(folder: str | Path, sentences: Sequence[str], beam_size: int | None = None,
                          batch_size: int = 32, device: str | torch.device = "cpu") -> list[str]:
    """Translate ``sentences`` with the model exported to ``folder``, one output per input, in order.

    ``folder`` is what ``python -m step_lightning export`` (or the end of ``fit``) wrote for a
    :class:`~step_lightning.models.TranslationModule`: ``model.safetensors`` (the N:M weights),
    ``translation.json`` (architecture, languages, decoding settings) and ``sentencepiece.model``. The model is
    rebuilt with fairseq2 (the ``translation`` extra; imported here, not before) and decoded with the beam
    search used for ``val/bleu``.

    Args:
        folder: the export folder.
        sentences: source-language sentences (raw text).
        beam_size: beam width; ``None``: the one the model was trained to report BLEU with.
        batch_size: sentences decoded together.
        device: where to run (``"cuda"`` on a GPU).

    Raises:
        FileNotFoundError: ``folder`` lacks one of the three files (names it).
        ImportError: fairseq2 is not installed (says how to install it).

    Example::

        from step_lightning.export import translate_from_export
        translate_from_export("logs/wmt17_de_en/transformer_base/step_2of4/version_0/export", ["Guten Morgen."])
    """
    from step_lightning.data.wmt.tokenizer import load_tokenizer
    from step_lightning.export.safetensors_io import load_safetensors
    from step_lightning.models.translation import EXPORT_CONFIG, beam_search, build_transformer

    folder = Path(folder)
    config_path = folder / EXPORT_CONFIG
    if not config_path.is_file():
        raise FileNotFoundError(f"translate_from_export: {config_path} does not exist; export a TranslationModule "
                                "trained with a WMTDataModule (`python -m step_lightning export`).")
    config = json.loads(config_path.read_text())
    for name in (config["weights"], config["sentencepiece"]):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"translate_from_export: {folder / name} does not exist (listed in {config_path}).")
    model = build_transformer(config["arch"], config["num_tokens"], config["pad_idx"], config["max_positions"],
                              dropout_p=0.0)
    prefix = config["weights_prefix"]
    state = load_safetensors(folder / config["weights"])
    model.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}, strict=True)
    model.to(device).eval()
    src_lang, tgt_lang = config["src_lang"], config["tgt_lang"]
    tokenizer = load_tokenizer(folder / config["sentencepiece"], src_lang, tgt_lang, config["vocab_size"])
    encoder = tokenizer.create_encoder(task="translation", lang=src_lang, mode="source")
    limit, pad = config["max_positions"], config["pad_idx"]
    outputs: list[str] = []
    with torch.inference_mode():
        for start in range(0, len(sentences), batch_size):
            # Over-long sentences are cut to the model's positions, keeping </s>, as evaluation does.
            ids = [encoder(text) for text in sentences[start:start + batch_size]]
            ids = [seq if len(seq) <= limit else torch.cat([seq[: limit - 1], seq[-1:]]) for seq in ids]
            source = torch.nn.utils.rnn.pad_sequence(ids, batch_first=True, padding_value=pad).to(device)
            outputs += beam_search(model, source, [len(seq) for seq in ids], tokenizer, tgt_lang,
                                   beam_size or config["beam_size"], config["len_penalty"],
                                   tuple(config["max_gen_len"]))
    return outputs
