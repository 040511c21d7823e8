#!/usr/bin/env python3
"""Side-by-side decoder speed: the reference MusicGen decoder (`transformers` + `torch`)
against `segue bench`, on random weights of the same topology, with guidance on (batch 2), on
the CPU or on a CUDA GPU.

Not run by CI. Usage (from the repository root, after a release build):

    python3 -m venv .benchvenv && .benchvenv/bin/pip install -r engine/bench/requirements.txt
    cargo build --release -p segue-engine --bin segue
    .benchvenv/bin/python engine/bench/reference_bench.py --steps 50 [--medium] [--threads 2]

    # On a GPU: segue built with `--features cuda` (see the README), the reference in fp16.
    .benchvenv/bin/python engine/bench/reference_bench.py --device cuda --dtype fp16 \
        --segue target-cuda/release/segue --formats bf16,f16,f32,q8_0 --steps 200

What is timed on the reference: `MusicgenForCausalLM` (the decoder and its four heads) built
from `MusicgenDecoderConfig` with random weights (seed 0), f32, `torch.inference_mode()`, KV
cache on; a 12-token condition whose second row is the null condition (mask all zero), as
guidance runs it; one prefill call over the start column, then `--steps` single-column calls,
each fed the previous step's argmax. The random weights are saved as safetensors and segue
runs on that same checkpoint (`segue bench --only decoder --decoder-checkpoint FILE`, same
topology, same batch, prefill of the start column only; its steps include token selection
with the default sampling, guidance 3 and top-k 250). Prints wall and CPU time of both, the
machine's load average before and after, and the ratios.
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time


def reference_steps_per_s(medium: bool, steps: int, threads: int, save: str,
                          device: str = "cpu", dtype: str = "f32"):
    """Returns (steps/s wall, CPU ms per step) of the reference; saves its weights (f32, before
    any conversion) to `save`. `device` cpu or cuda; `dtype` f32, fp16 or bf16."""
    import torch
    from safetensors.torch import save_file
    from transformers import MusicgenDecoderConfig, MusicgenForCausalLM

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    tdtype = {"f32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    if medium:
        cfg = MusicgenDecoderConfig(hidden_size=1536, num_hidden_layers=48,
                                    num_attention_heads=24, ffn_dim=6144)
    else:
        cfg = MusicgenDecoderConfig(hidden_size=1024, num_hidden_layers=24,
                                    num_attention_heads=16, ffn_dim=4096)
    model = MusicgenForCausalLM(cfg).eval()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, save)
    model = model.to(device=device, dtype=tdtype)
    k, batch, cond_len = cfg.num_codebooks, 2, 12
    cond = torch.randn(batch, cond_len, cfg.hidden_size)
    mask = torch.zeros(batch, cond_len, dtype=torch.long)
    mask[0] = 1  # row 1 is the null condition of guidance
    cond = (cond * mask[..., None]).to(device=device, dtype=tdtype)
    mask = mask.to(device)
    ids = torch.full((batch * k, 1), cfg.bos_token_id, dtype=torch.long, device=device)
    with torch.inference_mode():
        out = model(input_ids=ids, encoder_hidden_states=cond,
                    encoder_attention_mask=mask, use_cache=True)
        past = out.past_key_values
        ids = out.logits[:, -1].argmax(-1).reshape(batch * k, 1)
        sync()
        t, c = time.perf_counter(), time.process_time()
        for _ in range(steps):
            out = model(input_ids=ids, encoder_hidden_states=cond,
                        encoder_attention_mask=mask, past_key_values=past, use_cache=True)
            past = out.past_key_values
            ids = out.logits[:, -1].argmax(-1).reshape(batch * k, 1)
        sync()
        wall, cpu = time.perf_counter() - t, time.process_time() - c
        return steps / wall, 1000.0 * cpu / steps


def segue_rows(segue: str, medium: bool, steps: int, formats: str, checkpoint: str,
               device: str = "cpu") -> dict:
    """Runs segue's decoder bench on `checkpoint`; returns {format: (steps/s, CPU ms/step)}."""
    cmd = [segue, "bench", "--only", "decoder", "--device", device, "--decoder-steps", str(steps),
           "--decoder-formats", formats, "--decoder-prompt-seconds", "0",
           "--decoder-size", "medium" if medium else "small",
           "--decoder-checkpoint", checkpoint]
    print("$", " ".join(cmd), flush=True)
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    print(out)
    rows = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 12 and re.fullmatch(r"[a-z0-9_]+", cells[0]) and cells[0] != "format":
            cpu = float(cells[11]) if cells[11] != "?" else float("nan")
            rows[cells[0]] = (float(cells[1]), cpu)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--medium", action="store_true", help="musicgen-medium topology")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--segue", default="target/release/segue")
    ap.add_argument("--formats", default="f32,bf16,q8_0,q4k")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                    help="where both implementations run (cuda: segue built with the feature)")
    ap.add_argument("--dtype", choices=["f32", "fp16", "bf16"], default="f32",
                    help="the reference's weights and activations")
    args = ap.parse_args()

    load = os.getloadavg()
    print(f"load average before: {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = os.path.join(tmp, "decoder.safetensors")
        ref, ref_cpu = reference_steps_per_s(args.medium, args.steps, args.threads, checkpoint,
                                             args.device, args.dtype)
        print(f"reference (transformers, torch {args.threads} threads, {args.device}, "
              f"{args.dtype}): {ref:.2f} steps/s, CPU {ref_cpu:.1f} ms/step", flush=True)
        rows = segue_rows(args.segue, args.medium, args.steps, args.formats, checkpoint,
                          args.device)
    load = os.getloadavg()
    print(f"load average after: {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
    print("| implementation | steps/s (wall) | × reference | CPU ms/step | reference CPU ÷ this |")
    print("|---|---|---|---|---|")
    print(f"| reference {args.dtype} ({args.device}) | {ref:.2f} | 1.00 | {ref_cpu:.1f} | 1.00 |")
    for name, (sps, cpu) in rows.items():
        print(f"| segue {name} | {sps:.2f} | {sps / ref:.2f} | {cpu:.1f} | {ref_cpu / cpu:.2f} |")
    if not rows:
        sys.exit("no rows parsed from segue bench")


if __name__ == "__main__":
    main()
