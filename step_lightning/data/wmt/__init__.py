"""WMT translation from plain parallel text, one module per concept.

* :mod:`.corpus`: the ``{train,valid,test}.{src,tgt}`` layout, its checks, the Hub download.
* :mod:`.tokenizer`: the joint SentencePiece model: training, the cache key that names it, loading it in fairseq2.
* :mod:`.pipeline`: the fairseq2 pipeline that makes batches by token count.
* :mod:`.loaders`: the re-iterable (and, for training, resumable) views Lightning iterates.
* :mod:`.datamodule`: :class:`WMTDataModule`, which ties them together.

fairseq2 and ``sentencepiece`` are imported only inside the functions that need them.
"""

from step_lightning.data.wmt.corpus import (
    SPLITS,
    check_aligned,
    check_parallel_dir,
    count_lines,
    download_wmt,
    hub_pair,
    parallel_files,
)
from step_lightning.data.wmt.datamodule import WMTDataModule
from step_lightning.data.wmt.loaders import EvalBatches, ResumableBatches
from step_lightning.data.wmt.pipeline import BATCH_SHUFFLE_WINDOW, batch_pipeline, bucket_sizes
from step_lightning.data.wmt.tokenizer import (
    NLLB_EXTRA_SYMBOLS,
    SPM_FORMAT,
    file_key,
    load_tokenizer,
    nllb_vocab_size,
    spm_model_path,
    train_sentencepiece,
)

__all__ = [
    "BATCH_SHUFFLE_WINDOW",
    "NLLB_EXTRA_SYMBOLS",
    "SPLITS",
    "SPM_FORMAT",
    "EvalBatches",
    "ResumableBatches",
    "WMTDataModule",
    "batch_pipeline",
    "bucket_sizes",
    "check_aligned",
    "check_parallel_dir",
    "count_lines",
    "download_wmt",
    "file_key",
    "hub_pair",
    "load_tokenizer",
    "nllb_vocab_size",
    "parallel_files",
    "spm_model_path",
    "train_sentencepiece",
]
