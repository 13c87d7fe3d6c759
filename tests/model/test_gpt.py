"""Tests for pipeline.model.gpt and pipeline.model.presets (CPU, fp32, small configs)."""

import math
import time
from dataclasses import FrozenInstanceError

import pytest
import torch
import torch.nn.functional as F

from pipeline.export.hf import gpt_config_to_hf, to_hf_state_dict
from pipeline.model.gpt import GPT, GPTConfig, GPTOutput, build_attention_mask, count_params, flops_per_token
from pipeline.model.presets import PRESETS, UnknownPresetError, get_preset, preset_rows
from pipeline.train.deepspeed import apply_activation_checkpointing, param_groups


def small_cfg(**overrides: object) -> GPTConfig:
    base: dict[str, object] = dict(vocab_size=97, context_length=32, n_layer=2, n_head=2, d_model=32)
    base.update(overrides)
    return GPTConfig(**base)  # type: ignore[arg-type]


def make_model(cfg: GPTConfig, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(cfg).eval()


def closed_form_params(vocab: int, context: int, n_layer: int, d: int) -> int:
    """GPT-2 with biases and a tied LM head. Per layer: ln_1 2d, c_attn 3d^2+3d, c_proj d^2+d, ln_2 2d,
    c_fc 4d^2+4d, mlp.c_proj 4d^2+d = 12d^2+13d; plus wte V*d, wpe C*d and ln_f 2d."""
    return vocab * d + context * d + n_layer * (12 * d * d + 13 * d) + 2 * d


# --------------------------------------------------------------------------------------------- basics


def test_forward_shapes_and_initial_loss() -> None:
    cfg = PRESETS["nano"].model
    model = make_model(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 16))
    out = model(ids)
    assert isinstance(out, GPTOutput)
    assert out.logits.shape == (2, 16, cfg.vocab_size)
    assert out.loss is None and out.past_key_values is None
    out = model(ids, targets=torch.randint(0, cfg.vocab_size, (2, 16)))
    assert out.loss is not None and out.loss.shape == ()
    assert out.loss.item() == pytest.approx(math.log(cfg.vocab_size), abs=0.1)


def test_loss_ignores_minus_100_targets() -> None:
    cfg = small_cfg()
    model = make_model(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 10))
    targets = torch.randint(0, cfg.vocab_size, (2, 10))
    targets[:, :6] = -100  # e.g. masked prompt tokens
    out = model(ids, targets=targets)
    expected = F.cross_entropy(out.logits[:, 6:].reshape(-1, cfg.vocab_size), targets[:, 6:].reshape(-1))
    torch.testing.assert_close(out.loss, expected)


def test_sequence_longer_than_context_raises() -> None:
    cfg = small_cfg(context_length=8)
    model = make_model(cfg)
    with pytest.raises(ValueError, match="exceeds context_length 8"):
        model(torch.zeros(1, 9, dtype=torch.long))
    past = model(torch.zeros(1, 6, dtype=torch.long), use_cache=True).past_key_values
    with pytest.raises(ValueError, match=r"past 6 \+ new 3"):
        model(torch.zeros(1, 3, dtype=torch.long), past_key_values=past)


def test_dropout_only_in_training() -> None:
    cfg = small_cfg(dropout=0.2)
    model = make_model(cfg)
    ids = torch.randint(0, cfg.vocab_size, (1, 12))
    torch.testing.assert_close(model(ids).logits, model(ids).logits, rtol=0, atol=0)
    model.train()
    assert not torch.allclose(model(ids).logits, model(ids).logits)


# ------------------------------------------------------------------------------------ attention masks


@pytest.mark.parametrize("sparse", [False, True])
def test_causality(sparse: bool) -> None:
    cfg = small_cfg(n_layer=3, sparse_attention=sparse, local_window=4)
    model = make_model(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 20))
    changed = ids.clone()
    changed[:, 11] = (changed[:, 11] + 1) % cfg.vocab_size
    a, b = model(ids).logits, model(changed).logits
    torch.testing.assert_close(a[:, :11], b[:, :11], rtol=0, atol=1e-6)
    assert not torch.allclose(a[:, 11:], b[:, 11:])


def test_build_attention_mask_band_with_cache_offset() -> None:
    # 3 new queries at cache indices 5, 6, 7 over 8 keys, band width 3: query q sees keys q-2 .. q.
    mask = build_attention_mask(3, 5, local_window=3)
    expected = torch.tensor(
        [
            [0, 0, 0, 1, 1, 1, 0, 0],
            [0, 0, 0, 0, 1, 1, 1, 0],
            [0, 0, 0, 0, 0, 1, 1, 1],
        ],
        dtype=torch.bool,
    )
    assert mask.shape == (1, 1, 3, 8)
    assert torch.equal(mask[0, 0], expected)
    # dense with the same offset: causal only
    assert torch.equal(build_attention_mask(3, 5)[0, 0], torch.ones(3, 8, dtype=torch.bool).tril(5))
    # no cache: lower-triangular band
    band = build_attention_mask(6, 0, local_window=2)[0, 0]
    assert torch.equal(band, torch.ones(6, 6, dtype=torch.bool).tril() & ~torch.ones(6, 6, dtype=torch.bool).tril(-2))


def test_build_attention_mask_padding_keeps_self() -> None:
    pad = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    mask = build_attention_mask(4, 0, key_padding_mask=pad)
    assert mask.shape == (2, 1, 4, 4)
    # row 0: padding keys masked, but every query still sees itself (no all-False rows -> no NaN)
    assert torch.equal(mask[0, 0].int(), torch.tensor([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]]))
    assert torch.equal(mask[1, 0], torch.ones(4, 4, dtype=torch.bool).tril())
    assert mask.any(-1).all()


def test_attention_mask_for_layers() -> None:
    model = make_model(small_cfg(n_layer=4, sparse_attention=True, local_window=3))
    assert model.attention_mask_for(0, 8) is None  # dense, no cache, no padding -> SDPA is_causal
    assert model.attention_mask_for(2, 8) is None
    assert torch.equal(model.attention_mask_for(1, 8), build_attention_mask(8, local_window=3))
    assert torch.equal(model.attention_mask_for(3, 2, t_past=6), build_attention_mask(2, 6, local_window=3))
    assert torch.equal(model.attention_mask_for(0, 2, t_past=6), build_attention_mask(2, 6))


def _zero_layer0_residual(model: GPT) -> None:
    """Make block 0 the identity so position t only sees what layer 1's attention lets through."""
    with torch.no_grad():
        for proj in (model.transformer.h[0].attn.c_proj, model.transformer.h[0].mlp.c_proj):
            proj.weight.zero_()
            proj.bias.zero_()


@pytest.mark.parametrize("sparse", [True, False])
def test_sparse_layer_only_sees_local_window(sparse: bool) -> None:
    window, t = 4, 12
    model = make_model(small_cfg(sparse_attention=sparse, local_window=window))
    _zero_layer0_residual(model)
    ids = torch.randint(0, 97, (1, 20))
    base = model(ids).logits[0, t]

    old = ids.clone()
    old[0, : t - window + 1] = (old[0, : t - window + 1] + 1) % 97  # every key at j <= t - window
    inside = ids.clone()
    inside[0, t - window + 1] = (inside[0, t - window + 1] + 1) % 97  # oldest key inside the band

    assert not torch.allclose(model(inside).logits[0, t], base)
    if sparse:
        torch.testing.assert_close(model(old).logits[0, t], base, rtol=0, atol=1e-6)
    else:  # control: the same edit is visible through a dense layer, so the test above is meaningful
        assert not torch.allclose(model(old).logits[0, t], base)


def test_sparse_with_window_covering_context_equals_dense() -> None:
    dense = make_model(small_cfg())
    sparse = GPT(small_cfg(sparse_attention=True, local_window=32)).eval()
    sparse.load_state_dict(dense.state_dict())
    ids = torch.randint(0, 97, (2, 32))
    torch.testing.assert_close(sparse(ids).logits, dense(ids).logits, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------- KV cache and padding


@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("prefill", [1, 5])
def test_kv_cache_matches_full_forward(sparse: bool, prefill: int) -> None:
    cfg = small_cfg(n_layer=3, sparse_attention=sparse, local_window=3)
    model = make_model(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 14))
    full = model(ids).logits

    out = model(ids[:, :prefill], use_cache=True)
    steps = [out.logits]
    past = out.past_key_values
    assert past is not None and len(past) == cfg.n_layer
    assert past[0][0].shape == (2, cfg.n_head, prefill, cfg.d_head)
    for i in range(prefill, ids.size(1)):
        out = model(ids[:, i : i + 1], past_key_values=past, use_cache=True)
        past = out.past_key_values
        steps.append(out.logits)
    assert past is not None and past[-1][1].shape == (2, cfg.n_head, 14, cfg.d_head)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=1e-5)


@pytest.mark.parametrize("sparse", [False, True])
def test_left_padding_matches_single_prompts(sparse: bool) -> None:
    cfg = small_cfg(n_layer=3, sparse_attention=sparse, local_window=3)
    model = make_model(cfg)
    prompts = [torch.randint(1, cfg.vocab_size, (n,)) for n in (7, 4, 1)]
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :] = p
        mask[row, width - len(p) :] = 1

    out = model(ids, attention_mask=mask, use_cache=True)
    assert torch.isfinite(out.logits).all()  # padding queries attend themselves, no NaN
    next_tok = torch.randint(1, cfg.vocab_size, (len(prompts), 1))
    step = model(
        next_tok,
        past_key_values=out.past_key_values,
        attention_mask=torch.cat([mask, torch.ones_like(next_tok)], dim=1),
    )
    for row, p in enumerate(prompts):
        alone = model(torch.cat([p, next_tok[row]])[None]).logits[0]
        torch.testing.assert_close(out.logits[row, -1], alone[-2], rtol=0, atol=1e-5)
        torch.testing.assert_close(step.logits[row, -1], alone[-1], rtol=0, atol=1e-5)


def test_attention_mask_shape_is_checked() -> None:
    model = make_model(small_cfg())
    with pytest.raises(ValueError, match="attention_mask must have shape"):
        model(torch.zeros(2, 5, dtype=torch.long), attention_mask=torch.ones(2, 4))


# ------------------------------------------------------------------------------- init and parameters


def test_init_statistics_and_weight_tying() -> None:
    cfg = GPTConfig(vocab_size=2048, context_length=256, n_layer=4, n_head=4, d_model=256)
    model = make_model(cfg)
    resid_std = 0.02 / math.sqrt(2 * cfg.n_layer)
    for name, p in model.named_parameters():
        if name.endswith(("attn.c_proj.weight", "mlp.c_proj.weight")):
            assert p.std().item() == pytest.approx(resid_std, rel=0.05), name
        elif p.dim() >= 2:
            assert p.std().item() == pytest.approx(0.02, rel=0.05), name
            assert abs(p.mean().item()) < 1e-3, name
        elif name.endswith("bias"):
            assert torch.count_nonzero(p) == 0, name
        else:  # LayerNorm weights
            assert torch.equal(p, torch.ones_like(p)), name
    assert model.lm_head.weight is model.transformer.wte.weight
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    assert "lm_head.weight" not in dict(model.named_parameters())  # tied weight listed once
    assert model.num_params() == closed_form_params(2048, 256, 4, 256)
    assert model.num_params(non_embedding=True) == model.num_params() - 256 * 256


def test_meta_build_then_materialize_and_assign_load() -> None:
    cfg = small_cfg()
    with torch.device("meta"):
        model = GPT(cfg)
    assert all(p.is_meta for p in model.parameters())
    model.to_empty(device="cpu")
    model.tie_weights()  # to_empty() replaces parameters
    torch.manual_seed(0)
    model.init_weights()
    assert model.transformer.h[0].attn.c_proj.weight.std().item() == pytest.approx(0.01, rel=0.15)
    assert model.lm_head.weight is model.transformer.wte.weight

    source = make_model(cfg, seed=1)
    with torch.device("meta"):
        loaded = GPT(cfg)
    state = {k: v for k, v in source.state_dict().items() if k != "lm_head.weight"}
    loaded.load_state_dict(state, strict=False, assign=True)
    assert loaded.lm_head.weight.is_meta  # assign=True breaks the tie ...
    loaded.tie_weights()  # ... and tie_weights() restores it
    ids = torch.randint(0, cfg.vocab_size, (1, 8))
    torch.testing.assert_close(loaded.eval()(ids).logits, source(ids).logits, rtol=0, atol=0)


def test_gradient_checkpointing_gives_same_gradients() -> None:
    cfg = small_cfg(sparse_attention=True, local_window=4)
    ids = torch.randint(0, cfg.vocab_size, (2, 16))
    grads = []
    for flag in (False, True):
        model = make_model(cfg).train()
        if flag:
            apply_activation_checkpointing(model)
        model(ids, targets=ids).loss.backward()
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_configure_param_groups() -> None:
    model = make_model(small_cfg())
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    ids = [id(p) for p in decay["params"] + no_decay["params"]]
    assert len(ids) == len(set(ids))
    assert sum(p.numel() for p in decay["params"] + no_decay["params"]) == model.num_params()
    assert sum(p is model.transformer.wte.weight for p in decay["params"]) == 1


def test_reference_gpt2_124m_count() -> None:
    assert closed_form_params(50257, 1024, 12, 768) == 124_439_808  # nanoGPT's GPT-2 small
    assert count_params(GPTConfig()) == 124_439_808


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_param_counts_match_closed_form(name: str) -> None:
    m = PRESETS[name].model
    assert count_params(m) == closed_form_params(m.vocab_size, m.context_length, m.n_layer, m.d_model)


@pytest.mark.parametrize(
    ("name", "nominal"),
    [
        ("gpt3-small", 125e6),
        ("gpt3-medium", 350e6),
        ("gpt3-large", 760e6),
        ("gpt3-xl", 1.3e9),
        ("gpt3-2.7b", 2.7e9),
        ("gpt3-6.7b", 6.7e9),
        ("gpt3-13b", 13e9),
        ("gpt3-175b", 175e9),
    ],
)
def test_preset_sizes_near_paper(name: str, nominal: float) -> None:
    assert count_params(PRESETS[name].model) == pytest.approx(nominal, rel=0.03)


def test_count_params_on_meta_is_fast() -> None:
    count_params(GPTConfig(n_layer=1, d_model=8, n_head=1, vocab_size=8))  # one-off torch import warm-up
    count_params.cache_clear()
    start = time.perf_counter()
    n = count_params(get_preset("gpt3-175b").model)
    assert time.perf_counter() - start < 1.0
    assert n == pytest.approx(175e9, rel=0.01)


def test_flops_per_token_by_hand() -> None:
    cfg = get_preset("gpt3-small").model
    L, d, V, C = cfg.n_layer, cfg.d_model, cfg.vocab_size, cfg.context_length
    n = V * d + L * (12 * d * d + 13 * d) + 2 * d  # no position embeddings
    assert flops_per_token(cfg) == 6 * n + 12 * L * d * 2048
    assert flops_per_token(cfg, seq_len=512) == 6 * n + 12 * L * d * 512
    assert flops_per_token(cfg) == 6 * (count_params(cfg) - C * d) + 12 * L * d * C


# ---------------------------------------------------------------------------------------- training


def test_tiny_model_memorizes_one_batch() -> None:
    cfg = GPTConfig(vocab_size=64, context_length=16, n_layer=2, n_head=2, d_model=64)
    model = make_model(cfg).train()
    data = torch.randint(0, cfg.vocab_size, (4, cfg.context_length + 1))
    x, y = data[:, :-1], data[:, 1:]
    opt = torch.optim.AdamW(param_groups(model, 0.0), lr=1e-2)
    for _ in range(150):
        loss = model(x, targets=y).loss
        assert loss is not None
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    assert loss.item() < 0.05


# --------------------------------------------------------------------------------- Hugging Face parity


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_logits_match_huggingface_gpt2(attn_implementation: str) -> None:
    transformers = pytest.importorskip("transformers")
    cfg = small_cfg(n_layer=3, n_head=4, d_model=64)
    model = make_model(cfg)
    with torch.no_grad():  # O(1) weights: at init scale (0.02) exact vs tanh GELU would hide below atol
        for p in model.parameters():
            p.normal_(1.0 if p.dim() == 1 and p.abs().sum() > 0 else 0.0, 0.3)
    hf_cfg = gpt_config_to_hf(cfg)
    hf_cfg._attn_implementation = attn_implementation
    hf = transformers.GPT2LMHeadModel(hf_cfg).eval()
    ours = model.state_dict()
    assert set(ours) == set(hf.state_dict())  # one-to-one names
    hf.load_state_dict(to_hf_state_dict(ours), strict=True)
    assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()

    ids = torch.randint(0, cfg.vocab_size, (2, cfg.context_length))
    with torch.no_grad():
        expected = hf(input_ids=ids).logits
    logits = model(ids).logits
    assert logits.std() > 1.0  # the comparison below is not vacuous
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-4)

    # left padding: same real-token logits as HF given the same mask and (cumsum - 1) positions
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    real = mask.bool()
    torch.testing.assert_close(model(ids, attention_mask=mask).logits[real], expected[real], rtol=0, atol=1e-4)


# -------------------------------------------------------------------------------------------- config


def test_config_validation() -> None:
    with pytest.raises(ValueError, match=r"d_model \(100\) must be divisible by n_head \(3\)"):
        GPTConfig(d_model=100, n_head=3)
    with pytest.raises(ValueError, match="n_layer must be a positive integer"):
        GPTConfig(n_layer=0)
    with pytest.raises(ValueError, match="dropout"):
        GPTConfig(dropout=1.0)
    with pytest.raises(ValueError, match="local_window"):
        GPTConfig(local_window=0)
    with pytest.raises(FrozenInstanceError):
        GPTConfig().n_layer = 3  # type: ignore[misc]
    assert GPTConfig(d_model=768, n_head=12).d_head == 64


def test_config_dict_round_trip() -> None:
    cfg = small_cfg(sparse_attention=True, local_window=7, dropout=0.1, bias=False)
    d = cfg.to_dict()
    assert d["local_window"] == 7 and d["sparse_attention"] is True
    assert GPTConfig.from_dict(d) == cfg
    with pytest.raises(ValueError, match="unknown GPTConfig key.*n_embd.*valid keys: vocab_size"):
        GPTConfig.from_dict({**d, "n_embd": 64})


# ------------------------------------------------------------------------------------------- presets


def test_get_preset_unknown_name() -> None:
    assert get_preset("tiny") is PRESETS["tiny"]
    with pytest.raises(UnknownPresetError, match="did you mean 'gpt3-small'.*choose one of: nano, tiny"):
        get_preset("gpt3-smal")
    with pytest.raises(KeyError):
        get_preset("nope")
    with pytest.raises(ValueError):
        get_preset("nope")


def test_presets_table() -> None:
    assert list(PRESETS)[:2] == ["nano", "tiny"]
    for p in PRESETS.values():
        if p.name.startswith("gpt3-"):
            assert p.model.context_length == 2048 and p.model.vocab_size == 50257
            assert not p.model.sparse_attention  # dense by default
    assert PRESETS["gpt3-xl"].model.d_head == 128 and PRESETS["gpt3-13b"].model.d_head == 128
    assert PRESETS["gpt3-175b"].batch_tokens == 3_200_000

    rows = preset_rows()
    assert [r["name"] for r in rows] == list(PRESETS)
    assert list(rows[0]) == [
        "name", "n_layer", "d_model", "n_head", "d_head", "context_length",
        "n_params", "flops_per_token", "batch_tokens", "learning_rate",
    ]  # fmt: skip
    n_params = [r["n_params"] for r in rows]
    assert n_params == sorted(n_params)
    small = rows[2]
    assert small["name"] == "gpt3-small" and small["learning_rate"] == 6.0e-4
    assert small["flops_per_token"] == flops_per_token(PRESETS["gpt3-small"].model)
