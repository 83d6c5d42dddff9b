"""GPT: parameter counts, equivalence with Hugging Face GPT-2, init, loss and generation."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from ds_trainer.errors import DsTrainerError
from ds_trainer.model import GPT, PRESETS, GPTConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")


SMALL = GPTConfig(vocab_size=100, block_size=16, n_layer=2, n_head=2, n_embd=32)


def expected_params(cfg: GPTConfig) -> int:
    """GPT-2's parameter count written out from its shape."""
    d = cfg.n_embd
    per_block = (
        2 * d  # ln_1
        + 3 * d * d
        + (3 * d if cfg.qkv_bias else 0)  # c_attn
        + d * d
        + d  # attn.c_proj
        + 2 * d  # ln_2
        + 4 * d * d
        + 4 * d  # mlp.c_fc
        + 4 * d * d
        + d  # mlp.c_proj
    )
    head = 0 if cfg.tie_embeddings else cfg.vocab_size * d
    return cfg.vocab_size * d + cfg.block_size * d + cfg.n_layer * per_block + 2 * d + head


def meta_model(cfg: GPTConfig) -> GPT:
    """A GPT without storage: shapes and counts only, cheap even for gpt2-xl."""
    with torch.device("meta"):
        return GPT(cfg)


# --- parameter counts -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("preset", "count"),
    [
        ("gpt2", 124_439_808),
        ("gpt2-medium", 354_823_168),
        ("gpt2-large", 774_030_080),
        ("gpt2-xl", 1_557_611_200),
    ],
)
def test_preset_parameter_counts(preset, count):
    cfg = GPTConfig.from_preset(preset)
    assert expected_params(cfg) == count
    assert meta_model(cfg).num_parameters() == count


@pytest.mark.parametrize("preset", ["gpt2-tiny", "gpt2"])
def test_formula_matches_instantiated_model(preset):
    cfg = GPTConfig.from_preset(preset)
    model = GPT(cfg)
    assert model.num_parameters() == expected_params(cfg)
    assert (
        model.num_parameters(exclude_position_embedding=True)
        == expected_params(cfg) - cfg.block_size * cfg.n_embd
    )


@pytest.mark.parametrize("changes", [{"qkv_bias": False}, {"tie_embeddings": False}, {"block_size": 7}])
def test_formula_matches_variants(changes):
    cfg = replace(SMALL, **changes)
    assert GPT(cfg).num_parameters() == expected_params(cfg)


def test_untied_head_has_its_own_weight_and_more_parameters():
    tied, untied = GPT(SMALL), GPT(replace(SMALL, tie_embeddings=False))
    assert tied.lm_head.weight is tied.wte.weight
    assert untied.lm_head.weight is not untied.wte.weight
    assert untied.num_parameters() - tied.num_parameters() == SMALL.vocab_size * SMALL.n_embd


def test_no_qkv_bias():
    model = GPT(replace(SMALL, qkv_bias=False))
    assert all(block.attn.c_attn.bias is None for block in model.h)
    assert all(block.attn.c_proj.bias is not None for block in model.h)


# --- equivalence with Hugging Face GPT-2 ------------------------------------------------------------------

CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def hf_state_dict_to_ours(hf_sd: dict) -> dict:
    """HF keys without the `transformer.` prefix; Conv1D weights are (in, out), nn.Linear's (out, in)."""
    out = {}
    for key, value in hf_sd.items():
        key = key.removeprefix("transformer.")
        out[key] = value.t() if key.endswith(CONV1D) else value
    return out


@pytest.mark.parametrize(
    "cfg",
    [
        GPTConfig(vocab_size=1000, block_size=16, n_layer=2, n_head=2, n_embd=32),
        GPTConfig(vocab_size=1000, block_size=32, n_layer=3, n_head=4, n_embd=64),
    ],
    ids=["2x2x32", "3x4x64"],
)
def test_logits_match_huggingface_gpt2(cfg):
    import transformers  # the test extra installs it; a missing one must fail, not skip

    torch.manual_seed(0)
    hf_cfg = transformers.GPT2Config(
        vocab_size=cfg.vocab_size,
        n_positions=cfg.block_size,
        n_embd=cfg.n_embd,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        activation_function="gelu_new",
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
        initializer_range=0.2,  # GPT-2's 0.02 keeps activations so small that exact GELU would pass too
    )
    hf = transformers.GPT2LMHeadModel(hf_cfg).eval()
    with torch.no_grad():  # non-trivial LayerNorm weights and biases, so that each must land in its place
        for name, p in hf.named_parameters():
            if ".ln_" in name and name.endswith("weight"):
                p.uniform_(0.5, 1.5)
            elif p.ndim == 1:
                p.normal_(0.0, 0.1)
    ours = GPT(cfg).eval()
    ours.load_state_dict(hf_state_dict_to_ours(hf.state_dict()), strict=True)
    assert ours.lm_head.weight is ours.wte.weight  # loading kept the tie

    ids = torch.randint(0, cfg.vocab_size, (3, cfg.block_size), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(ids).logits
        got = ours(ids)
    assert got.shape == (3, cfg.block_size, cfg.vocab_size)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


# --- initialisation ---------------------------------------------------------------------------------------


def test_init_statistics():
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=1000, block_size=64, n_layer=4, n_head=4, n_embd=256)
    model = GPT(cfg)
    block = model.h[0]
    residual_std = 0.02 / math.sqrt(2 * cfg.n_layer)
    assert block.attn.c_proj.weight.std().item() == pytest.approx(residual_std, rel=0.1)
    assert block.mlp.c_proj.weight.std().item() == pytest.approx(residual_std, rel=0.1)
    assert block.mlp.c_fc.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert block.attn.c_attn.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert model.wte.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert model.wpe.weight.std().item() == pytest.approx(0.02, rel=0.1)
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            assert torch.count_nonzero(p) == 0, name
        if ".ln_" in f".{name}":
            expected = torch.ones_like(p) if name.endswith("weight") else torch.zeros_like(p)
            assert torch.equal(p, expected), name


def test_torch_init_is_each_modules_pytorch_default():
    """model.init torch: what reset_parameters() draws (the books' model), keyed per module like gpt2's."""
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=1000, block_size=64, n_layer=2, n_head=4, n_embd=256, init="torch")
    model = GPT(cfg)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            bound = 1 / math.sqrt(module.in_features)  # kaiming_uniform_(a=sqrt(5)) and the bias default
            for p in (module.weight, module.bias):
                if p is None or (module is model.lm_head and cfg.tie_embeddings):
                    continue
                assert p.abs().max().item() <= bound, name
                assert p.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.1), name  # uniform
    assert model.wte.weight.std().item() == pytest.approx(1.0, rel=0.05)
    assert model.wpe.weight.std().item() == pytest.approx(1.0, rel=0.05)
    assert torch.equal(model.h[1].ln_1.weight, torch.ones(256))
    gpt2 = GPT(replace(cfg, init="gpt2"))
    assert gpt2.wte.weight.std().item() == pytest.approx(0.02, rel=0.1)


@pytest.mark.parametrize("init", ["gpt2", "torch"])
def test_a_module_gets_the_same_weights_whoever_builds_it(init):
    """A pipeline stage initialises only its layers, under their names in the plain GPT: equal weights."""
    from ds_trainer.model import Block, init_weights

    cfg = GPTConfig(vocab_size=100, block_size=16, n_layer=3, n_head=2, n_embd=16, init=init)
    torch.manual_seed(7)
    model = GPT(cfg)
    torch.manual_seed(7)
    alone = Block(cfg)
    init_weights(alone, "h.2", cfg)
    for (name, got), want in zip(alone.named_parameters(), model.h[2].parameters(), strict=True):
        assert torch.equal(got, want), name
    torch.manual_seed(8)
    assert not torch.equal(GPT(cfg).h[2].mlp.c_fc.weight, model.h[2].mlp.c_fc.weight)  # keyed by the seed too


# --- forward and loss -------------------------------------------------------------------------------------


def test_forward_loss_is_cross_entropy_of_logits():
    torch.manual_seed(0)
    model = GPT(SMALL).eval()
    ids = torch.randint(0, SMALL.vocab_size, (2, 10))
    targets = torch.randint(0, SMALL.vocab_size, (2, 10))
    logits = model(ids)
    loss = model(ids, targets)
    assert logits.shape == (2, 10, SMALL.vocab_size)
    assert loss.ndim == 0
    expected = F.cross_entropy(logits.reshape(-1, SMALL.vocab_size), targets.reshape(-1))
    torch.testing.assert_close(loss, expected)
    # A random model is close to uniform over the vocabulary.
    assert loss.item() == pytest.approx(math.log(SMALL.vocab_size), rel=0.1)


def test_input_longer_than_block_size_raises():
    model = GPT(SMALL)
    with pytest.raises(ValueError, match="block_size 16"):
        model(torch.zeros(1, SMALL.block_size + 1, dtype=torch.long))


# --- generation -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_model() -> GPT:
    """Weights far larger than GPT-2's init, so that the whole context sways each next token."""
    torch.manual_seed(0)
    model = GPT(SMALL).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim > 1:
                p.normal_(0.0, 0.5)
    return model


PROMPT = torch.tensor([[1, 2, 3], [4, 5, 6]])


def test_generate_length_past_block_size(small_model):
    out = small_model.generate(PROMPT, max_new_tokens=20, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 3 + 20)  # longer than block_size 16: the context is cropped, not an error
    assert torch.equal(out[:, :3], PROMPT)
    assert out.min() >= 0 and out.max() < SMALL.vocab_size


def test_greedy_equals_hand_argmax(small_model):
    expected = PROMPT.clone()
    with torch.no_grad():
        for _ in range(20):
            nxt = small_model(expected[:, -SMALL.block_size :])[:, -1].argmax(-1, keepdim=True)
            expected = torch.cat([expected, nxt], dim=1)
    assert torch.equal(small_model.generate(PROMPT, 20, temperature=0), expected)


def test_sampling_is_reproducible_with_a_generator(small_model):
    def sample(seed: int) -> torch.Tensor:
        return small_model.generate(
            PROMPT, 12, temperature=1.0, generator=torch.Generator().manual_seed(seed)
        )

    assert torch.equal(sample(7), sample(7))
    assert not torch.equal(sample(7), sample(8))


def test_sampling_by_hand(small_model):
    """Each token is drawn from softmax(logits / temperature) restricted to the top k."""
    temperature, top_k, seed = 0.7, 5, 11
    gen = torch.Generator().manual_seed(seed)
    expected = PROMPT.clone()
    with torch.no_grad():
        for _ in range(20):
            logits = small_model(expected[:, -SMALL.block_size :])[:, -1] / temperature
            kth = logits.topk(top_k).values[:, -1:]
            probs = F.softmax(logits.masked_fill(logits < kth, float("-inf")), dim=-1)
            assert (probs > 0).sum(-1).tolist() == [top_k, top_k]
            expected = torch.cat([expected, torch.multinomial(probs, 1, generator=gen)], dim=1)
    got = small_model.generate(
        PROMPT, 20, temperature=temperature, top_k=top_k, generator=torch.Generator().manual_seed(seed)
    )
    assert torch.equal(got, expected)


def test_tiny_temperature_is_greedy(small_model):
    greedy = small_model.generate(PROMPT, 20, temperature=0)
    cold = small_model.generate(PROMPT, 20, temperature=1e-4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(cold, greedy)


def test_top_k_1_is_greedy(small_model):
    greedy = small_model.generate(PROMPT, 10, temperature=0)
    top1 = small_model.generate(
        PROMPT, 10, temperature=1.0, top_k=1, generator=torch.Generator().manual_seed(3)
    )
    assert torch.equal(top1, greedy)


# --- config errors ----------------------------------------------------------------------------------------


def test_unknown_preset_raises():
    with pytest.raises(DsTrainerError, match="nope"):
        GPTConfig.from_preset("nope")


def test_from_preset_applies_overrides():
    cfg = GPTConfig.from_preset("gpt2", block_size=256, dropout=0.1)
    assert (cfg.n_layer, cfg.n_embd, cfg.block_size, cfg.dropout) == (12, 768, 256, 0.1)
    assert PRESETS["gpt2"].block_size == 1024  # the preset itself is unchanged


def test_n_embd_not_divisible_by_n_head_raises():
    with pytest.raises(DsTrainerError, match=r"n_embd \(30\) must be divisible by model.n_head \(4\)"):
        GPT(replace(SMALL, n_embd=30, n_head=4))


def test_dropout_acts_in_training_only():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=100, block_size=8, n_layer=1, n_head=2, n_embd=16, dropout=0.5))
    x = torch.randint(0, 100, (2, 8))
    model.train()
    assert not torch.equal(model(x), model(x))
    model.eval()
    assert torch.equal(model(x), model(x))
    no_dropout = GPT(replace(model.config, dropout=0.0))
    no_dropout.load_state_dict(model.state_dict())
    no_dropout.train()
    assert torch.equal(no_dropout(x), model(x))  # eval() turns dropout off, nothing else
