"""Adapters for Hugging Face transformers/datasets and accelerate (installed as `logra.integrations`).

The core (`logra`) never imports these libraries; install them with `pip install logra[hf]`.
"""
