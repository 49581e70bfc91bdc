"""summary.md of benchmarks/gpu_check.py: its figures as Markdown tables (moved out of gpu_check.py, unchanged but
for the ``dist`` part's table, benchmarks/gpu_check_dist.py)."""

from __future__ import annotations

from gpu_check_dist import summary_lines


def summary(data: dict, phases: tuple[str, ...]) -> str:
    env, parts = data["environment"], data["parts"]
    lines = [f"# GPU check ({data['size']} size)", "",
             f"{env.get('gpu', 'no GPU (CPU)')}, torch {env['torch']}, transformers {env['transformers']}, "
             f"vLLM {env.get('vllm')}, commit {env.get('commit')}, {env['date_utc']} UTC, {data.get('elapsed_s')} s", ""]
    if "cli" in parts:
        lines += ["## CLI", "", "| command | result | wall (s) | peak CUDA allocated (GiB) |", "|---|---|---|---|"]
        lines += [f"| {k} | {'ok' if r['ok'] else 'FAILED'} | {r['seconds']} | {r['peak_cuda_gib']} |" for k, r in parts["cli"].items()]
        lines.append("")
    if "rollout" in parts:
        r = parts["rollout"]
        lines += ["## Rollout", "", f"{r['rows']} rows x {r['tokens_per_row']} tokens, prompt {r['prompt_tokens']} tokens.", "",
                  "| engine | tokens/s | seconds per run |", "|---|---|---|"]
        for k, label in (("generate", "model.generate(do_sample=True)"), ("hf", "rollout, decoder=hf"),
                         ("static", "rollout, static decoder"), ("vllm", "vLLM (colocated)")):
            if k in r and "tokens_per_s" in r[k]:
                lines.append(f"| {label} | {r[k]['tokens_per_s']} | {r[k]['seconds']} |")
            elif k in r:
                lines.append(f"| {label} | - | {r[k].get('error', '')[:200]} |")
        mb = r["memory_bound"]
        lines += ["", f"static / generate = {r['static_over_generate']}, static / hf path = {r['static_over_hf_path']}; "
                      f"captured: {r['static_captured']}, fallback: {r['static_fallback']}; same tokens run to run: "
                      f"{r['static_same_tokens_run_to_run']}; kept graph replayed: {r.get('static_reused_graph')}.",
                  f"Memory bound: {mb['weight_bytes_per_step'] / 1e9:.2f} GB weights + {mb['kv_bytes_per_step_mean'] / 1e9:.3f} GB "
                  f"KV per step at {mb['bandwidth_gbs']} GB/s: "
                  + (f"{mb['step_ms_lower_bound']:.2f} ms per step, {mb['tokens_per_s_upper_bound']:.0f} tokens/s, "
                     f"{mb['rollout_s_lower_bound']:.2f} s per rollout." if mb.get("step_ms_lower_bound") else "bandwidth unknown."), ""]
    if "probes" in parts:
        pr = parts["probes"]
        lines += ["## Probe passes against the policy's forward + backward", "",
                  f"{pr['rows']} rows x {pr['tokens_per_row']} tokens, prompt {pr['prompt_tokens']} tokens, median of "
                  f"{pr['repeats']} interleaved rounds.", "",
                  "| pass | seconds | / policy fwd+bwd | peak rise (GiB) |", "|---|---|---|---|"]
        lines += [f"| {k} | {v['seconds_median']} | {v['over_policy_forward_backward']} | {v['peak_rise_cuda_gib']} |"
                  for k, v in pr["passes"].items()]
        nz = pr["identity_probe_noise_nats"]
        lines += ["", f"Identity temporal probe vs the policy pass ({nz['dtype']}): |difference| median {nz['median']:.2e}, "
                      f"p99 {nz['p99']:.2e}, max {nz['max']:.2e} nats; {nz['fraction_over_1e-5']:.1%} of tokens at or over "
                      "the default probe_score_tolerance 1e-5.", ""]
    if "step" in parts:
        s = parts["step"]
        names = list(s["variants"])
        lines += ["## Step (interleaved, medians)", "", "| | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        for key in ("step_seconds", *phases, "completion_length", "peak_cuda_gib"):
            lines.append(f"| {key} | " + " | ".join(str(s["variants"][n].get(key)) for n in names) + " |")
        lines += ["", f"KTR / GRPO step: paired median {s['step_ktr_over_grpo_paired_median']}, ratio of medians "
                      f"{s['step_ktr_over_grpo_of_medians']}; peak memory KTR / GRPO {s.get('peak_ktr_over_grpo')}.", ""]
    if "estimate" in parts:
        lines += ["## video-ktr estimate", "", "| variant | estimate (GiB) | measured peak (GiB) | ratio |", "|---|---|---|---|"]
        for v, e in parts["estimate"].items():
            lines.append(f"| {v} | {e.get('estimate_gib')} | {e.get('measured_peak_gib')} | {e.get('estimate_over_measured')} |")
        lines.append("")
    if "dist" in parts:
        lines += summary_lines(parts["dist"])
    for name, err in data.get("errors", {}).items():
        lines += [f"**{name} failed**: `{err[:500]}`", ""]
    return "\n".join(lines)
