"""Every option with its default: `train()` for `python -m rdpo_jax.train`, `loop()` for `python -m rdpo_jax.loop`.

    python -m rdpo_jax.train --config=configs/NAME.py[:ARG] --workdir=DIR [--config.FIELD=VALUE …]
    python -m rdpo_jax.loop --config=configs/NAME.py[:ARG] --workdir=RUNS [--config.FIELD=VALUE …]

The configs in configs/ start from these and change fields. A config is locked: a misspelt field on the
command line is an error naming it. The loop's `sample`, `judge`, `pairs` and `evaluate` groups are the
flags of those commands (same names, same defaults); the loop itself sets the paths (--pool, --model,
--samples, --judged, --out, --name) and the sampling seed. A string left empty is not passed (the command's
own default applies).
"""

import ml_collections


def parse_arg(arg: str, config_file: str, required: tuple[str, ...] = (), optional: tuple[str, ...] = ()) -> dict:
    """The `key=value,key=value` argument after `configs/NAME.py:`."""
    args = dict(item.split("=", 1) for item in (arg or "").split(",") if "=" in item)
    bad = [item for item in (arg or "").split(",") if item and "=" not in item]
    unknown = set(args) - set(required) - set(optional)
    missing = set(required) - set(args)
    if bad or unknown or missing:
        raise ValueError(f"{config_file}: expected key=value pairs with keys {list(required)} (required) and "
                         f"{list(optional)} (optional), got {arg!r}")
    return args


def train() -> ml_collections.ConfigDict:
    """Every option of `python -m rdpo_jax.train`."""
    c = ml_collections.ConfigDict()
    c.objective = "dpo"  # "sft" (warm start) | "dpo"
    c.seed = 0  # fresh-init seed; the data order has its own seed (data.seed)
    c.total_steps = 1000  # optimizer steps of the run (the schedule's horizon)
    c.accum_steps = 1  # micro-batches per step (gradient accumulation by lax.scan)

    c.model = ml_collections.ConfigDict()
    c.model.path = ""  # HF folder with config.json, tokenizer and processor (weights optional)
    c.model.param_dtype = "float32"  # float32 master weights; bfloat16 only for a LoRA run's frozen base
    c.model.dtype = "float32"  # compute dtype: "float32" | "bfloat16" (parameters are cast inside the step)
    c.model.remat = "none"  # "none" | "full" | "dots_saveable"
    c.model.vocab_chunk = 16384  # LM head columns at a time over answer tokens (0 = all); memory, not results
    c.model.attention = "auto"  # "auto" (splash on TPU, cuDNN flash on GPU in bf16/fp16, else "xla") | "xla" | "cudnn" | "jax" | "splash"
    # Layers' parameters stacked and run by one lax.scan per stack (decoder, vision tower): compile time flat in depth
    c.model.scan_layers = "auto"  # "auto" (stacks of ≥ 16 layers) | "on" | "off"
    # Where the first parameters come from when the workdir has no checkpoint: "model" (the weights in
    # model.path), "scratch" (fresh init from `seed`), or a path: an HF folder or another run's workdir.
    c.init_from = "model"  # see the comment above

    # Low-rank adapters (LoRA) on a frozen base: only the adapters train, checkpoints hold only them, and
    # dpo.reference="base" takes the reference from the base with the adapters off (no copy). models/lora.py
    c.lora = ml_collections.ConfigDict()
    c.lora.rank = 0  # adapter rank r (0: full fine-tuning, no adapters)
    c.lora.alpha = 16.0  # adapters add (alpha / r) · x A B
    c.lora.dropout = 0.0  # dropout on the adapters' input in training steps (projections only, not stacked experts)
    # Adapted weights: comma-separated regexes over weight paths, e.g. add "visual/merger/.*/kernel" for Qwen's
    # merger; "" = the decoder's attention and MLP projections, a MoE's experts (one adapter each), shared expert
    c.lora.targets = ""  # see the comment above
    c.lora.quantize = ""  # QLoRA: "" (the base in model.param_dtype) | "int8" | "nf4" (4-bit NormalFloat)
    c.lora.quantize_targets = ""  # regexes of the weights stored quantized ("" = as targets' default)
    c.lora.block = 64  # weights per quantization scale (along the input dimension)

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # -1: all devices left over by the other axes
    c.mesh.fsdp = 1  # parameters and optimizer state sharded along this axis
    c.mesh.expert = 1  # a MoE's experts split along this axis (data parallel for the rest)
    c.mesh.tensor = 1  # heads, MLP width and vocabulary split along this axis

    c.data = ml_collections.ConfigDict()
    c.data.train = ""  # dataset: "folder/NAME" (ArrayRecord + manifest) or "tfds:NAME/CONFIG:SPLIT@DATA_DIR"
    c.data.eval = ""  # held-out dataset of the same kind ("" = no evaluation)
    c.data.batch_size = 8  # global records per step over all processes: pairs or prompt groups (dpo), examples (sft)
    c.data.seq_buckets = (1024, 2048)  # padded row lengths (one compile each)
    c.data.max_answer_len = 512  # answers are cut to this many tokens (counted)
    c.data.max_images = 1  # a record holds 0 … this many images (0: text only; LLaVA encodes this many per row)
    c.data.max_pixels = None  # Qwen2.5-VL: pixels per image at most (None: the folder's max_pixels)
    c.data.patch_buckets = (256, 1024, 4096, 16384)  # Qwen2.5-VL: patch buffers per row (one compile each)
    c.data.max_criteria = 16  # rubric arrays are padded to this many criteria
    c.data.max_pairs_per_group = 4  # groups data: pair slots per record (a larger group is a bad record)
    c.data.max_answers_per_group = 0  # groups data, multi_answer rows: answers per row (0 = 2 × pairs)
    c.data.groups_per_row = 1  # SFT, DPO multi_answer: short records share rows, up to this many per row (1 = one each)
    c.data.essential_weight = 1.0  # multiplies the weight of essential criteria
    c.data.additional_weight = 1.0  # multiplies the weight of additional criteria
    c.data.on_bad_record = "error"  # "error" | "skip" (counted by reason in the logs)
    c.data.seed = 0  # shuffle seed (reshuffled every epoch)
    c.data.workers = 0  # Grain worker processes (0 = threads in the training process)
    c.data.buffer = 2  # batches prefetched per worker

    c.dpo = ml_collections.ConfigDict()
    c.dpo.loss_type = "sigmoid"  # "sigmoid" | "cdpo" | "robust" | "ipo" | "hinge" | "rubric"
    c.dpo.beta = 0.1  # inverse temperature β of the log-ratio margin
    c.dpo.label_smoothing = 0.0  # ε of cdpo / robust
    c.dpo.gamma = 0.0  # per-criterion margin γ of the rubric loss
    c.dpo.length_norm = False  # token-mean log-likelihoods instead of sums (set for ipo)
    c.dpo.sft_weight = 0.0  # α·(token-mean NLL of the chosen answer) added to every pair's loss
    c.dpo.pair_layout = "shared_prefix"  # "shared_prefix" | "concat" | "multi_answer" (packing.py)
    c.dpo.reference = "model"  # "model" (frozen copy, same jit) | "base" (LoRA: adapters off) | "precomputed" | "none"
    # The reference model: "" (the run's initial parameters, init_from), or an HF folder or a run's workdir
    # (iterative DPO against the first policy while training on from the last round's)
    c.dpo.reference_from = ""  # see the comment above

    c.optim = ml_collections.ConfigDict()
    c.optim.learning_rate = 1e-6  # peak learning rate
    c.optim.schedule = "cosine"  # "cosine" | "linear" | "constant" (after warmup)
    c.optim.warmup_steps = 0  # linear warmup from 0
    c.optim.end_lr_factor = 0.0  # final learning rate = end_lr_factor × learning_rate
    c.optim.weight_decay = 0.0  # AdamW, matrices only (never norms or biases)
    c.optim.b1 = 0.9  # Adam β1
    c.optim.b2 = 0.999  # Adam β2
    c.optim.eps = 1e-8  # Adam ε
    c.optim.grad_clip = 1.0  # global-norm clipping (0 = off)
    c.optim.freeze = ""  # comma-separated regexes of frozen parameter paths, e.g. "vision_tower/.*"
    c.optim.lr_multipliers = ""  # "REGEX=MULT,…", e.g. "multi_modal_projector/.*=10"
    c.optim.max_nonfinite = 5  # stop after this many consecutive steps with a non-finite loss/gradient

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every = 500  # steps between checkpoints (also saved at the end and on SIGTERM)
    c.checkpoint.keep = 3  # checkpoints kept
    c.checkpoint.async_save = True  # write in the background while training continues
    # JAX's persistent compilation cache: a resumed run (after preemption, on a new VM) loads its compiled
    # step instead of compiling again. JAX_COMPILATION_CACHE_DIR in the environment takes precedence.
    c.checkpoint.compile_cache = "workdir"  # "workdir" (WORKDIR/compile_cache), a folder, or "" (off)

    c.log = ml_collections.ConfigDict()
    c.log.every = 10  # steps between metric writes (JSONL, TensorBoard, console)
    c.log.tensorboard = True  # also write TensorBoard events (workdir/tensorboard)
    c.log.profile_steps = ()  # (first, last): a jax.profiler trace of those steps in workdir/profile; () = off

    c.eval = ml_collections.ConfigDict()
    c.eval.every = 0  # steps between held-out evaluations (0 = only at the end, if data.eval is set)
    c.eval.batches = 8  # batches per evaluation

    c.distributed = ml_collections.ConfigDict()
    c.distributed.coordinator = ""  # "host:port" for multi-process runs without auto-detection
    c.distributed.num_processes = 0  # with coordinator: how many processes
    c.distributed.process_id = -1  # with coordinator: this process
    c.distributed.auto = False  # call jax.distributed.initialize() with no arguments (TPU pods, SLURM)
    return c


def loop() -> ml_collections.ConfigDict:
    """Every option of `python -m rdpo_jax.loop`."""
    c = ml_collections.ConfigDict()
    c.rounds = 2  # on-policy rounds (--rounds overrides it; raise it later to continue a finished loop)
    c.policy = ""  # the initial policy: an HF folder or a training run's workdir
    c.reference = "previous"  # round r's DPO reference: "previous" (the policy it trains from) | "initial"
    c.ref_logps = False  # precompute reference log-likelihoods (data_prep.ref_logps), train with reference=precomputed
    c.first_judged = ""  # judged samples of the initial policy that round 1 mines instead of sampling and judging it
    c.chunk_size = 64  # --chunk_size of the data_prep commands (records per resumable chunk)

    c.pool = ml_collections.ConfigDict()
    c.pool.train = ""  # rubric pool dataset (folder/NAME), or a prompts .jsonl that round 0 builds it from
    c.pool.heldout = ""  # the held-out pool for evaluate (dataset or prompts .jsonl, as pool.train)
    c.pool.generator = "rule"  # build_rubrics --generator ("rule" | "openai")
    c.pool.endpoint = ""  # build_rubrics --endpoint (openai)
    c.pool.model = ""  # build_rubrics --model (openai)

    c.sample = ml_collections.ConfigDict()
    c.sample.n = 4  # samples per prompt
    c.sample.temperature = 1.0  # sampling temperature
    c.sample.top_k = 0  # top-k (0 = off)
    c.sample.top_p = 1.0  # top-p (1 = off)
    c.sample.max_new_tokens = 256  # tokens per answer at most
    c.sample.batch_size = 8  # prompts per generate call
    c.sample.pad_to = 64  # prompt lengths padded to a multiple of this
    c.sample.seed = 0  # round r samples with --seed=1000·seed + r
    c.sample.dtype = "float32"  # parameter and compute dtype of the sampler
    c.sample.mesh = ""  # the sampler's mesh ("" = the command's default)

    c.judge = ml_collections.ConfigDict()
    c.judge.judge = "verifier"  # "verifier" | "openai" | "flax" (also evaluate's judge)
    c.judge.endpoint = ""  # OpenAI-compatible base URL (…/v1)
    c.judge.judge_model = ""  # model name at the endpoint, or the flax judge's HF folder
    c.judge.api_key_env = "OPENAI_API_KEY"  # environment variable holding the API key
    c.judge.concurrency = 8  # requests in flight (openai)
    c.judge.timeout = 120.0  # seconds per request (openai)
    c.judge.max_retry_after = 60.0  # longest Retry-After honoured, in seconds (openai)
    c.judge.batch_size = 32  # items per judge call
    c.judge.max_tokens = 0  # longest verdict reply in tokens (0: the judge's default)
    c.judge.mesh = ""  # the flax judge's mesh ("" = the command's default)

    c.pairs = ml_collections.ConfigDict()
    c.pairs.miner = "rubric"  # "rubric" | "outcome"
    c.pairs.gate = "veto"  # essential gate of the reward
    c.pairs.margin = 0.1  # minimum reward gap (outcome: outcome gap)
    c.pairs.criterion_gap = 0.0  # minimum gap on at least one criterion (0 = off)
    c.pairs.max_pairs = 2  # pairs per prompt at most
    c.pairs.dedup = 0.9  # answers at least this similar count as one
    c.pairs.outcome = "holistic"  # the outcome miner's notion of a good answer
    c.pairs.format = "pairs"  # "pairs" | "groups"

    c.train = ml_collections.ConfigDict()
    c.train.config = ""  # rdpo_jax.train's --config (configs/NAME.py[:ARG]); the loop sets data.train,
    # init_from and dpo.reference_from (and dpo.reference with ref_logps) per round
    c.train.overrides = ()  # more "FIELD=VALUE" overrides of that config (--config.FIELD=VALUE)

    c.evaluate = ml_collections.ConfigDict()
    c.evaluate.initial = True  # round 0 evaluates the initial policy (the table's first row)
    c.evaluate.max_new_tokens = 128  # tokens per answer at most
    c.evaluate.batch_size = 32  # prompts per generate call
    c.evaluate.group = "none"  # per-group accuracy by prompt-id prefix ("none" | "prefix")
    c.evaluate.limit = 0  # evaluate the first N prompts only (0: all)
    c.evaluate.mesh = ""  # the evaluation sampler's mesh ("" = the command's default)
    c.evaluate.samples = 0  # also N sampled answers per prompt, reported under `sampled` (0: greedy only)
    c.evaluate.temperature = 1.0  # temperature of the sampled answers
    c.evaluate.seed = 0  # PRNG seed of the sampled answers
    return c
