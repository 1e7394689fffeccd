"""Machine translation with an encoder-decoder Transformer built by fairseq2; the recipe is a callback."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import nn
from torchmetrics import MeanMetric

from step_lightning._fairseq2 import batch_layout, import_fairseq2, to_torch_modules
from step_lightning.checks import (
    IntAtLeast2,
    IntAtLeast8,
    NonNegativeInt,
    PositiveInt,
    UnitIntervalOpenRight,
    check_arguments,
)
from step_lightning.files import write_atomically
from step_lightning.models.evaluation import any_updated, updated_on_any_rank
from step_lightning.models.optimization import configure_optimization, parameter_groups

Arch = Literal["tiny", "base", "big"]
# Targets start with the decoder's prompt ``</s> __<tgt_lang>__`` (fairseq2's NLLB tokenizer, target mode).
TARGET_PROMPT = 2
# Files the N:M export adds beside model.safetensors (TranslationModule.export_artifacts).
EXPORT_SPM = "sentencepiece.model"
EXPORT_CONFIG = "translation.json"

# The dimensions of Vaswani et al.'s (2017) Transformer base and big (the layers are pre-LN: build_transformer);
# "tiny" is for tests and smoke runs.
ARCHS: dict[str, dict[str, Any]] = {
    "tiny": {"model_dim": 64, "num_encoder_layers": 2, "num_decoder_layers": 2, "num_encoder_attn_heads": 4,
             "num_decoder_attn_heads": 4, "ffn_inner_dim": 128},
    "base": {"model_dim": 512, "num_encoder_layers": 6, "num_decoder_layers": 6, "num_encoder_attn_heads": 8,
             "num_decoder_attn_heads": 8, "ffn_inner_dim": 2048},
    "big": {"model_dim": 1024, "num_encoder_layers": 6, "num_decoder_layers": 6, "num_encoder_attn_heads": 16,
            "num_decoder_attn_heads": 16, "ffn_inner_dim": 4096},
}


def _default_optimizer(params: Any) -> torch.optim.Optimizer:
    from step_lightning.optim import StepAdamW

    return StepAdamW(params, lr=7e-4, betas=(0.9, 0.98), eps=1e-8, weight_decay=0.0)


def build_transformer(arch: Arch, num_tokens: int, pad_idx: int = 0, max_positions: int = 1024,
                      dropout_p: float = 0.1) -> nn.Module:
    """fairseq2's encoder-decoder Transformer (``create_nllb_model``) in the dims of ``arch``, torch modules inside.

    What fairseq2 0.8's NLLB factory builds (``fairseq2/models/nllb/factory.py``), the architecture of the
    dense NLLB-200 models: a **pre-LN** Transformer (``TransformerNormOrder.PRE``: ``x + f(LayerNorm(x))``
    for each attention and feed-forward sub-layer ``f``, and a final LayerNorm after the encoder and after
    the decoder stacks; Xiong et al. 2020; fairseq's ``transformer_wmt_en_de`` with
    ``--encoder-normalize-before --decoder-normalize-before``), not the post-LN layers of Vaswani et al.
    (2017), whose dimensions ``base`` and ``big`` take. Also: sinusoidal positions, embeddings scaled by
    sqrt(model_dim) and initialised from N(0, 1/model_dim), ReLU feed-forward, dropout on embeddings and
    sub-layer outputs (none on attention weights), one embedding shared by encoder, decoder and output
    projection. The projections and the embedding are ``nn.Linear`` / ``nn.Embedding``
    (:func:`to_torch_modules`), so the N:M target rule masks every attention and feed-forward projection and
    leaves the embedding and the output projection (tied to it) dense.
    """
    nllb = import_fairseq2("fairseq2.models.nllb")
    config = nllb.NllbConfig(vocab_size=num_tokens, pad_idx=pad_idx, max_seq_len=max_positions, dropout_p=dropout_p,
                             **ARCHS[arch])
    return to_torch_modules(nllb.create_nllb_model(config))


def beam_search(model: nn.Module, source: torch.Tensor, source_lens: list[int], tokenizer: Any, tgt_lang: str,
                beam_size: int, len_penalty: float, max_gen_len: tuple[float, int]) -> list[str]:
    """fairseq2 beam-search translations of a padded batch of source token ids, detokenised."""
    generation = import_fairseq2("fairseq2.generation.beam_search.generator")
    generator = generation.BeamSearchSeq2SeqGenerator(model, tokenizer.vocab_info, beam_size=beam_size,
                                                      max_gen_len=max_gen_len, len_penalty=len_penalty)
    prefix = tokenizer.create_encoder(task="translation", lang=tgt_lang, mode="target").prefix_indices
    prompt = prefix.to(source.device).unsqueeze(0).expand(source.shape[0], -1)
    output = generator(source, batch_layout(source, source_lens), prompt,
                       batch_layout(prompt, [prompt.shape[1]] * prompt.shape[0]))
    decoder = tokenizer.create_decoder(skip_special_tokens=True)
    return [str(decoder(hyps[0].seq)) if hyps else "" for hyps in output.hypotheses]


def _shape_problems(pad_idx: int, num_tokens: int, max_gen_len: Any) -> list[str]:
    """``pad_idx`` must be a token id; ``max_gen_len`` must be ``[a, b]`` (a pair the Python API does not check)."""
    problems = []
    if isinstance(pad_idx, int) and isinstance(num_tokens, int) and pad_idx >= num_tokens >= 2:
        problems.append(f"`--model.pad_idx` must be in [0, num_tokens), got {pad_idx!r}")
    if len(max_gen_len) != 2:
        problems.append(f"`--model.max_gen_len` must be [a, b] (a * source length + b), got {max_gen_len!r}")
    return problems


class TranslationModule(pl.LightningModule):
    """Encoder-decoder Transformer for translation, trained with label-smoothed cross-entropy.

    Built with fairseq2's ``create_nllb_model``, a pre-LN Transformer (:func:`build_transformer`), in the
    dimensions of Vaswani et al.'s ``base`` (512 dims, 6+6 layers, 8 heads, 2048 FFN) or ``big`` (1024, 6+6,
    16, 4096), or ``tiny`` (64, 2+2, 4, 128) for tests. Batches are
    those of :class:`~step_lightning.data.WMTDataModule` (token ids padded with ``pad_idx``; targets start
    with ``</s> __lang__``).

    Logged: ``train/loss`` (label-smoothed, per target token) every step; ``val/loss`` (label-smoothed, per
    token) and ``val/nll`` (plain) every validation; ``val/bleu`` (sacreBLEU, default 13a tokenisation, on
    detokenised beam-search output against the reference text, gathered over all ranks) every
    ``bleu_every_n_val`` validations, on at most ``bleu_max_batches`` batches per process, with its
    sacreBLEU signature (e.g. ``nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:2.6.0``) as the
    hyperparameter ``val/bleu_signature`` (and a TensorBoard text), so a reported BLEU says how it was
    computed. The same under ``test/`` (BLEU on every test batch). ``predict`` translates
    ``WMTDataModule.predict_file`` with beam search and writes one line per input line, in input order, to
    ``predict_output``.

    The hot path never waits on the device: sequence lengths come from the data module as host integers, the
    loss is normalised by a host count, and the fairseq2 batch layouts are built with a few tensor ops.

    Args:
        arch: ``tiny``, ``base`` or ``big``.
        num_tokens: the tokenizer's vocabulary size (embedding rows); linked from ``--data.num_tokens`` by the
            CLI (``--data.vocab_size`` SentencePiece pieces + 6 special symbols).
        pad_idx: the padding index (0 with fairseq2's NLLB tokenizer).
        max_positions: positions of the sinusoidal encodings (longest source/target the model can see).
        dropout_p: dropout of attention, FFN and embeddings (0.1 base, 0.3 big on WMT14 En-De).
        label_smoothing: epsilon of the label-smoothed cross-entropy.
        beam_size: beam width of the BLEU decoding.
        len_penalty: length penalty of the beam search.
        max_gen_len: generated tokens at most ``a * source_len + b``, as ``[a, b]``.
        bleu_every_n_val: compute ``val/bleu`` every this many validations (0: never; test always does).
        bleu_max_batches: validation batches decoded per process for BLEU (``None``: all).
        predict_output: file ``predict`` writes the translations to (atomically, on rank 0); ``None``:
            ``translations.<tgt_lang>.txt`` in the run's log directory.
        optimizer: builds the optimizer from the parameter groups; default ``StepAdamW(lr=7e-4,
            betas=(0.9, 0.98))``, which every recipe accepts.
        lr_scheduler: optional, stepped every optimizer step; the Transformer schedule is
            ``WarmupDecayLR(warmup=4000, decay=inverse_sqrt)``.

    Raises:
        ValueError: an unknown ``arch`` or an invalid value; every problem is reported at once.

    Example::

        model:
          class_path: step_lightning.models.TranslationModule
          init_args:
            arch: base
            optimizer:
              class_path: step_lightning.optim.StepAdamW
              init_args: {lr: 7.0e-04, betas: [0.9, 0.98]}
            lr_scheduler:
              class_path: step_lightning.optim.WarmupDecayLR
              init_args: {warmup: 4000, decay: inverse_sqrt}
    """

    def __init__(
        self,
        arch: Arch = "base",
        num_tokens: IntAtLeast2 = 32006,
        pad_idx: NonNegativeInt = 0,
        max_positions: IntAtLeast8 = 1024,
        dropout_p: UnitIntervalOpenRight = 0.1,
        label_smoothing: UnitIntervalOpenRight = 0.1,
        beam_size: PositiveInt = 4,
        len_penalty: float = 1.0,
        max_gen_len: tuple[float, int] = (1.0, 50),
        bleu_every_n_val: NonNegativeInt = 1,
        bleu_max_batches: PositiveInt | None = None,
        predict_output: str | None = None,
        optimizer: OptimizerCallable = _default_optimizer,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__()
        check_arguments(TranslationModule, locals(), flag="--model.{}",
                        extra=_shape_problems(pad_idx, num_tokens, max_gen_len))
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.model = build_transformer(arch, num_tokens, pad_idx, max_positions, dropout_p)
        self.pad_idx = pad_idx
        self.label_smoothing = label_smoothing
        self.beam_size = beam_size
        self.len_penalty = len_penalty
        self.max_gen_len = (float(max_gen_len[0]), int(max_gen_len[1]))
        self.bleu_every_n_val = bleu_every_n_val
        self.bleu_max_batches = bleu_max_batches
        self.predict_output = predict_output
        self.optimizer_factory = optimizer
        self.scheduler_factory = lr_scheduler
        self.val_loss, self.val_nll = MeanMetric(), MeanMetric()
        self.test_loss, self.test_nll = MeanMetric(), MeanMetric()
        self._hyps: list[str] = []
        self._refs: list[str] = []
        self._predictions: list[tuple[int, str]] = []
        self._num_val = 0
        self.tokenizer_files: dict[str, Any] | None = None
        self.bleu_signatures: dict[str, str] = {}  # stage -> sacreBLEU signature of its last BLEU

    # ---- model --------------------------------------------------------------------------------------------
    def forward(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits, targets)``: next-token logits ``(batch, time, vocab)`` of the target with its last token cut,
        and the targets: the target shifted left, ``pad_idx`` where padded and on the prompt's language symbol,
        which decoding is given, never asked to predict (the loss covers the sentence and its ``</s>``)."""
        src, tgt = batch["source"], batch["target"]
        tgt_in = tgt[:, :-1]
        tgt_out = tgt[:, 1:].clone()
        tgt_out[:, : TARGET_PROMPT - 1] = self.pad_idx
        # The longest target loses its last token (</s>) as input; shorter ones lose a pad. Padded positions of
        # the shifted targets are already pad_idx. Lengths are host ints: no device sync for the layouts.
        in_lens = [n - 1 for n in batch["target_lens"]]
        logits = self.model(src, batch_layout(src, batch["source_lens"]), tgt_in, batch_layout(tgt_in, in_lens))
        return logits, tgt_out

    def loss(self, logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float) -> torch.Tensor:
        """Summed cross-entropy over the non-padding targets (in fp32)."""
        return nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=self.pad_idx,
                                           label_smoothing=label_smoothing, reduction="sum")

    @staticmethod
    def num_target_tokens(batch: dict[str, Any]) -> int:
        """Predicted target tokens of a batch (every target token but the prompt), from the host lengths."""
        return sum(batch["target_lens"]) - TARGET_PROMPT * len(batch["target_lens"])

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        logits, targets = self(batch)
        loss = self.loss(logits, targets, self.label_smoothing) / max(self.num_target_tokens(batch), 1)
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True)
        return loss

    # ---- evaluation ---------------------------------------------------------------------------------------
    def _tokenizer(self) -> tuple[Any, str]:
        datamodule = getattr(self.trainer, "datamodule", None)
        tokenizer = getattr(datamodule, "tokenizer", None)
        if tokenizer is None:
            raise RuntimeError("TranslationModule: decoding needs the data module's tokenizer "
                               "(`WMTDataModule.tokenizer`); run with a WMTDataModule, or set "
                               "`--model.bleu_every_n_val 0`.")
        return tokenizer, datamodule.tgt_lang

    def translate(self, source: torch.Tensor, source_lens: list[int], tokenizer: Any, tgt_lang: str) -> list[str]:
        """Beam-search translations of a padded batch of source token ids, detokenised."""
        return beam_search(self.model, source, source_lens, tokenizer, tgt_lang, self.beam_size, self.len_penalty,
                           self.max_gen_len)

    def _bleu_due(self, stage: str) -> bool:
        """Whether this validation (or test) pass decodes for BLEU; the same answer on every rank."""
        if stage == "test":
            return True
        return (self.bleu_every_n_val > 0 and not self.trainer.sanity_checking
                and self._num_val % self.bleu_every_n_val == 0)

    def _eval_step(self, stage: str, batch: dict[str, Any], batch_idx: int) -> None:
        logits, targets = self(batch)
        tokens = (targets != self.pad_idx).sum().clamp_min(1)  # on device: no sync per batch
        loss_metric, nll_metric = (self.val_loss, self.val_nll) if stage == "val" else (self.test_loss, self.test_nll)
        loss_metric.update(self.loss(logits, targets, self.label_smoothing) / tokens, weight=tokens)
        nll_metric.update(self.loss(logits, targets, 0.0) / tokens, weight=tokens)
        if self._bleu_due(stage) and (stage == "test" or self.bleu_max_batches is None
                                      or batch_idx < self.bleu_max_batches):
            tokenizer, tgt_lang = self._tokenizer()
            self._hyps += self.translate(batch["source"], batch["source_lens"], tokenizer, tgt_lang)
            self._refs += list(batch["target_text"])

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step("val", batch, batch_idx)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step("test", batch, batch_idx)

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[str]:
        """Beam-search translations of a batch of ``WMTDataModule.predict_file``; all are written at the end."""
        tokenizer, tgt_lang = self._tokenizer()
        hyps = self.translate(batch["source"], batch["source_lens"], tokenizer, tgt_lang)
        self._predictions += zip(batch["index"], hyps, strict=True)
        return hyps

    def on_validation_epoch_start(self) -> None:
        self._hyps, self._refs = [], []

    on_test_epoch_start = on_validation_epoch_start

    def on_predict_epoch_start(self) -> None:
        self._predictions = []

    def _all_ranks(self, value: Any) -> list[Any]:
        """``value`` of every rank (``all_gather_object``), or ``[value]`` outside DDP."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return [value]
        parts: list[Any] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(parts, value)
        return parts

    def _log_epoch(self, stage: str) -> None:
        loss_metric, nll_metric = (self.val_loss, self.val_nll) if stage == "val" else (self.test_loss, self.test_nll)
        if updated_on_any_rank(self, [any_updated([loss_metric])])[0]:
            self.log(f"{stage}/loss", loss_metric.compute(), prog_bar=stage == "val", sync_dist=True)
            self.log(f"{stage}/nll", nll_metric.compute(), sync_dist=True)
        loss_metric.reset()
        nll_metric.reset()
        if self._bleu_due(stage):  # every rank takes part in the gather, even one that decoded nothing
            parts = self._all_ranks((self._hyps, self._refs))
            hyps, refs = [h for p in parts for h in p[0]], [r for p in parts for r in p[1]]
            if hyps:
                from sacrebleu.metrics import BLEU

                bleu = BLEU()
                score = bleu.corpus_score(hyps, [refs]).score
                self.log(f"{stage}/bleu", torch.tensor(score, device=self.device), prog_bar=stage == "val")
                self._log_bleu_signature(stage, str(bleu.get_signature()))
        self._hyps, self._refs = [], []
        if stage == "val" and not self.trainer.sanity_checking:
            self._num_val += 1

    def _log_bleu_signature(self, stage: str, signature: str) -> None:
        """Say how ``<stage>/bleu`` was computed, once per signature: sacreBLEU's signature (references,
        case, tokeniser, smoothing, version) as the hyperparameter ``<stage>/bleu_signature`` of every
        logger (a ``CSVLogger`` rewrites its ``hparams.yaml``; a ``TensorBoardLogger`` writes that file once,
        at the start) and, with TensorBoard, as a text of the same name."""
        if self.bleu_signatures.get(stage) == signature:
            return
        self.bleu_signatures[stage] = signature
        if not self.trainer.is_global_zero:
            return
        from lightning.pytorch.loggers import TensorBoardLogger

        for logger in self.loggers:
            logger.log_hyperparams({f"{stage}/bleu_signature": signature})
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_text(f"{stage}/bleu_signature", signature, self.global_step)

    def on_validation_epoch_end(self) -> None:
        self._log_epoch("val")

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test")

    def predictions_path(self) -> Path:
        """Where ``predict`` writes: ``predict_output``, or ``translations.<tgt_lang>.txt`` in the run's log dir."""
        if self.predict_output is not None:
            return Path(self.predict_output)
        datamodule = getattr(self.trainer, "datamodule", None)
        folder = self.trainer.log_dir or self.trainer.default_root_dir
        return Path(folder) / f"translations.{getattr(datamodule, 'tgt_lang', 'out')}.txt"

    def on_predict_epoch_end(self) -> None:
        lines = dict(pair for part in self._all_ranks(self._predictions) for pair in part)
        self._predictions = []
        path = self.predictions_path()  # on every rank: `trainer.log_dir` is a collective
        if not self.trainer.is_global_zero:
            return
        # Lines the loader did not reach (`limit_predict_batches`) are left empty, so line i is always input line i.
        text = "".join(lines.get(i, "") + "\n" for i in range(max(lines, default=-1) + 1))
        path.parent.mkdir(parents=True, exist_ok=True)
        data = text.encode("utf-8")
        write_atomically(path, lambda file: file.write(data))
        rank_zero_info(f"TranslationModule: wrote {len(lines)} translations to {path}")

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        spm_path = getattr(datamodule, "spm_path", None)
        if callable(spm_path) and (path := Path(spm_path())).is_file():
            self.tokenizer_files = {"sentencepiece": path.read_bytes(), "src_lang": datamodule.src_lang,
                                    "tgt_lang": datamodule.tgt_lang, "vocab_size": datamodule.vocab_size}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["translation_validations"] = self._num_val  # keeps the `bleu_every_n_val` rhythm on resume
        if self.tokenizer_files is not None:  # a few hundred kB: the export needs it, and the corpus may be gone
            checkpoint["translation_tokenizer"] = self.tokenizer_files

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._num_val = int(checkpoint.get("translation_validations", 0))
        self.tokenizer_files = checkpoint.get("translation_tokenizer", self.tokenizer_files)

    def export_artifacts(self, folder: Path) -> list[Path]:
        """What :func:`~step_lightning.export.export_model` adds for translation: ``sentencepiece.model`` (the
        data module's SentencePiece model, captured at ``setup`` and kept in checkpoints) and
        ``translation.json`` (the model's config, languages and decoding settings), so that
        :func:`~step_lightning.export.translate_from_export` needs nothing but the folder."""
        if self.tokenizer_files is None:
            rank_zero_warn(f"TranslationModule: {folder} gets no sentencepiece.model/translation.json: this model "
                           "never ran with a WMTDataModule (or its checkpoint predates them), so "
                           "translate_from_export cannot use the folder.")
            return []
        spm, config = folder / EXPORT_SPM, folder / EXPORT_CONFIG
        spm.write_bytes(self.tokenizer_files["sentencepiece"])
        hp = self.hparams
        config.write_text(json.dumps({
            "format": "step_lightning.translation/1",
            "weights": "model.safetensors", "weights_prefix": "model.", "sentencepiece": EXPORT_SPM,
            **{key: self.tokenizer_files[key] for key in ("src_lang", "tgt_lang", "vocab_size")},
            "arch": hp["arch"], "num_tokens": hp["num_tokens"], "pad_idx": hp["pad_idx"],
            "max_positions": hp["max_positions"],
            "model": {"builder": "fairseq2.models.nllb.create_nllb_model (pre-LN encoder-decoder Transformer)",
                      **ARCHS[hp["arch"]]},
            "beam_size": self.beam_size, "len_penalty": self.len_penalty, "max_gen_len": list(self.max_gen_len),
        }, indent=2) + "\n")
        return [spm, config]

    def configure_optimizers(self) -> Any:
        return configure_optimization(self, parameter_groups(self), self.optimizer_factory, self.scheduler_factory)
