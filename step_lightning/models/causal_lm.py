"""Causal language modelling with any Hugging Face ``AutoModelForCausalLM``: loss, perplexity, text samples."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.loggers import TensorBoardLogger
from torchmetrics import Metric
from typing_extensions import override

from step_lightning.callbacks.predictions import PredictionTable
from step_lightning.checks import NonEmptyStr, NonNegativeInt, PositiveFloat, PositiveInt, check_arguments
from step_lightning.models.optimization import configure_optimization, parameter_groups

Batch = dict[str, torch.Tensor]
_STATE_KEY = "causal_lm_validation_runs"
SAMPLES_FILE = "val_samples.md"  # in the run folder, one "## step N" section per sample


def _default_optimizer(params: Any) -> torch.optim.Optimizer:
    from step_lightning.optim import StepAdamW

    return StepAdamW(params, lr=5e-5, weight_decay=0.01)


class TokenMeanLoss(Metric):
    """Mean loss over tokens: ``update(batch_mean_loss, tokens)`` weighs each batch by its token count.

    Sums across DDP ranks; a non-finite loss makes the result non-finite (it is not dropped). (torchmetrics'
    ``MeanMetric`` is not used: with ``nan_strategy="disable"`` it ignores the weights, torchmetrics 1.9.)
    """

    full_state_update = False
    loss_sum: torch.Tensor
    tokens: torch.Tensor

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("loss_sum", torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("tokens", torch.tensor(0.0), dist_reduce_fx="sum")

    @override
    def update(self, loss: torch.Tensor, tokens: torch.Tensor | int) -> None:
        tokens = torch.as_tensor(tokens, dtype=self.tokens.dtype, device=self.tokens.device)
        self.loss_sum += loss.detach().to(self.loss_sum.dtype) * tokens
        self.tokens += tokens

    @override
    def compute(self) -> torch.Tensor:
        return self.loss_sum / self.tokens


class TokenPerplexity(TokenMeanLoss):
    """``exp`` of :class:`TokenMeanLoss`: the perplexity of the whole set, not a mean of per-batch ones."""

    @override
    def compute(self) -> torch.Tensor:
        return super().compute().exp()


def _sharded(strategy: Any) -> bool:
    # FSDP / DeepSpeed shard the weights: every rank must join the forward passes of `generate`.
    return any(name in type(strategy).__name__ for name in ("FSDP", "DeepSpeed", "ModelParallel"))


class CausalLM(pl.LightningModule):
    """Next-token prediction with a Hugging Face causal LM (GPT-2, Llama, ...); the recipe is a callback.

    Logs ``train/loss`` every step; ``val/loss`` and ``val/ppl`` (and ``test/...``) once per evaluation:
    the loss is the mean over every predicted token of the whole set (each batch weighted by its token
    count, summed across DDP ranks), and the perplexity is its exponential, not a mean of per-batch
    perplexities. Batches are ``{"input_ids", "labels"}`` (``labels`` equal to the inputs, ``-100`` for
    ignored positions); the model shifts the labels itself (see
    :class:`~step_lightning.data.WikiTextDataModule`).

    At the end of every ``generate_every_n_val``-th validation (never the sanity check) the model being
    validated (under an N:M recipe the masked one, which the recipe callback swaps in) continues ``prompt``
    greedily. The text is appended to ``val_samples.md`` in the run folder (``trainer.log_dir``, whatever
    the logger: CSV, TensorBoard, none) and, with a ``TensorBoardLogger``, also logged as ``val/sample``;
    only on global rank zero. Greedy decoding draws no random numbers, and the RNG state is forked anyway,
    so training's randomness is untouched.

    ``predict`` continues the prompts of ``WikiTextDataModule.predict_file`` (one per line) by ``max_new_tokens``
    tokens, greedily or sampled (``do_sample``, seeded); the CLI's
    :class:`~step_lightning.callbacks.PredictionWriter` writes ``continuations.tsv`` into the run folder.

    Args:
        model_name_or_path: a Hugging Face model name or a local directory (``save_pretrained``); its
            tokenizer is used for the samples.
        pretrained: load the pretrained weights (fine-tuning, the default); ``False``: the same architecture
            with freshly initialised weights (training from scratch).
        optimizer: builds the optimizer from two parameter groups (no weight decay on biases and norm
            weights); default ``StepAdamW(lr=5e-5, weight_decay=0.01)``, which every recipe accepts.
        lr_scheduler: optional, builds a scheduler from the optimizer, stepped every optimizer step;
            :class:`~step_lightning.optim.WarmupDecayLR` takes its length from the trainer.
        generate_every_n_val: write a sample every this many validations; ``0``: never.
        prompt: the text the sample continues.
        max_new_tokens: tokens generated per sample, and per prompt in ``predict``.
        do_sample: ``predict`` samples (at ``temperature``) instead of decoding greedily.
        temperature: the sampling temperature of ``predict`` with ``do_sample``.
        sample_seed: seeds ``predict``'s sampling (with each batch's first line number).

    Raises:
        ValueError: an invalid argument.
        RuntimeError: the model cannot be loaded from ``model_name_or_path``.

    Example::

        model:
          class_path: step_lightning.models.CausalLM
          init_args:
            model_name_or_path: gpt2
            optimizer:
              class_path: step_lightning.optim.StepAdamW
              init_args: {lr: 1.0e-4, weight_decay: 0.01}
            lr_scheduler:
              class_path: step_lightning.optim.WarmupDecayLR
              init_args: {warmup: 0.05, decay: linear}
    """

    def __init__(
        self,
        model_name_or_path: NonEmptyStr = "gpt2",
        pretrained: bool = True,
        optimizer: OptimizerCallable = _default_optimizer,
        lr_scheduler: LRSchedulerCallable | None = None,
        generate_every_n_val: NonNegativeInt = 1,
        prompt: NonEmptyStr = "The",
        max_new_tokens: PositiveInt = 32,
        do_sample: bool = False,
        temperature: PositiveFloat = 1.0,
        sample_seed: int = 0,
    ) -> None:
        super().__init__()
        check_arguments(CausalLM, locals(), flag="--model.{}")
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        # from_pretrained returns the model in eval mode; Lightning keeps submodule modes, so without this
        # training would run with dropout off.
        self.model = self._load_model(model_name_or_path, pretrained).train()
        self.optimizer_factory = optimizer
        self.scheduler_factory = lr_scheduler
        self.val_loss = TokenMeanLoss()
        self.val_ppl = TokenPerplexity()
        self.test_loss = TokenMeanLoss()
        self.test_ppl = TokenPerplexity()
        self.validation_runs = 0
        self._tokenizer: Any = None

    @staticmethod
    def _load_model(model_name_or_path: str, pretrained: bool) -> torch.nn.Module:
        from transformers import AutoConfig, AutoModelForCausalLM

        try:
            if pretrained:
                return AutoModelForCausalLM.from_pretrained(model_name_or_path)
            return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_name_or_path))
        except (OSError, ValueError) as err:
            raise RuntimeError(
                f"CausalLM: cannot load a causal LM from `--model.model_name_or_path`={model_name_or_path!r} "
                f"({type(err).__name__}: {err}); pass a Hugging Face model name (downloaded once) or a local "
                "directory saved with `save_pretrained`."
            ) from err

    @property
    def tokenizer(self) -> Any:
        """The tokenizer of ``model_name_or_path`` (loaded on first use, for the samples)."""
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.hparams["model_name_or_path"])
        return self._tokenizer

    @override
    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, **kwargs: Any) -> Any:
        return self.model(input_ids=input_ids, labels=labels, **kwargs)

    def _loss(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's mean loss over the batch's predicted tokens, and how many tokens that is."""
        labels = batch["labels"]
        loss = self(batch["input_ids"], labels=labels).loss
        tokens = (labels[:, 1:] != -100).sum()  # the model predicts position t + 1 from positions <= t
        return loss, tokens

    @override
    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        loss, _ = self._loss(batch)
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True,
                 batch_size=batch["input_ids"].shape[0])
        return loss

    def _eval_step(self, batch: Batch, stage: str, loss_metric: TokenMeanLoss, ppl_metric: TokenPerplexity) -> None:
        loss, tokens = self._loss(batch)
        loss_metric.update(loss.detach(), tokens)
        ppl_metric.update(loss.detach(), tokens)
        # Lightning computes the metrics (synchronised across ranks) at the end of the epoch, then resets them.
        self.log(f"{stage}/loss", loss_metric, on_step=False, on_epoch=True, prog_bar=stage == "val")
        self.log(f"{stage}/ppl", ppl_metric, on_step=False, on_epoch=True, prog_bar=stage == "val")

    @override
    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self._eval_step(batch, "val", self.val_loss, self.val_ppl)

    @override
    def test_step(self, batch: Batch, batch_idx: int) -> None:
        self._eval_step(batch, "test", self.test_loss, self.test_ppl)

    @override
    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return
        self.validation_runs += 1
        every = self.hparams["generate_every_n_val"]
        if every and self.validation_runs % every == 0:
            self._write_sample()

    def _write_sample(self) -> None:
        log_dir = self.trainer.log_dir  # a collective under DDP: every rank must ask
        writers = [lg.experiment for lg in self.loggers if isinstance(lg, TensorBoardLogger)]
        if not writers and log_dir is None:
            return
        zero = self.trainer.is_global_zero
        if not (zero or _sharded(self.trainer.strategy)):
            return
        text = self.generate_sample()
        if not zero:
            return
        for writer in writers:
            writer.add_text("val/sample", text, self.global_step)
        if log_dir is not None:
            path = Path(log_dir) / SAMPLES_FILE
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a", encoding="utf-8") as f:
                f.write(f"## step {self.global_step}\n\n{text}\n\n")

    @torch.no_grad()
    def generate_sample(self, prompt: str | None = None, max_new_tokens: int | None = None) -> str:
        """``prompt`` (default: the ``prompt`` argument) and its greedy continuation, decoded."""
        from transformers import GenerationConfig

        tokenizer = self.tokenizer
        inputs = tokenizer(prompt or self.hparams["prompt"], return_tensors="pt").to(self.device)
        eos = tokenizer.eos_token_id
        config = GenerationConfig(max_new_tokens=max_new_tokens or self.hparams["max_new_tokens"], do_sample=False,
                                  num_beams=1, eos_token_id=eos,
                                  pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos)
        was_training = self.model.training
        self.model.eval()
        devices = [self.device] if self.device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices):
                # Keyword arguments win over the model's saved generation defaults (which may sample).
                out = self.model.generate(**inputs, generation_config=config, do_sample=False, num_beams=1)
        finally:
            self.model.train(was_training)
        return tokenizer.decode(out[0], skip_special_tokens=True)

    # ---- predict: continue prompts ------------------------------------------------------------------------
    @override
    def predict_step(self, batch: dict[str, list[Any]], batch_idx: int) -> list[tuple[str, str]]:
        """``(prompt, continuation)`` for a batch of prompts (``WikiTextDataModule.predict_file``): the generated
        text only, ``max_new_tokens`` tokens at most.

        Greedy unless ``do_sample``; sampling is seeded per batch by ``sample_seed`` and the batch's first line
        number, so a rerun (on any number of devices with the same batches) writes the same text.
        """
        from transformers import GenerationConfig

        prompts = batch.get("prompt") if isinstance(batch, dict) else None
        if prompts is None:
            raise ValueError("CausalLM.predict_step continues prompts: batches must be {'index', 'prompt'}, as "
                             "WikiTextDataModule gives with `--data.init_args.predict_file PATH`.")
        tokenizer = self.tokenizer
        eos = tokenizer.eos_token_id
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
        side, tokenizer.padding_side = tokenizer.padding_side, "left"  # generation appends on the right
        try:
            if tokenizer.pad_token_id is None:
                tokenizer.pad_token = tokenizer.eos_token
            # An empty prompt starts from the end-of-text token, as GPT-2's unconditional samples do.
            inputs = tokenizer([p or tokenizer.eos_token for p in prompts], return_tensors="pt", padding=True,
                               add_special_tokens=False).to(self.device)
        finally:
            tokenizer.padding_side = side
        hp = self.hparams
        config = GenerationConfig(max_new_tokens=hp["max_new_tokens"], do_sample=hp["do_sample"], num_beams=1,
                                  temperature=hp["temperature"] if hp["do_sample"] else None,
                                  eos_token_id=eos, pad_token_id=pad)
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(hp["sample_seed"] + int(batch["index"][0]))
            out = self.model.generate(**inputs, generation_config=config)
        texts = tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        return list(zip(prompts, texts, strict=True))

    def format_predictions(self, predictions: list[list[tuple[str, str]]], dataloader_idx: int = 0
                           ) -> PredictionTable:
        """``continuations.tsv`` for :class:`~step_lightning.callbacks.PredictionWriter`: ``index``, ``prompt``,
        ``continuation`` (the generated text only; fields with tabs or newlines are quoted, CSV-style)."""
        return PredictionTable("continuations.tsv", ("index", "prompt", "continuation"),
                               [pair for batch in predictions for pair in batch], delimiter="\t")

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[_STATE_KEY] = self.validation_runs

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.validation_runs = int(checkpoint.get(_STATE_KEY, 0))

    @override
    def configure_optimizers(self) -> Any:
        return configure_optimization(self, parameter_groups(self.model), self.optimizer_factory,
                                      self.scheduler_factory)
