"""Tiny seeded float64 models, datasets and batch-size-1 references for the tests.

Three architectures, each built from a config and never downloaded:

- ``mlp``: a token-wise MLP (plain `nn.Linear`) over float inputs (B, T, d) with per-token classes;
- ``gpt2``: a 2-layer GPT-2 (Hugging Face `Conv1D`), lm_head untied from the embedding;
- ``llama``: a 2-layer Llama (`nn.Linear`, grouped-query attention, RoPE).

An example is a dict of unbatched tensors with a leading length dimension; `collate` right-pads a
list of examples and returns the (B, T) mask. `per_example_loss` is the sum of token losses over
non-padding tokens (labels -100 are ignored), shape (B,). The references run each example
*alone and unpadded* through plain autograd, with none of logra's machinery.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Example = dict[str, Tensor]
Batch = dict[str, Tensor]

MLP_IN, MLP_HIDDEN, MLP_CLASSES = 6, 10, 5
VOCAB = 40
ARCHITECTURES = ("mlp", "gpt2", "llama")


class TokenMLP(nn.Module):
    """x (B, T, d_in) or (B, d_in) -> logits (..., classes) through three Linear layers."""

    def __init__(self, d_in: int = MLP_IN, hidden: int = MLP_HIDDEN, classes: int = MLP_CLASSES) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


class TwiceMLP(nn.Module):
    """An MLP whose `shared` Linear is applied twice in one forward (its gradient must accumulate)."""

    def __init__(self, d_in: int = MLP_IN, hidden: int = MLP_HIDDEN, classes: int = MLP_CLASSES) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.shared = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.fc1(x))
        h = torch.tanh(self.shared(h))
        h = torch.sin(self.shared(h))
        return self.head(h)


def _seeded(seed: int, build: Callable[[], nn.Module]) -> nn.Module:
    """Build a float64 eval-mode model from `build` under `seed`, without touching the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build()
    return model.to(torch.float64).eval()


def build_model(arch: str, seed: int = 0) -> nn.Module:
    """A tiny float64 model of architecture `arch` (one of ARCHITECTURES)."""
    if arch == "mlp":
        return _seeded(seed, TokenMLP)
    if arch == "twice":
        return _seeded(seed, TwiceMLP)
    if arch == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        gpt2 = GPT2Config(
            n_layer=2, n_embd=16, n_head=2, n_positions=32, vocab_size=VOCAB, bos_token_id=0, eos_token_id=0,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=False,
        )  # fmt: skip
        gpt2._attn_implementation = "eager"
        return _seeded(seed, lambda: GPT2LMHeadModel(gpt2))
    if arch == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        llama = LlamaConfig(
            hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=VOCAB, max_position_embeddings=32, bos_token_id=0, eos_token_id=0, pad_token_id=0,
            tie_word_embeddings=False,
        )  # fmt: skip
        llama._attn_implementation = "eager"
        return _seeded(seed, lambda: LlamaForCausalLM(llama))
    raise ValueError(f"unknown test architecture {arch!r}")


def make_examples(arch: str, n: int, seed: int = 1, min_len: int = 2, max_len: int = 7) -> list[Example]:
    """`n` examples of random lengths in [min_len, max_len] for `arch` (float64 inputs for MLPs)."""
    gen = torch.Generator().manual_seed(seed)
    out: list[Example] = []
    for _ in range(n):
        t = int(torch.randint(min_len, max_len + 1, (), generator=gen))
        if arch in ("mlp", "twice"):
            x = torch.randn(t, MLP_IN, generator=gen, dtype=torch.float64)
            out.append({"x": x, "y": torch.randint(0, MLP_CLASSES, (t,), generator=gen)})
        else:
            out.append({"input_ids": torch.randint(0, VOCAB, (t,), generator=gen)})
    return out


def make_plain_examples(n: int, seed: int = 1) -> list[Example]:
    """`n` MLP examples without a sequence dimension: x (d_in,), y ()."""
    gen = torch.Generator().manual_seed(seed)
    return [
        {
            "x": torch.randn(MLP_IN, generator=gen, dtype=torch.float64),
            "y": torch.randint(0, MLP_CLASSES, (), generator=gen),
        }
        for _ in range(n)
    ]


def collate(examples: Sequence[Example]) -> tuple[Batch, Tensor | None]:
    """Right-pad examples to one batch. Returns (batch, mask (B, T) long), mask None for plain inputs."""
    first = examples[0]
    if "x" in first and first["x"].dim() == 1:  # plain (d_in,) examples
        return {"x": torch.stack([e["x"] for e in examples]), "y": torch.stack([e["y"] for e in examples])}, None
    lengths = [len(next(iter(e.values()))) for e in examples]
    T = max(lengths)
    mask = torch.zeros(len(examples), T, dtype=torch.long)
    for i, t in enumerate(lengths):
        mask[i, :t] = 1
    batch: Batch = {}
    for key in first:
        pad_value = -100 if key == "y" else 0
        rows = []
        for e in examples:
            v = e[key]
            pad = torch.full((T - len(v), *v.shape[1:]), pad_value, dtype=v.dtype)
            rows.append(torch.cat([v, pad]))
        batch[key] = torch.stack(rows)
    if "input_ids" in batch:
        batch["attention_mask"] = mask
    return batch, mask


def forward_logits(model: nn.Module, batch: Batch) -> Tensor:
    """The model's output logits: (B, T, C) or (B, C) for MLPs, (B, T, V) for language models."""
    if "x" in batch:
        return model(batch["x"])
    return model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).logits


def per_example_loss(model: nn.Module, batch: Batch) -> Tensor:
    """(B,) losses: each example's token cross-entropies summed over its non-padding tokens."""
    return losses_from_logits(forward_logits(model, batch), batch)


def losses_from_logits(logits: Tensor, batch: Batch) -> Tensor:
    """(B,) per-example losses from `forward_logits` (labels -100 and padding ignored)."""
    if "x" in batch:
        y = batch["y"]
        losses = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=-100, reduction="none"
        )
        return losses.reshape(y.shape[0], -1).sum(dim=1)
    ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    labels = ids if mask is None else ids.masked_fill(mask == 0, -100)
    shift_logits, shift_labels = logits[:, :-1], labels[:, 1:]
    losses = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1), ignore_index=-100, reduction="none"
    )
    return losses.reshape(shift_labels.shape).sum(dim=1)


def weight_out_in(module: nn.Module) -> Tensor:
    """The module's weight as an (n_out, n_in) matrix: Linear stores it so, HF Conv1D transposed."""
    if isinstance(module, nn.Linear):
        return module.weight
    if type(module).__name__ == "Conv1D":
        return module.weight.T
    raise TypeError(f"no reference weight layout for {type(module).__name__}")


def example_gradients(
    model: nn.Module, example: Example, names: Sequence[str], include_bias: bool = False
) -> dict[str, Tensor]:
    """∂L/∂W (n_out, n_in) of one example's own loss, computed alone and unpadded by plain autograd.

    With `include_bias`, layers that have a bias get its gradient appended as the last input
    column: (n_out, n_in + 1).
    """
    modules = dict(model.named_modules())
    with_bias = {name for name in names if include_bias and getattr(modules[name], "bias", None) is not None}
    params: list[Tensor] = []
    for name in names:
        params.append(modules[name].weight)
        if name in with_bias:
            params.append(modules[name].bias)
    batch, _ = collate([example])
    batch.pop("attention_mask", None)  # alone and unpadded: the plain, mask-free forward
    loss = per_example_loss(model, batch).sum()
    grads = iter(torch.autograd.grad(loss, params, allow_unused=True))
    out: dict[str, Tensor] = {}
    for name in names:
        module = modules[name]
        g = _zero_if_none(next(grads), module.weight)
        g = g if isinstance(module, nn.Linear) else g.T  # Conv1D weight is (n_in, n_out)
        if name in with_bias:
            b = _zero_if_none(next(grads), module.bias)
            g = torch.cat([g, b.unsqueeze(1)], dim=1)
        out[name] = g.detach()
    return out


def _zero_if_none(grad: Tensor | None, like: Tensor) -> Tensor:
    return torch.zeros_like(like) if grad is None else grad


def reference_rows(
    model: nn.Module,
    examples: Sequence[Example],
    layers: Sequence[Any],
    projection: Callable[[str], tuple[Tensor, Tensor]] | None,
    include_bias: bool = False,
    divisors: dict[str, Tensor] | None = None,
) -> Tensor:
    """(N, D) rows P_out (∂L_i/∂W) P_inᵀ flattened per layer, from a batch-size-1 autograd loop.

    `layers` is the logger's layer table (name, offset, ...); `projection(name)` gives (P_in, P_out).
    With `projection=None` the rows are the unprojected gradients (for identity at full size).
    `divisors[name]` (n_out x n_in, bias column included) divides a layer's gradient elementwise
    before it is projected (the optimizer correction's reference).
    """
    names = [layer.name for layer in layers]
    rows = []
    for example in examples:
        grads = example_gradients(model, example, names, include_bias)
        parts = []
        for name in names:
            g = grads[name] if divisors is None else grads[name] / divisors[name]
            if projection is not None:
                p_in, p_out = projection(name)
                g = p_out @ g @ p_in.T
            parts.append(g.reshape(-1))
        rows.append(torch.cat(parts))
    return torch.stack(rows)


def reference_statistics(
    model: nn.Module,
    examples: Sequence[Example],
    layers: Sequence[Any],
    projection: Callable[[str], tuple[Tensor, Tensor]],
) -> dict[str, tuple[Tensor, Tensor, int, int]]:
    """Σ_tokens x̃x̃ᵀ, Σ_tokens g̃g̃ᵀ, token count and example count per layer, example by example.

    Each example runs alone and unpadded; layer inputs come from forward hooks and output gradients
    from `torch.autograd.grad` with respect to the saved outputs (not from tensor hooks). A bias
    column of ones is appended to x when the layer table says so.
    """
    modules = dict(model.named_modules())
    totals = {
        layer.name: [torch.zeros(layer.k_in, layer.k_in, dtype=torch.float64),
                     torch.zeros(layer.k_out, layer.k_out, dtype=torch.float64), 0, 0]
        for layer in layers
    }  # fmt: skip
    for example in examples:
        seen: dict[str, list[tuple[Tensor, Tensor]]] = {layer.name: [] for layer in layers}
        handles = [
            modules[layer.name].register_forward_hook(
                lambda m, inp, out, name=layer.name, seen=seen: seen[name].append((inp[0], out))
            )
            for layer in layers
        ]
        try:
            batch, _ = collate([example])
            batch.pop("attention_mask", None)
            loss = per_example_loss(model, batch).sum()
        finally:
            for h in handles:
                h.remove()
        outputs = [out for layer in layers for _, out in seen[layer.name]]
        grads = iter(torch.autograd.grad(loss, outputs, allow_unused=True))
        for layer in layers:
            p_in, p_out = projection(layer.name)
            for x, out in seen[layer.name]:
                g = _zero_if_none(next(grads), out)
                x2 = x.detach().reshape(-1, x.shape[-1])
                if layer.bias:
                    x2 = torch.cat([x2, torch.ones(x2.shape[0], 1, dtype=x2.dtype)], dim=1)
                xt = x2 @ p_in.T  # (M, k_in)
                gt = g.reshape(-1, g.shape[-1]) @ p_out.T  # (M, k_out)
                acc = totals[layer.name]
                acc[0] += xt.T @ xt
                acc[1] += gt.T @ gt
                acc[2] += x2.shape[0]
            totals[layer.name][3] += 1
    return {name: (a, s, int(t), int(n)) for name, (a, s, t, n) in totals.items()}


def log_rows(
    logger: Any,
    examples: Sequence[Example],
    ids: Sequence[Any],
    batch_size: int,
    reduction: str = "sum",
    use_mask: bool = True,
) -> tuple[list[Any], Tensor]:
    """Run `examples` through `logger` in batches; returns (ids, rows) in logging order.

    With `use_mask=False` neither the model nor the logger gets a mask (for unpadded batches).
    """  # fmt: skip
    model = logger.model
    all_ids: list[Any] = []
    all_rows: list[Tensor] = []
    for start in range(0, len(examples), batch_size):
        batch, mask = collate(examples[start : start + batch_size])
        if not use_mask:
            batch.pop("attention_mask", None)
            mask = None
        with logger.record(ids=list(ids[start : start + batch_size]), mask=mask) as rec:
            losses = per_example_loss(model, batch)
            (losses.mean() if reduction == "mean" else losses.sum()).backward()
        all_ids.extend(rec.ids)
        all_rows.append(rec.rows)
    return all_ids, torch.cat(all_rows)


def assert_rows_close(actual: Tensor, expected: Tensor, layers: Sequence[Any], rel: float = 1e-10) -> None:
    """Each layer's block of `actual` within rel * (its largest |expected| entry) of `expected`."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    actual, expected = actual.to(torch.float64), expected.to(torch.float64)
    for layer in layers:
        a = actual[:, layer.offset : layer.offset + layer.size]
        e = expected[:, layer.offset : layer.offset + layer.size]
        scale = e.abs().max().item()
        assert scale > 0, f"layer {layer.name}: the reference gradient is all zero, the test would be vacuous"
        err = (a - e).abs().max().item()
        assert err <= rel * scale, f"layer {layer.name}: max error {err:.3e} > {rel:.0e} x {scale:.3e}"
