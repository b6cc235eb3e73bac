"""`python -m rdpo_jax.demo`: the whole rDPO loop on a CPU, on a world where the truth is known."""

ARMS = {  # name: (pairs miner, DPO loss type); configs/loop_demo.py's `arm` argument
    "outcome+sigmoid": ("outcome", "sigmoid"),
    "rubric+sigmoid": ("rubric", "sigmoid"),
    "rubric+rubric": ("rubric", "rubric"),
}
