"""rdpo_jax: rubric-reward DPO (rDPO) for vision-language models in JAX. See README.md and DESIGN.md."""
