"""Adapters for Hugging Face transformers/datasets and accelerate (installed as `logra.integrations`).

- `hf`: a logging pass through a user's `Trainer` (`log_trainer`, `trainer_rows`), per-example losses,
  and the true Fisher of its model (`trainer_fisher`).
- `hf_data`: the data side of that pass: dataset ids, tokenising raw text, collating batches.
- `hf_callback`: `LoGraCallback`, projected gradients at chosen steps (TracIn), `tracin_scores`.
- `hf_export`: scores joined back to a `datasets.Dataset` by id, long tables, parquet.
- `accelerate`: `accelerate_logger` and the launch check for `accelerate launch`.

The core (`logra`) never imports these libraries; install them with `pip install logra[hf]`.
"""
