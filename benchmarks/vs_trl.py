"""Side by side with TRL: the same Hugging Face folder and the same pairs through TRL's `DPOTrainer`
(PyTorch) and through `python -m rdpo_jax.train`, on this machine, interleaved runs, medians.

    pip install -e '.[bench]'      # trl, datasets, accelerate: not core dependencies
    python benchmarks/vs_trl.py [--runs=3] [--prompts=32] [--steps=8] [--work=/tmp/vs_trl] [--only=a,b]

Setup (written once into --work, nothing downloaded): a LLaVA folder saved by transformers — a CLIP tower
at 336 px / patch 14 (576 image tokens, width 64, 2 layers), a Qwen2 decoder (width 256, 4 layers, 4 heads
/ 2 KV heads, MLP 512), a 1024-word word-level tokenizer with a ChatML template, `LlavaProcessor` with
`CLIPImageProcessor` — and --prompts prompts, each a 336×336 image and a 58-word instruction (≈640 prompt
tokens) with 4 answers of 100–128 words and 3 pairs sharing the chosen answer (answer 0 over 1, 2, 3),
as an on-policy round mines them from 8 samples. The same 3·prompts pairs feed every row:

  trl            TRL's DPOTrainer, online reference (its default: a frozen copy of the model).
  concat         ours, pairs records, two rows per pair (TRL's work), online reference.
  shared         ours, pairs records, one [prompt][chosen][rejected] row per pair, online reference.
  shared_pre     ours, shared, reference log-likelihoods precomputed by `data_prep.ref_logps` (TRL
                 refuses `precompute_ref_log_probs=True` for vision datasets: it raises a ValueError).
  groups         ours, groups records, one multi-answer row per prompt (4 answers, 3 pairs), online.
  groups_pre     ours, groups, precomputed reference.

Everything is fp32, sigmoid loss (β 0.1), 12 pairs per step (TRL, concat, shared: batch 12; groups: 4
prompt groups, the same pairs in a third of the rows), AdamW, no truncation, 2 threads (torch) / XLA's own
pool over the 2 cores, one process. Each run is one whole command; its steady-state pairs/s is the median
over its steps after the first two (each step's wall time: TRL from a callback, ours from metrics.jsonl at
log.every=1), so load and compile times are left out (the whole command's wall time is shown apart).
First, every row runs one step on the first 4 prompts alone (12 pairs: one batch whatever the shuffle), and
its loss and `logps/chosen` (the mean summed log-likelihood of the chosen answers) are printed beside
TRL's: they must agree, which also shows that both tokenize and preprocess alike.
"""

from __future__ import annotations

import io
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np
from absl import app, flags

_RUNS = flags.DEFINE_integer("runs", 3, "Interleaved runs of every row (medians reported).")
_PROMPTS = flags.DEFINE_integer("prompts", 32, "Prompts (3 pairs each).")
_STEPS = flags.DEFINE_integer("steps", 8, "Optimizer steps per run.")
_WORK = flags.DEFINE_string("work", "/tmp/vs_trl", "Folder for the model, data and runs.")
_ONLY = flags.DEFINE_list("only", [], "Rows to run (default: all).")
_ROLE = flags.DEFINE_string("role", "", "Internal: run one TRL training in this process and print its figures.")
_DATA = flags.DEFINE_string("data", "pairs", "Internal (--role=trl): the pairs dataset in --work.")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = [f"w{i}" for i in range(1024)]
SPECIAL = ["<pad>", "<|im_start|>", "<|im_end|>", "<unk>", "<image>"]
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
            "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for p in m['content'] %}"
            "{% if p['type'] == 'image' %}<image>{% else %}{{ p['text'] }}{% endif %}{% endfor %}{% endif %}"
            "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
PAIRS = ((0, 1), (0, 2), (0, 3))
BATCH = 12  # pairs per step (groups rows: BATCH / 3 prompt groups)
ROWS = ("trl", "concat", "shared", "shared_pre", "groups", "groups_pre")


def write_model(folder: str) -> None:
    import tokenizers
    import torch
    import transformers

    vocab = {t: i for i, t in enumerate(SPECIAL + WORDS)}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tok.decoder = tokenizers.decoders.WordPiece(cleanup=False)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                                eos_token="<|im_end|>", additional_special_tokens=["<|im_start|>", "<image>"])
    fast.chat_template = TEMPLATE
    config = transformers.LlavaConfig(
        vision_config=dict(model_type="clip_vision_model", hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                           num_attention_heads=4, image_size=336, patch_size=14, projection_dim=64),
        text_config=dict(model_type="qwen2", vocab_size=len(vocab), hidden_size=256, intermediate_size=512,
                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         tie_word_embeddings=False),
        image_token_index=vocab["<image>"], vision_feature_layer=-2, vision_feature_select_strategy="default")
    torch.manual_seed(0)
    model = transformers.LlavaForConditionalGeneration(config)
    model.save_pretrained(folder)
    image = transformers.CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    transformers.LlavaProcessor(image_processor=image, tokenizer=fast, patch_size=14, chat_template=TEMPLATE,
                                vision_feature_select_strategy="default", image_token="<image>",
                                num_additional_image_tokens=1).save_pretrained(folder)
    print(f"model: {sum(p.numel() for p in model.parameters()):,} parameters")


def _png(rng) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (336, 336, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def groups(n: int) -> list[dict]:
    """n prompt groups (the `groups` record kind): 4 answers, 3 pairs sharing answer 0."""
    rng = np.random.default_rng(0)
    rubric = {"criteria": [{"id": "c0", "text": "correct", "kind": "essential", "weight": 1.0, "scale": "binary"}]}
    words = lambda k: " ".join(rng.choice(WORDS, k))  # noqa: E731
    out = []
    for i in range(n):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": words(58)}]}]
        answers = [dict(text=words(int(rng.integers(100, 129))), scores=[1 if a == 0 else 0]) for a in range(4)]
        out.append(dict(group_id=f"g{i}", prompt_id=f"p{i}", images=[_png(rng)], messages=messages, rubric=rubric,
                        answers=answers, pairs=[dict(pair_id=f"g{i}/{j}", chosen=c, rejected=r, meta={})
                                                for j, (c, r) in enumerate(PAIRS)]))
    return out


def write_data(work: str) -> None:
    """pairs, groups (all prompts) and pairs_check, groups_check (the first BATCH / 3 prompts)."""
    from rdpo_jax.data import arrayrecord, records

    data = groups(_PROMPTS.value)
    for suffix, part in (("", data), ("_check", data[:BATCH // 3])):
        arrayrecord.write(work, f"groups{suffix}", "groups", part)
        arrayrecord.write(work, f"pairs{suffix}", "pairs", [p for g in part for p in records.pairs_of_group(g)])


def _config(work: str, row: str, check: bool = False) -> list[str]:
    """`python -m rdpo_jax.train` flags of one of our rows (`check`: one step on the check data)."""
    layout = {"concat": "concat", "shared": "shared_prefix", "shared_pre": "shared_prefix"}.get(row, "multi_answer")
    grouped = row.startswith("groups")
    suffix = ("_check" if check else "") + ("_ref" if row.endswith("_pre") else "")
    data = f"{work}/{'groups' if grouped else 'pairs'}{suffix}"
    # the smallest bucket that holds a row: prompt ≈ 640 tokens, answers ≤ 129
    bucket = {"concat": 832, "shared_prefix": 960, "multi_answer": 1216}[layout]
    return [f"--config={ROOT}/configs/base.py", f"--config.model.path={work}/model",
            f"--config.data.train={data}", "--config.data.eval=",
            f"--config.data.batch_size={BATCH // 3 if grouped else BATCH}",
            f"--config.data.seq_buckets=({bucket},)", "--config.data.max_answer_len=160",
            "--config.data.max_criteria=1", "--config.data.max_pairs_per_group=3",
            f"--config.dpo.pair_layout={layout}", "--config.dpo.loss_type=sigmoid", "--config.dpo.beta=0.1",
            f"--config.dpo.reference={'precomputed' if row.endswith('_pre') else 'model'}",
            "--config.mesh.data=1", f"--config.total_steps={1 if check else _STEPS.value}", "--config.log.every=1",
            "--config.checkpoint.every=100000", "--config.optim.learning_rate=1e-5", "--config.optim.warmup_steps=0",
            "--config.data.seed=0"]


def _env() -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    env.pop("XLA_FLAGS", None)  # one CPU device, XLA's thread pool over every core
    return env


def _median(xs):
    return statistics.median(xs) if xs else float("nan")


def run_ours(work: str, row: str, i, check: bool = False) -> dict:
    workdir = f"{work}/runs/{row}-{i}"
    subprocess.run(["rm", "-rf", workdir], check=True)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "rdpo_jax.train", *_config(work, row, check), f"--workdir={workdir}"],
                   env=_env(), check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = [json.loads(line) for line in open(f"{workdir}/metrics.jsonl") if '"pairs_per_s"' in line]
    steps = [m["count"] / m["step_s"] for m in metrics[2:]]  # pairs / step wall time (count: the step's pairs)
    return {"pairs_per_s": _median(steps), "wall_s": time.perf_counter() - t0,
            "loss": metrics[0]["loss"], "logps/chosen": metrics[0]["logps/chosen"]}


def run_trl(work: str, i, check: bool = False) -> dict:
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, __file__, "--role=trl", f"--work={work}",
                          f"--steps={1 if check else _STEPS.value}", f"--data={'pairs_check' if check else 'pairs'}"],
                         env=_env(), check=True, capture_output=True, text=True).stdout
    return {**json.loads(out.strip().splitlines()[-1]), "wall_s": time.perf_counter() - t0}


def trl_train(work: str, data: str) -> dict:
    """One TRL run in this process: {pairs_per_s (steady state), loss, logps/chosen (first step)}."""
    import datasets
    import torch
    import transformers
    import trl
    from PIL import Image

    from rdpo_jax.data import arrayrecord

    torch.set_num_threads(2)
    rows = []
    for p in arrayrecord.read(f"{work}/{data}"):
        rows.append({"images": [Image.open(io.BytesIO(p["images"][0])).convert("RGB")], "prompt": p["messages"],
                     "chosen": [{"role": "assistant", "content": [{"type": "text", "text": p["chosen"]}]}],
                     "rejected": [{"role": "assistant", "content": [{"type": "text", "text": p["rejected"]}]}]})
    dataset = datasets.Dataset.from_list(rows)
    model = transformers.LlavaForConditionalGeneration.from_pretrained(f"{work}/model", dtype=torch.float32)
    processor = transformers.AutoProcessor.from_pretrained(f"{work}/model")
    times, history = [], []

    class Clock(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                history.append(logs)

    args = trl.DPOConfig(output_dir=f"{work}/runs/trl", per_device_train_batch_size=BATCH, max_steps=_STEPS.value,
                         learning_rate=1e-5, lr_scheduler_type="constant", beta=0.1, loss_type=["sigmoid"],
                         max_length=None, logging_steps=1, report_to=[], save_strategy="no", use_cpu=True,
                         dataloader_num_workers=0, seed=0, data_seed=0, disable_tqdm=True,
                         # fp32 and no recomputation, as ours: TRL's defaults are bfloat16 autocast (on this CPU
                         # ~10× slower per matmul) and gradient checkpointing
                         bf16=False, fp16=False, gradient_checkpointing=False)
    trainer = trl.DPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=processor,
                             callbacks=[Clock()])
    trainer.train()
    return {"pairs_per_s": _median([BATCH / t for t in times[2:]]), "loss": history[0]["loss"],
            "logps/chosen": history[0]["logps/chosen"]}


def main(argv):
    del argv
    work = _WORK.value
    if _ROLE.value == "trl":
        print(json.dumps(trl_train(work, _DATA.value)))
        return
    os.makedirs(work, exist_ok=True)
    if not os.path.exists(f"{work}/model/config.json"):
        write_model(f"{work}/model")
    if not os.path.exists(f"{work}/pairs.manifest.json"):
        write_data(work)
    rows = _ONLY.value or list(ROWS)
    for row, name in (("shared", "pairs"), ("groups", "groups")):
        for check in (True, False):
            data = name + ("_check" if check else "")
            if f"{row}_pre" not in rows or os.path.exists(f"{work}/{data}_ref.manifest.json"):
                continue
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-m", "data_prep.ref_logps", *_config(work, row, check),
                            f"--pairs={work}/{data}", f"--out={work}", f"--name={data}_ref"],
                           env=_env(), check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            print(f"ref_logps over {data}: {time.perf_counter() - t0:.1f} s (whole command)")
    print(f"first step on the first {BATCH // 3} prompts ({BATCH} pairs), every row:")
    first = {}
    for row in rows:
        first[row] = run_trl(work, "check", True) if row == "trl" else run_ours(work, row, "check", True)
        print(f"  {row}: loss {first[row]['loss']:.7f}, logps/chosen {first[row]['logps/chosen']:.5f}", flush=True)
    results: dict[str, list[dict]] = {r: [] for r in rows}
    for i in range(_RUNS.value):
        for row in rows:
            results[row].append(run_trl(work, i) if row == "trl" else run_ours(work, row, i))
            print(f"run {i} {row}: {results[row][-1]}", flush=True)
    base = statistics.median(r["pairs_per_s"] for r in results["trl"]) if "trl" in results else None
    print(f"\n| row | pairs/s (median of {_RUNS.value}) | vs TRL | first loss | first logps/chosen | command s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for row, runs in results.items():
        rate = statistics.median(r["pairs_per_s"] for r in runs)
        ratio = f"{rate / base:.2f}×" if base else "–"
        print(f"| {row} | {rate:.3f} | {ratio} | {first[row]['loss']:.6f} | {first[row]['logps/chosen']:.4f} | "
              f"{statistics.median(r['wall_s'] for r in runs):.0f} |")


if __name__ == "__main__":
    app.run(main)
