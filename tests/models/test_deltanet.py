"""Gated DeltaNet (`models/deltanet.py`) against transformers' `Qwen3_5GatedDeltaNet` with its torch kernels
(fp32): every answer of a packed row equals the layer run on [prompt + answer] alone — shared prefix, several
answers, segments sharing a row, padding on both sides — with chunk boundaries inside a prompt, at its end
and inside an answer; gradients equal the separate forwards' (torch autograd); a prefill then one token at a
time equals the whole forward; the chunked rule equals transformers' token-by-token one."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from transformers.models.qwen3_5 import modeling_qwen3_5 as hf_qwen35

from rdpo_jax import logps
from rdpo_jax.models import deltanet, layers
from rdpo_jax.models.config import DeltaNetConfig

D = 32
CFG = DeltaNetConfig(key_heads=2, value_heads=4, key_dim=8, value_dim=8, conv_kernel=4)  # GVA: 2 value heads per key head
LINEARS = ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "out_proj")


@pytest.fixture(scope="module")
def pair():
    """(transformers' layer, ours with its weights), random weights large enough that every path matters."""
    torch.manual_seed(0)
    tc = transformers.Qwen3_5TextConfig(hidden_size=D, linear_num_key_heads=2, linear_num_value_heads=4,
                                        linear_key_head_dim=8, linear_value_head_dim=8, linear_conv_kernel_dim=4,
                                        num_hidden_layers=1, layer_types=["linear_attention"])
    theirs = hf_qwen35.Qwen3_5GatedDeltaNet(tc, 0).float()
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_(0, 0.3)
        theirs.A_log.uniform_(-1, 1.5)
        theirs.norm.weight.uniform_(0.5, 1.5)
    ours = deltanet.GatedDeltaNet(D, CFG, 1e-6, param_dtype=jnp.float32, dtype=jnp.float32,
                                  rngs=layers.InitKeys(jax.random.key(0)))
    for name in LINEARS:
        getattr(ours, name).kernel[...] = jnp.asarray(getattr(theirs, name).weight.detach().numpy().T)
    ours.conv1d.weight[...] = jnp.asarray(theirs.conv1d.weight.detach().numpy())
    ours.dt_bias[...], ours.A_log[...] = (jnp.asarray(p.detach().numpy()) for p in (theirs.dt_bias, theirs.A_log))
    ours.norm.scale[...] = jnp.asarray(theirs.norm.weight.detach().numpy())
    return theirs, ours


def _forward(ours):
    graphdef, state = nnx.split(ours)

    @jax.jit
    def run(state, x, branch, segment, chunk_probe):
        mask = logps.attention_mask(branch, segment)
        return nnx.merge(graphdef, state)(x, deltanet.lineage(mask, CFG.conv_kernel, chunk_probe.shape[0]))

    return lambda x, branch, segment, chunk: run(state, x, branch, segment, jnp.zeros(chunk))


def _row(groups, rng, pad_left=0, pad_right=0):
    """One packed row of random inputs: groups of (prompt length, [answer lengths]) one after another, each a
    segment whose answers follow their prompt. Returns (x [T, D], branch, segment, spans), spans = (start,
    length, the separate input [prompt + answer], the answer's offset in it) per answer and per prompt."""
    xs, branch, segment, spans = [np.zeros((pad_left, D), np.float32)], [-1] * pad_left, [-1] * pad_left, []
    at, name = pad_left, 0
    for s, (P, answers) in enumerate(groups):
        prompt = rng.normal(size=(P, D)).astype(np.float32)
        xs.append(prompt)
        branch += [0] * P
        segment += [s] * P
        spans.append((at, P, prompt, 0, at))
        prompt_start, at = at, at + P
        for A in answers:
            name += 1
            answer = rng.normal(size=(A, D)).astype(np.float32)
            xs.append(answer)
            branch += [name] * A
            segment += [s] * A
            spans.append((at, A, np.concatenate([prompt, answer]), P, prompt_start))
            at += A
    xs.append(np.zeros((pad_right, D), np.float32))
    branch, segment = branch + [-1] * pad_right, segment + [-1] * pad_right
    return np.concatenate(xs), np.asarray(branch, np.int32), np.asarray(segment, np.int32), spans


LAYOUTS = {  # (groups, chunk, left padding, right padding); rows of a multiple of the chunk are chunked from 0
    # chunks of 8: a boundary inside the prompt (8), the second answer starting on one (16) and one inside it (24)
    "shared_prefix": ([(13, [3, 9])], 8, 0, 7),
    "prompt_ends_on_a_boundary": ([(16, [5, 6])], 8, 0, 5),
    "multi_answer": ([(5, [7, 2, 11, 4])], 8, 0, 3),
    "segments_and_padding": ([(13, [9, 7, 12]), (5, [3, 11]), (9, [1, 2])], 8, 3, 5),
    "transformers_chunks": ([(70, [50, 40])], 64, 0, 6),  # 64: transformers' own chunk size
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_each_answer_equals_its_separate_transformers_forward(pair, name):
    theirs, ours = pair
    groups, chunk, left, right = LAYOUTS[name]
    x, branch, segment, spans = _row(groups, np.random.default_rng(1), left, right)
    got = np.asarray(_forward(ours)(x[None], branch[None], segment[None], chunk))[0]
    for start, n, alone, offset, _ in spans:
        with torch.no_grad():
            want = theirs(torch.tensor(alone)[None]).numpy()[0, offset:]
        # float32 over outputs of a few units: 1e-5 of the outputs' range
        np.testing.assert_allclose(got[start:start + n], want, rtol=0, atol=1e-5 * np.abs(want).max(),
                                   err_msg=f"{name} at {start}")


def close(got, want, what):
    """Equal to 1e-5 of the expected values' range (float32 sums of a few hundred terms of a few units)."""
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max(), err_msg=what)


def test_gradients_equal_separate_transformers_forwards(pair):
    """d(Σ answers' outputs · c) over a row of two segments with shared prompts: every weight's gradient and
    each input's (a prompt's = the sum over its answers') equal transformers' on the separate rows."""
    theirs, ours = pair
    rng = np.random.default_rng(2)
    x, branch, segment, spans = _row([(13, [3, 9]), (6, [10, 4])], rng, pad_right=3)
    cotangent = rng.normal(size=(len(x), D)).astype(np.float32)
    is_answer = (branch > 0)[:, None]
    graphdef, state = nnx.split(ours)

    def loss(state, x):
        mask = logps.attention_mask(jnp.asarray(branch)[None], jnp.asarray(segment)[None])
        out = nnx.merge(graphdef, state)(x[None], deltanet.lineage(mask, CFG.conv_kernel, 8))[0]
        return jnp.sum(jnp.where(is_answer, out * cotangent, 0))

    g_state, g_x = jax.jit(jax.grad(loss, argnums=(0, 1)))(state, jnp.asarray(x))
    theirs.zero_grad()
    want_x = np.zeros_like(x)
    for start, n, alone, offset, prompt_start in spans:
        if offset == 0:
            continue
        xt = torch.tensor(alone, requires_grad=True)
        out = theirs(xt[None])[0, offset:]
        (out * torch.tensor(cotangent[start:start + n])).sum().backward()  # accumulates over the answers
        want_x[start:start + n] += xt.grad.numpy()[offset:]
        want_x[prompt_start:prompt_start + offset] += xt.grad.numpy()[:offset]
    close(np.asarray(g_x), want_x, "inputs")
    grads = g_state
    for name in LINEARS:
        close(np.asarray(grads[name]["kernel"].get_value()), getattr(theirs, name).weight.grad.numpy().T, name)
    for ours_path, theirs_p in ((("conv1d", "weight"), theirs.conv1d.weight), (("dt_bias",), theirs.dt_bias),
                                (("A_log",), theirs.A_log), (("norm", "scale"), theirs.norm.weight)):
        leaf = grads
        for key in ours_path:
            leaf = leaf[key]
        close(np.asarray(leaf.get_value()), theirs_p.grad.numpy(), str(ours_path))


def test_prefill_then_single_steps_equal_the_whole_forward(pair):
    """Left-padded prompts of different lengths prefilled into a cache (conv tail, state), then token by
    token from it (the recurrent form): each step's output equals the whole sequence's."""
    _, ours = pair
    rng = np.random.default_rng(3)
    B, P, steps = 2, 11, 5
    x = rng.normal(size=(B, P + steps, D)).astype(np.float32)
    valid = np.ones((B, P + steps), bool)
    valid[1, :4] = False  # row 1: a 7-token prompt, left-padded
    x[~valid] = 0
    mask = jnp.asarray(layers.causal_mask(jnp.asarray(valid, jnp.int32)) & valid[:, :, None])
    whole = np.asarray(nnx.jit(lambda m, x: m(x, deltanet.lineage(mask, CFG.conv_kernel, 8)))(ours, jnp.asarray(x)))
    prefill = nnx.jit(lambda m, x: m(x, deltanet.lineage(mask[:, :P, :P], CFG.conv_kernel, 8),
                                     cache=m.init_cache(B, jnp.float32)))
    out, cache = prefill(ours, jnp.asarray(x[:, :P]))
    np.testing.assert_allclose(np.asarray(out)[valid[:, :P]], whole[:, :P][valid[:, :P]], rtol=0, atol=1e-5)
    step = nnx.jit(lambda m, x, cache: m(x, None, cache=cache))
    for t in range(P, P + steps):
        out, cache = step(ours, jnp.asarray(x[:, t:t + 1]), cache)
        np.testing.assert_allclose(np.asarray(out)[:, 0], whole[:, t], rtol=0, atol=1e-5, err_msg=f"step {t}")


def test_chunked_rule_equals_transformers_recurrent_rule():
    """The kernel alone on plain rows (no padding, T = 150: a partial last chunk) against transformers'
    token-by-token `torch_recurrent_gated_delta_rule`, output and final state."""
    rng = np.random.default_rng(4)
    B, T, H, K = 2, 150, 4, 8
    q, k, v = (rng.normal(size=(B, T, H, K)).astype(np.float32) for _ in range(3))
    beta = 1 / (1 + np.exp(-rng.normal(size=(B, T, H)))).astype(np.float32)
    g = -np.exp(rng.normal(-1, 0.5, size=(B, T, H))).astype(np.float32)
    want, want_state = hf_qwen35.torch_recurrent_gated_delta_rule(
        *(torch.tensor(a) for a in (q, k, v)), g=torch.tensor(g), beta=torch.tensor(beta), output_final_state=True,
        use_qk_l2norm_in_kernel=True)
    mask = layers.causal_mask(jnp.ones((B, T), jnp.int32))
    got, state = jax.jit(deltanet.chunked_rule)(deltanet.l2norm(jnp.asarray(q)) * K ** -0.5,
                                                deltanet.l2norm(jnp.asarray(k)), jnp.asarray(v), jnp.asarray(beta),
                                                jnp.asarray(g), deltanet.lineage(mask, 4))
    np.testing.assert_allclose(np.asarray(got), want.numpy(), rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(state), want_state.numpy(), rtol=0, atol=1e-5)
