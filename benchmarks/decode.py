"""Greedy decoding throughput with a KV cache: mmjax.sampling.decode.generate against HF generate.

  python benchmarks/decode.py                         # batch 1 and 16, prompt 32, 128 new tokens
  python benchmarks/decode.py --batches 1 --rounds 3

The model is benchmarks/model_throughput.py's LLM (LlamaForCausalLM from a config, random
weights, no stop token so every row generates all new tokens), converted to mmjax by
`mmjax.interop.hf_llm`. Per batch size, interleaved over `--rounds` rounds:

  mmjax  `generate(model, params, prompts, max_new_tokens=N)` (greedy; one jitted call: prefill,
         then a while_loop of cached one-token steps), blocked on its ids
  hf     `model.generate(prompts, max_new_tokens=N, do_sample=False, use_cache=True)` under
         torch.no_grad, torch.set_num_threads(cores)

tokens/s = batch * N / wall time of one whole call (prefill included). compile_s: mmjax's first
call minus its median call (jit tracing + XLA compile); the first HF call is left out the same
way (warm-up). Load is handled as in model_throughput.py (--wait-quiet, --max-other). `same_ids`: share of generated ids where mmjax and HF agree (same weights, fp32;
random weights give near-tied logits, so a late tie can flip one argmax and the rest follows).
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common
import model_throughput


def main():
    parser = common.parser(__doc__)
    parser.add_argument("--batches", default="1,16", help="comma list of batch sizes")
    parser.add_argument("--prompt", type=int, default=32, help="prompt length")
    parser.add_argument("--new", type=int, default=128, help="new tokens per row")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    model_throughput.add_load_options(parser)
    args = parser.parse_args()

    common.setup()
    import jax
    import numpy as np
    import torch
    import transformers as tr

    from mmjax.interop import hf_llm
    from mmjax.models.llm import LLM
    from mmjax.sampling.decode import generate

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    hf = tr.LlamaForCausalLM(
        tr.LlamaConfig(**model_throughput.LLM, bos_token_id=None, eos_token_id=None)
    ).eval()
    params, meta = hf_llm.to_mmjax(hf.config.to_dict(), {k: v.numpy() for k, v in hf.state_dict().items()})
    model, params = LLM(**meta["model"]), jax.device_put(params)
    monitor = common.CpuMonitor()

    def run_mmjax(prompts):
        ids, _ = generate(model, params, prompts, max_new_tokens=args.new)
        return np.asarray(ids)

    def run_hf(prompts):
        with torch.no_grad():
            out = hf.generate(
                torch.from_numpy(prompts).long(),
                attention_mask=torch.ones(prompts.shape, dtype=torch.long),
                max_new_tokens=args.new,
                min_new_tokens=args.new,
                do_sample=False,
                use_cache=True,
                pad_token_id=0,
            )
        return out[:, prompts.shape[1] :].numpy()

    runners = {"mmjax": run_mmjax, "hf": run_hf}
    rows, raw = [], {}
    for b in map(int, args.batches.split(",")):
        prompts = np.random.default_rng(b).integers(0, model.vocab_size, (b, args.prompt)).astype(np.int32)
        first, ids, times = {}, {}, {name: [] for name in runners}
        for name, fn in runners.items():
            t0 = time.perf_counter()
            ids[name] = fn(prompts)
            first[name] = time.perf_counter() - t0
        assert ids["mmjax"].shape == ids["hf"].shape == (b, args.new), (ids["mmjax"].shape, ids["hf"].shape)
        other = []
        for r in range(args.rounds):
            for name in list(runners)[r % 2 :] + list(runners)[: r % 2]:  # alternate which goes first
                sec, _, load, tries = model_throughput.measure(lambda: runners[name](prompts), args)
                times[name].append(sec)
                other.append(load)
                print(
                    f"round {r} batch {b} {name}: {b * args.new / sec:.1f} tokens/s, "
                    f"other load {load:.2f} (try {tries})",
                    flush=True,
                )
        raw[b] = times
        for name in runners:
            sec = common.median(times[name])
            row = {"batch": b, "impl": name, "call_s": sec, "tokens_per_s": b * args.new / sec}
            row["range"] = common.spread([b * args.new / t for t in times[name]])
            row["ms_per_token_step"] = 1e3 * sec / args.new
            row["first_call_s"] = first[name]
            row["compile_s"] = first[name] - sec if name == "mmjax" else ""
            row["vs_hf"] = common.median([h / t for t, h in zip(times[name], times["hf"])])
            row["same_ids"] = float((ids["mmjax"] == ids["hf"]).mean())
            row["other_cores"] = f"{common.median(other):.2f} (max {max(other):.2f})"
            rows.append(row)

    cols = ["batch", "impl", "tokens_per_s", "range", "vs_hf", "call_s", "ms_per_token_step"]
    cols += ["first_call_s", "compile_s", "same_ids", "other_cores"]
    info = {
        "torch": torch.__version__,
        "transformers": tr.__version__,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }
    print(f"\n{info}")
    common.report(
        "decode",
        monitor,
        [(f"greedy decode, prompt {args.prompt}, {args.new} new tokens (medians over rounds):", rows, cols)],
        {**info, "prompt": args.prompt, "new": args.new, "rows": rows, "raw": raw},
    )


if __name__ == "__main__":
    main()
