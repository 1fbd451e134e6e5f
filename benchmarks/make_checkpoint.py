"""Write a random-weight Llama checkpoint with the exact shapes of a real architecture, for the scaling benchmark.

    python benchmarks/make_checkpoint.py --shape 7b --out benchmarks/.cache/llama-7b   # about 13.5 GB

Shapes: 1b = TinyLlama-1.1B (hidden 2048, 22 layers, intermediate 5632, 4 KV heads), 3b = OpenLLaMA-3B (3200,
26, 8640), 7b = Llama-2-7B (4096, 32, 11008); all with a 32,000-token vocabulary. Weights are N(0, 0.02) in
fp16 (norms 1), written a tensor at a time into shards of at most --max-shard-size with
model.safetensors.index.json, as transformers' save_pretrained writes them, so memory stays at one tensor.
The tokenizer of the embedded default model (30,522 WordPiece tokens, below the vocabulary) is copied along
so that calibration text can be tokenized; the weights are random, so what the text says does not matter.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import torch
from accelerate import init_empty_weights
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM

from layerfold.core.tensor_files import ShardWriter, parse_size
from layerfold.jobs.demo import default_model_path
from layerfold.checkpoints.folded import TOKENIZER_FILES

SHAPES = {
    # --quick (CI's smoke test of benchmarks/scaling.py): four small Llama blocks, the same code path
    "tiny": dict(
        hidden_size=512, num_hidden_layers=4, intermediate_size=1408, num_attention_heads=8, num_key_value_heads=4
    ),
    "1b": dict(
        hidden_size=2048, num_hidden_layers=22, intermediate_size=5632, num_attention_heads=32, num_key_value_heads=4
    ),
    "3b": dict(
        hidden_size=3200, num_hidden_layers=26, intermediate_size=8640, num_attention_heads=32, num_key_value_heads=32
    ),
    "7b": dict(
        hidden_size=4096, num_hidden_layers=32, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32
    ),
}


def config_for(shape: str) -> LlamaConfig:
    return LlamaConfig(
        **SHAPES[shape],
        vocab_size=32000,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        dtype="float16",
        architectures=["LlamaForCausalLM"],
    )


def make_checkpoint(shape: str, out: Path, *, max_shard_size: str = "5GB", seed: int = 0) -> dict:
    """Write the checkpoint into ``out`` (replaced if it exists); returns its parameter count and bytes."""
    config = config_for(shape)
    with init_empty_weights():
        model = LlamaForCausalLM(config)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    start = time.perf_counter()
    generator = torch.Generator().manual_seed(seed)
    specs = [(name, size, torch.float16) for name, size in shapes.items()]
    writer = ShardWriter(out, specs, max_shard_bytes=parse_size(max_shard_size))
    try:
        for name, size in tqdm(shapes.items(), desc=f"random {shape}", unit="tensor"):
            if len(size) == 1:
                tensor = torch.ones(size, dtype=torch.float16)
            else:
                tensor = torch.empty(size, dtype=torch.float32).normal_(0.0, 0.02, generator=generator).half()
            writer.add(name, tensor)
        writer.finish()
    finally:
        writer.close()
    config.save_pretrained(out)
    source = default_model_path()
    for name in TOKENIZER_FILES:
        if (Path(source) / name).is_file():
            shutil.copy2(Path(source) / name, out / name)
    parameters = sum(int(torch.Size(s).numel()) for s in shapes.values())
    return {
        "shape": shape,
        "parameters": parameters,
        "bytes": sum(f.stat().st_size for f in out.glob("*.safetensors")),
        "seconds": round(time.perf_counter() - start, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--max-shard-size", default="5GB")
    args = parser.parse_args()
    print(make_checkpoint(args.shape, args.out, max_shard_size=args.max_shard_size))


if __name__ == "__main__":
    main()
