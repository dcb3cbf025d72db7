"""What any first-order score can see of the demo's source-recovery check: exact, unprojected.

`make demo` asks which Lee article a held-out passage came from. Whole-model fine-tuning on one
article (benchmarks/demo_ground_truth.py, Adam 5e-5 x 5 steps on every Linear weight) puts the
source first for 4 of the 5 demo passages; logra, a projected first-order score at the pretrained
weights, for 2. This benchmark removes the projection and asks whether *any* first-order score
does better. Two experiments, float32, no projection, no logra code on the scoring path:

--experiment whole-model: the exact gradient of every Linear weight of all 30 blocks and the
    untied head (134,479,872 numbers) for each article (its mean token loss over the first 64
    tokens) and each passage (its summed token loss); score(q, d) = Σ_layers <∇L_q, D(G_d)> for
    train-side maps D:

    dot          D(G) = G                         plain gradient similarity
    sign         D(G) = sign(G)                   one Adam step from a fresh optimizer state: the
                                                  first-order change under the ground truth's optimizer
    adafactor    D(G) = G / sqrt(r cᵀ / Σr)       r, c the row and column sums of G²: the article's own
                                                  second moment factorised (exactly sign(G) when G is rank one)
    unit_layer   D(G) = G / ||G||_F per layer
    corpus_v     D(G) = G / sqrt(v)               v the mean G² of --prior articles, elementwise: TrackStar's
                                                  correction with the corpus standing in for the optimizer state
    corpus_v_cos both sides / sqrt(v), cosine     TrackStar without the curvature
    corpus_vf_cos the same with v factorised row x column (what logra's OptimizerCorrection folds)

    Memory: 0.54 GB per passage (the passages' gradients are held), so the five demo passages and
    the first --validation of the 33 validation passages (default 8). About 6 s per article on 2
    cores: 31 minutes.

--experiment per-article-curvature: the demo's logged layers (down_proj of blocks 26-29, lm_head),
    each article's own Newton step instead of the corpus curvature. Many Adam steps on one article
    move towards that article's own minimum, Δ_d ≈ H_d⁻¹ g_d, so with per-article KFAC factors
    A_d = XᵀX (inputs, T x n_in) and B_d = GᵀG (output gradients, T x n_out):

        score(q, d) = Σ_layers <Q_l, (B_d + λ_B)⁻¹ GᵀX (A_d + λ_A)⁻¹>
                    = Σ_layers Σ_ts M_ts (G Q_l Xᵀ)_ts,   M = (GGᵀ + λ_B)⁻¹ (XXᵀ + λ_A)⁻¹   (T x T, Woodbury)

    λ_A = α tr(XXᵀ)/T and λ_B = α tr(GGᵀ)/T over a grid of α, one side or both, layers summed as
    they are or each divided by its standard deviation over the articles first. All 38 passages;
    about 8 minutes.

Reported per map: the source's rank for every passage, how often it is first (demo; validation),
in the top 5 (validation), and the mean Spearman correlation with the whole-model ground truth's
gains on the five demo passages (--gain).

    make demo
    .venv/bin/python benchmarks/demo_first_order.py --experiment whole-model
    .venv/bin/python benchmarks/demo_first_order.py --experiment per-article-curvature
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from logra.evaluation import spearman

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
LOGGED = tuple(f"model.layers.{i}.mlp.down_proj" for i in (26, 27, 28, 29)) + ("lm_head",)
ALPHAS = (1e-3, 1e-2, 1e-1, 1.0, 10.0)
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "scripts"))
from demo_ground_truth import padded, passage_losses, source_counts, untie_head  # noqa: E402
from demo_setup import read_jsonl  # noqa: E402


def adafactor_map(G: Tensor) -> Tensor:
    """G / sqrt(r cᵀ / Σr) for one (n_out, n_in) gradient: its own second moment, factorised."""
    sq = G * G
    r, c = sq.sum(1, keepdim=True), sq.sum(0, keepdim=True)
    return G / ((r * c / r.sum()).sqrt() + torch.finfo(G.dtype).tiny)


def newton_scores(C: Tensor, K: Tensor, L: Tensor, lam_k: Tensor | None, lam_l: Tensor | None) -> Tensor:
    """Σ_ts M_ts C_ts with M = (L + λ_l)⁻¹ (K + λ_k)⁻¹ (a side without λ is the identity).

    C (P, N, T, T) = G Q Xᵀ per passage and article; K (N, T, T) = X Xᵀ; L (N, T, T) = G Gᵀ;
    λ (N,). Equals <Q, (GᵀG + λ_l)⁻¹ GᵀX (XᵀX + λ_k)⁻¹> (tests/test_demo_first_order.py).
    """
    eye = torch.eye(K.shape[-1], dtype=K.dtype)
    mk = torch.linalg.inv(K + lam_k[:, None, None] * eye) if lam_k is not None else eye.expand_as(K)
    ml = torch.linalg.inv(L + lam_l[:, None, None] * eye) if lam_l is not None else eye.expand_as(L)
    return torch.einsum("pnts,nts->pn", C, ml @ mk)


def load(model_dir: Path) -> tuple[Any, nn.Module]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    untie_head(model)
    for p in model.parameters():
        p.requires_grad_(False)
    return AutoTokenizer.from_pretrained(model_dir), model


def passage_ids(tok: Any, q: dict) -> list[int]:
    return tok(q["prompt"])["input_ids"] + tok(q["text"], add_special_tokens=False)["input_ids"]


def gradients(model: nn.Module, weights: list[nn.Parameter], ids: list[int], mean: bool) -> list[Tensor]:
    """The gradient of one sequence's summed (or mean) next-token loss for each of `weights`."""
    for w in weights:
        w.requires_grad_(True)
        w.grad = None
    x = torch.tensor([ids])
    with torch.enable_grad():
        loss = passage_losses(model(input_ids=x).logits, x, torch.ones(x.shape)).sum()
        (loss / (x.shape[1] - 1) if mean else loss).backward()
    out = [w.grad.detach().clone() for w in weights]  # type: ignore[union-attr]
    for w in weights:
        w.requires_grad_(False)
        w.grad = None
    return out


def whole_model(args: argparse.Namespace, tok: Any, model: nn.Module, passages: list[dict], docs: list[dict]) -> dict:
    modules = [
        m
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and (n.startswith("model.layers.") or n == "lm_head")
    ]
    weights = [m.weight for m in modules]
    Q = [torch.zeros(len(passages), w.numel()) for w in weights]
    for i, q in enumerate(passages):
        for l, g in enumerate(gradients(model, weights, passage_ids(tok, q), mean=False)):
            Q[l][i] = g.flatten()

    def article(d: dict) -> list[Tensor]:
        return gradients(model, weights, tok(d["text"], truncation=True, max_length=args.max_length)["input_ids"], True)

    prior = list(range(0, len(docs), max(1, len(docs) // args.prior)))[: args.prior]
    v = [torch.zeros_like(w) for w in weights]
    for j in prior:
        for l, g in enumerate(article(docs[j])):
            v[l] += g * g / len(prior)
    eps = [1e-8 * x.mean().sqrt() for x in v]
    rv = [1 / (x.sqrt() + e) for x, e in zip(v, eps)]
    rf = [1 / ((x.sum(1, keepdim=True) * x.sum(0, keepdim=True) / x.sum()).sqrt() + e) for x, e in zip(v, eps)]
    del v
    names = ["dot", "sign", "adafactor", "unit_layer", "corpus_v", "corpus_v_cos", "corpus_vf_cos"]
    scores = {m: np.zeros((len(passages), len(docs))) for m in names}
    q_norm = {
        "v": torch.zeros(len(passages), dtype=torch.float64),
        "vf": torch.zeros(len(passages), dtype=torch.float64),
    }
    for l in range(len(weights)):
        q_norm["v"] += ((Q[l] * rv[l].flatten()).double() ** 2).sum(1)
        q_norm["vf"] += ((Q[l] * rf[l].flatten()).double() ** 2).sum(1)
    from tqdm import tqdm

    for j, d in enumerate(tqdm(docs, desc="articles", file=sys.stderr)):
        total = torch.zeros(len(passages), len(names), dtype=torch.float64)
        n_v = n_vf = 0.0
        for l, G in enumerate(article(d)):
            gv, gf = G * rv[l], G * rf[l]
            n_v += float((gv.double() ** 2).sum())
            n_vf += float((gf.double() ** 2).sum())
            maps = torch.stack([G, torch.sign(G), adafactor_map(G), G / G.norm(), gv, gv * rv[l], gf * rf[l]])
            total += (Q[l] @ maps.flatten(1).T).double()
        for k, m in enumerate(names[:5]):
            scores[m][:, j] = total[:, k].numpy()
        scores["corpus_v_cos"][:, j] = (total[:, 5] / (q_norm["v"].sqrt() * n_v**0.5)).numpy()
        scores["corpus_vf_cos"][:, j] = (total[:, 6] / (q_norm["vf"].sqrt() * n_vf**0.5)).numpy()
    return scores


def per_article_curvature(
    args: argparse.Namespace, tok: Any, model: nn.Module, passages: list[dict], docs: list[dict]
) -> dict:
    modules = dict(model.named_modules())
    seen: dict[str, list[Tensor | None]] = {}

    def hook(name: str) -> Any:
        def forward(module: nn.Module, inputs: tuple, output: Tensor) -> None:
            seen[name] = [inputs[0].detach(), None]
            output.requires_grad_(True)
            output.register_hook(lambda g: seen[name].__setitem__(1, g.detach()))

        return forward

    handles = [modules[n].register_forward_hook(hook(n)) for n in LOGGED]

    def run(seqs: list[list[int]], mean: bool) -> tuple[list[tuple[Tensor, Tensor]], Tensor]:
        x, mask = padded(seqs)
        with torch.enable_grad():
            per = passage_losses(model(input_ids=x).logits, x, mask)
            (per / mask[:, 1:].sum(1) if mean else per).sum().backward()
        return [(seen[n][0] * mask[..., None], seen[n][1] * mask[..., None]) for n in LOGGED], mask  # type: ignore[operator]

    Q: list[list[Tensor]] = [[] for _ in LOGGED]
    for i in range(0, len(passages), 8):
        for l, (x, g) in enumerate(run([passage_ids(tok, q) for q in passages[i : i + 8]], mean=False)[0]):
            Q[l].append(torch.einsum("bto,bti->boi", g, x))
    Qs = [torch.cat(q) for q in Q]
    variants = ["dot"] + [f"newton a={a:g} {side}" for a in ALPHAS for side in ("both", "inputs", "outputs")]
    per_layer = {v: np.zeros((len(passages), len(docs), len(LOGGED))) for v in variants}
    from tqdm import tqdm

    for j in tqdm(range(0, len(docs), 8), desc="articles (batches of 8)", file=sys.stderr):
        chunk = docs[j : j + 8]
        seqs = [tok(d["text"], truncation=True, max_length=args.max_length)["input_ids"] for d in chunk]
        layers, mask = run(seqs, mean=True)
        length = mask.sum(1).double()
        for l, (x, g) in enumerate(layers):
            # G Q Xᵀ in float32 (the model's dtype), the small T x T solves in float64
            C = torch.einsum("bpti,bsi->pbts", torch.einsum("bto,poi->bpti", g, Qs[l]), x).double()
            x, g = x.double(), g.double()
            K, L = x @ x.transpose(1, 2), g @ g.transpose(1, 2)
            per_layer["dot"][:, j : j + len(chunk), l] = C.diagonal(dim1=-2, dim2=-1).sum(-1).numpy()
            tk, tl = K.diagonal(dim1=-2, dim2=-1).sum(-1) / length, L.diagonal(dim1=-2, dim2=-1).sum(-1) / length
            for a in ALPHAS:
                for side in ("both", "inputs", "outputs"):
                    s = newton_scores(
                        C, K, L, a * tk if side != "outputs" else None, a * tl if side != "inputs" else None
                    )
                    per_layer[f"newton a={a:g} {side}"][:, j : j + len(chunk), l] = s.numpy()
    for h in handles:
        h.remove()
    scores = {}
    for v, s in per_layer.items():
        scores[v] = s.sum(-1)
        scores[v + ", layers normalised"] = (s / s.std(1, keepdims=True)).sum(-1)
    return scores


def summary(scores: np.ndarray, sources: list[int], n_demo: int, gain: np.ndarray | None) -> dict[str, Any]:
    row = {**source_counts(scores, sources, n_demo), "validation_passages": len(sources) - n_demo}
    if gain is not None:
        row["spearman_whole_model_demo"] = float(spearman(scores[:n_demo], gain).mean())
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", choices=("whole-model", "per-article-curvature"), required=True)
    parser.add_argument("--demo-dir", type=Path, default=Path("demo_out"))
    parser.add_argument("--model", type=Path, default=Path.home() / ".cache/logra/models/SmolLM2-135M-Instruct")
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--validation", type=int, help="validation passages (whole-model default 8; else all 33)")
    parser.add_argument("--prior", type=int, default=40, help="whole-model: articles whose mean G² is the corpus v")
    parser.add_argument(
        "--gain", type=Path, default=RESULTS / "demo_ground_truth_adam_lr5e-05_steps5_all_layers.npz",
        help="the whole-model ground truth (demo_ground_truth.py --modules 'model.layers.*' lm_head --only-demo)",
    )  # fmt: skip
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    queries = [q for q in read_jsonl(args.demo_dir / "queries.jsonl") if q["id"].startswith("passage-from-")]
    validation = [q for q in read_jsonl(args.demo_dir / "validation.jsonl") if q["id"].startswith("passage-from-")]
    n_val = args.validation if args.validation is not None else (8 if args.experiment == "whole-model" else None)
    passages = queries + validation[:n_val]
    docs = read_jsonl(args.demo_dir / "corpus.jsonl")
    ids = [d["id"] for d in docs]
    sources = [ids.index(q["id"].removeprefix("passage-from-")) for q in passages]
    gain = None
    if args.gain.is_file():
        truth = np.load(args.gain)
        if list(truth["articles"]) != ids or list(truth["passages"][: len(queries)]) != [q["id"] for q in queries]:
            raise SystemExit(f"--gain {args.gain}: its articles or passages are not this demo's.")
        gain = truth["gain"][: len(queries)]
    tok, model = load(args.model)
    start = time.perf_counter()
    run = whole_model if args.experiment == "whole-model" else per_article_curvature
    scores = run(args, tok, model, passages, docs)
    table = {name: summary(s, sources, len(queries), gain) for name, s in scores.items()}
    for name, row in table.items():
        print(
            f"{name:40s} source first {row['source_first_demo']}/{len(queries)} demo, "
            f"{row['source_first_validation']}/{row['validation_passages']} validation (top 5: "
            f"{row['source_top5_validation']}); demo ranks {row['source_ranks'][: len(queries)]}"
            + (f"; spearman vs whole-model training {row['spearman_whole_model_demo']:.2f}" if gain is not None else "")
        )
    out = args.out or RESULTS / f"demo_first_order_{args.experiment}.json"
    recipe = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "out"}
    result = {
        "recipe": recipe,
        "passages": [q["id"] for q in passages],
        "seconds": time.perf_counter() - start,
        "table": table,
    }
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
