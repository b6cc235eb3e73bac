"""Every option of `python -m rdpo_jax.loop` with its default. Loop configs start from `get_config()`.

    python -m rdpo_jax.loop --config=rdpo_jax/configs/NAME.py[:ARG] --workdir=RUNS [--config.FIELD=VALUE …]

The `sample`, `judge`, `pairs` and `evaluate` groups are the flags of those commands (same names, same
defaults); the loop itself sets the paths (--pool, --model, --samples, --judged, --out, --name) and the
sampling seed. A string left empty is not passed (the command's own default applies).
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
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
    c.train.config = ""  # rdpo_jax.train's --config (rdpo_jax/configs/NAME.py[:ARG]); the loop sets data.train,
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
