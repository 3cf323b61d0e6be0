"""Cost of generation with per-token uncertainty, against plain greedy ``generate``.

A small random Llama-architecture PEFT model (hidden 256, 4 layers, vocabulary 8192, LoRA r=8 on
q/v), a 16-token prompt, 16 new tokens (EOS disabled), S = 4 posterior samples (random K-FAC-like
factors, prior precision 1). Cases: Hugging Face ``generate`` (greedy, key/value cache); the
``"weights"`` mode of ``flaplace.app.generation.generate_with_uncertainty`` (S weight samples,
one cache each); the ``"linearised"`` mode (S jvp samples per step, no cache). Interleaved
rounds, medians; seconds per generated token and the ratio to plain ``generate``.
Results: ``benchmarks/results/generation_cost.json``.
"""

from __future__ import annotations

import argparse

import _common as common
import torch

OUTPUT = common.RESULTS / "generation_cost.json"
HIDDEN, LAYERS, VOCAB, PROMPT, NEW, SAMPLES = 256, 4, 8192, 16, 16, 4


class _Tok:
    """Just enough of a tokenizer: ids in, ids out."""

    eos_token_id = None

    def __init__(self, ids: torch.Tensor):
        self.ids = ids

    def __call__(self, prompt: str, return_tensors: str = "pt"):
        return type("Enc", (), {"input_ids": self.ids})()

    def decode(self, ids) -> str:
        return " ".join(map(str, ids))


def main() -> None:
    import flaplace
    from flaplace.app.generation import generate_with_uncertainty
    from flaplace.typing import Eigen, KronFactor

    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="one timed round, results not written")
    args = parser.parse_args()
    if args.quick:
        args.repeats = 1
    common.quiet()
    torch.set_num_threads(2)
    model = common.llama_lora_model(HIDDEN, layers=LAYERS, vocab=VOCAB, rank=8)
    params = flaplace.select_params(model, "lora")
    g = torch.Generator().manual_seed(0)
    factors = {}
    for name, p in params.items():
        o, i = p.shape
        q_s, _ = torch.linalg.qr(torch.randn(o, min(o, 8), generator=g))
        q_a, _ = torch.linalg.qr(torch.randn(i, min(i, 8), generator=g))
        factors[name] = KronFactor(
            Eigen(q_s, torch.rand(q_s.shape[1], generator=g)),
            Eigen(q_a, torch.rand(q_a.shape[1], generator=g)),
            torch.tensor(False),
        )
    posterior = flaplace.make_posterior(factors, params, 1.0)
    ids = torch.randint(0, VOCAB, (1, PROMPT), generator=g)
    tok = _Tok(ids)

    def plain() -> object:
        with torch.no_grad():
            return model.generate(
                input_ids=ids, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=0
            )

    def mode(name: str):
        return lambda: generate_with_uncertainty(
            model, tok, posterior, "", mode=name, n_samples=SAMPLES, max_new_tokens=NEW,
            generator=torch.Generator().manual_seed(0),
        )  # fmt: skip

    cases = {"generate": plain, "weights": mode("weights"), "linearised": mode("linearised")}
    measured = common.interleaved(cases, repeats=args.repeats, warmup=1, log=common.log)
    base = measured["generate"]["median_s"]
    env = common.environment()
    records = []
    for key, r in measured.items():
        records.append(
            {
                "config": f"llama-h{HIDDEN}-l{LAYERS}-v{VOCAB}-prompt{PROMPT}-new{NEW}",
                "method": key,
                "samples": 0 if key == "generate" else SAMPLES,
                "median_s": r["median_s"],
                "per_token_s": r["median_s"] / NEW,
                "vs_generate": r["median_s"] / base,
                "times": r["times"],
                **{k: env.get(k) for k in ("torch", "threads", "device", "flaplace")},
            }
        )
        common.log(
            f"{key:10s} {r['median_s'] / NEW * 1000:.1f} ms/token  x{r['median_s'] / base:.1f} generate"
        )
    if not args.quick:
        common.write_results(OUTPUT, records)


if __name__ == "__main__":
    main()
