"""model.init_from: warm start from Hugging Face GPT-2 weights or our export, checked before the run and
loaded into a plain GPT, a ZeRO-3 GPT, a pipeline stage and a real run."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import REPO, fp32, losses, ok, run_pretrain, tiny_args
from safetensors.torch import save_file

from ds_trainer.errors import DsTrainerError
from ds_trainer.export import to_huggingface
from ds_trainer.model import GPT, GPTConfig
from ds_trainer.warm_start import WHAT, init_from_problems, load_initial_weights

TINY = GPTConfig.from_preset("gpt2-tiny")  # GPT-2's vocabulary, 128 positions, 2 blocks of 4 heads, 64 wide
TOKENS = torch.randint(0, TINY.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def hf_model(seed: int = 0, **changes: object):
    """A transformers GPT2LMHeadModel of gpt2-tiny's shape (or `changes`'), no dropout, in eval mode, with
    non-trivial LayerNorms and biases so that each tensor must land in its own place."""
    import transformers  # the test extra installs it; a missing one must fail, not skip

    sizes = {"vocab_size": TINY.vocab_size, "n_positions": TINY.block_size, "n_embd": TINY.n_embd}
    sizes |= {"n_layer": TINY.n_layer, "n_head": TINY.n_head}
    dropout = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**{**sizes, **dropout, **changes})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".ln_" in name and name.endswith("weight"):
                p.uniform_(0.5, 1.5)
            elif p.ndim == 1:
                p.normal_(0.0, 0.1)
    return model


def save_hf(model, folder: Path) -> Path:
    model.save_pretrained(folder)  # transformers 5 writes model.safetensors whatever safe_serialization says
    return folder


def save_hf_bin(model, folder: Path) -> Path:
    """The pytorch_model.bin older transformers wrote and the Hub's original GPT-2 files hold: GPT2Model's names
    (no `transformer.` prefix) with the attention-mask buffers among the weights, and no head."""
    save_hf(model, folder)
    (folder / "model.safetensors").unlink()
    state = {
        k.removeprefix("transformer."): v for k, v in model.state_dict().items() if k != "lm_head.weight"
    }
    n = model.config.n_positions
    for i in range(model.config.n_layer):
        state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(n, n)).view(1, 1, n, n)
        state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    torch.save(state, folder / "pytorch_model.bin")
    return folder


def export_like(model: GPT, out: Path) -> Path:
    """What launch/export.py writes for `model`: OUT/model.safetensors + OUT/config.json, and OUT/hf/."""
    cfg = model.config
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if cfg.tie_embeddings:
        state.pop("lm_head.weight")
    (out / "hf").mkdir(parents=True)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(cfg.to_dict()))
    hf_state, hf_config = to_huggingface(state, cfg)
    if cfg.tie_embeddings:
        hf_state.pop("lm_head.weight")
    save_file(hf_state, str(out / "hf" / "model.safetensors"), metadata={"format": "pt"})
    (out / "hf" / "config.json").write_text(json.dumps(hf_config))
    return out


def hf_logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS).logits


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(TOKENS)


@pytest.fixture(scope="module")
def hf():
    return hf_model()


@pytest.fixture(scope="module")
def hf_dir(hf, tmp_path_factory) -> Path:
    return save_hf(hf, tmp_path_factory.mktemp("hf"))


# --- a plain GPT ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["folder", "weights_file", "pytorch_model_bin"])
def test_huggingface_weights_give_huggingface_logits(layout, hf, hf_dir, tmp_path):
    path = {
        "folder": hf_dir,
        "weights_file": hf_dir / "model.safetensors",
        "pytorch_model_bin": save_hf_bin(hf, tmp_path / "bin") if layout == "pytorch_model_bin" else None,
    }[layout]
    assert init_from_problems(str(path), TINY) == []
    cfg = replace(TINY, init="torch")  # whatever model.init drew is replaced
    model = GPT(cfg)
    load_initial_weights(model, str(path), cfg)
    assert model.lm_head.weight is model.wte.weight  # loading kept the tie
    torch.testing.assert_close(logits(model), hf_logits(hf), atol=1e-5, rtol=1e-5)


def test_untied_head_loads_its_own_weight(tmp_path):
    hf = hf_model(tie_word_embeddings=False)
    path = str(save_hf(hf, tmp_path / "hf"))
    cfg = replace(TINY, tie_embeddings=False)
    assert init_from_problems(path, cfg) == []
    model = GPT(cfg)
    load_initial_weights(model, path, cfg)
    assert not torch.equal(model.lm_head.weight, model.wte.weight)
    torch.testing.assert_close(logits(model), hf_logits(hf), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "changes", [{}, {"tie_embeddings": False, "qkv_bias": False}], ids=["gpt2", "untied_no_qkv_bias"]
)
def test_our_export_loads_back_equal(changes, tmp_path):
    """Both files launch/export.py writes (ours and the HF folder) give back every weight exactly."""
    cfg = replace(TINY, **changes)
    torch.manual_seed(3)
    source = GPT(cfg)
    out = export_like(source, tmp_path / "out")
    want = dict(source.named_parameters())
    for path in (out / "model.safetensors", out, out / "hf"):
        assert init_from_problems(str(path), cfg) == [], path
        torch.manual_seed(4)  # other initial weights
        model = GPT(cfg)
        load_initial_weights(model, str(path), cfg)
        got = dict(model.named_parameters())
        assert got.keys() == want.keys()
        for name, p in got.items():
            assert torch.equal(p, want[name]), (path, name)


def test_a_nonzero_qkv_bias_is_refused_without_model_qkv_bias(hf_dir):
    problems = init_from_problems(str(hf_dir), replace(TINY, qkv_bias=False))
    assert problems == [
        f"model.init_from {hf_dir}: transformer.h.0.attn.c_attn.bias, transformer.h.1.attn.c_attn.bias are not "
        "zero, but model.qkv_bias is false: set model.qkv_bias true to keep the bias"
    ]


# --- the real DeepSpeed engine ----------------------------------------------------------------------------


def tiny_ds(stage: int):
    """ds_configs/zero{stage}.json resolved for a one-rank fp32 CPU run of gpt2-tiny."""
    from ds_trainer.config import load_run_config
    from ds_trainer.ds_config import load_ds_json, resolve

    raw, source = load_ds_json(str(REPO / "ds_configs" / f"zero{stage}.json"))
    raw["bf16"] = {"enabled": False}  # this CPU has no native bf16: equality tests run in fp32
    run = load_run_config(None, ["--train.max_steps", "1"])
    assert run.gpt_config() == TINY
    return resolve(raw, source, run, 1, 1000, "cpu")


@pytest.mark.parametrize("stage", [0, 3])
def test_engine_computes_huggingface_logits(stage, hf, hf_dir, process_group):
    """Loaded before deepspeed.initialize, as runs do; under ZeRO-3 into partitioned parameters, and the
    logits come through the engine, which gathers them."""
    from ds_trainer.engine import build_engine, build_model

    ds = tiny_ds(stage)
    model = build_model(TINY, ds)
    if stage == 3:
        assert all(p.numel() == 0 and p.ds_numel > 0 for p in model.parameters())  # partitioned
    load_initial_weights(model, str(hf_dir), TINY)
    engine = build_engine(model, ds)
    engine.eval()
    with torch.no_grad():
        got = engine(TOKENS)
    torch.testing.assert_close(got, hf_logits(hf), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_pipeline_stage_takes_its_layers_by_layer_map(tie, process_group, tmp_path):
    """GPTPipeline names its layers 0..n_layer+2 (and the tied embedding apart): each gets the GPT tensor of
    its LayerMap name."""
    from ds_trainer.pipeline import GPTPipeline

    hf = hf_model(tie_word_embeddings=tie)
    path = str(save_hf(hf, tmp_path / "hf"))
    cfg = replace(TINY, tie_embeddings=tie)
    stage = GPTPipeline(cfg, 1, "parameters", checkpoint_blocks=False)  # one stage: every layer local
    load_initial_weights(stage, path, cfg)
    torch.testing.assert_close(logits(stage), hf_logits(hf), atol=1e-5, rtol=1e-5)


# --- what init_from_problems says -------------------------------------------------------------------------


def test_missing_path(tmp_path):
    path = tmp_path / "nowhere"
    assert init_from_problems(str(path), TINY) == [f"model.init_from {path}: no such file or folder: {WHAT}"]


def test_folder_without_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert init_from_problems(str(tmp_path), TINY) == [
        f"model.init_from {tmp_path}: the folder has neither model.safetensors nor pytorch_model.bin: {WHAT}"
    ]


def test_unreadable_or_foreign_files(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    assert init_from_problems(str(text), TINY) == [
        f"model.init_from {text}: not a .safetensors or .bin weights file: {WHAT}"
    ]
    broken = tmp_path / "model.safetensors"
    broken.write_bytes(b"\x00" * 16)
    (problem,) = init_from_problems(str(broken), TINY)
    assert problem.startswith(f"model.init_from {broken}: cannot be read (") and problem.endswith(WHAT)
    checkpoint = tmp_path / "pytorch_model.bin"  # a whole training checkpoint, not a state dict
    torch.save({"module": {"wte.weight": torch.zeros(2)}, "step": 3}, checkpoint)
    assert init_from_problems(str(checkpoint), TINY) == [
        f"model.init_from {checkpoint}: cannot be read (not a state dict of tensors): {WHAT}"
    ]
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    assert init_from_problems(str(tmp_path), TINY) == [
        f"model.init_from {tmp_path}: config.json describes a 'llama' model, not GPT-2: {WHAT}"
    ]


@pytest.fixture(scope="module")
def narrow_dir(tmp_path_factory) -> Path:
    """GPT-2 weights 32 wide: each of its 28 tensors has another shape than gpt2-tiny's."""
    return save_hf(hf_model(n_embd=32), tmp_path_factory.mktemp("narrow"))


def test_a_model_of_another_width(narrow_dir):
    p = f"model.init_from {narrow_dir}"
    fix = "set the model's sizes to the weights' or use weights of this shape"
    assert init_from_problems(str(narrow_dir), TINY) == [
        f"{p}: its config.json has n_embd 32, the run's model.n_embd is 64: set model.n_embd 32",
        f"{p}: transformer.wte.weight has shape (50257, 32) but the model (model.vocab_size 50257, "
        f"model.n_embd 64) needs (50257, 64): {fix}",
        f"{p}: transformer.wpe.weight has shape (128, 32) but the model (model.block_size 128, model.n_embd 64) "
        f"needs (128, 64): {fix}",
        f"{p}: transformer.h.0.ln_1.weight has shape (32,) but the model (model.n_embd 64) needs (64,): {fix}",
        f"{p}: 25 more tensors have another shape than the model's",
    ]


def test_without_config_json_the_shapes_say_it_in_the_files_layout(narrow_dir, tmp_path):
    weights = tmp_path / "model.safetensors"
    shutil.copy(narrow_dir / "model.safetensors", weights)
    lines = init_from_problems(str(weights), TINY)
    assert len(lines) == 4 and lines[0].startswith(
        f"model.init_from {weights}: transformer.wte.weight has shape (50257, 32)"
    )
    assert init_from_problems(str(weights), replace(TINY, n_embd=32, n_head=4)) == []


def test_shapes_are_named_in_the_files_conv1d_layout(tmp_path):
    """An MLP of another width (HF's n_inner): GPT-2's Conv1D stores (in, out), and so does the message."""
    path = save_hf(hf_model(n_inner=128), tmp_path / "n_inner")
    p, fix = f"model.init_from {path}", "set the model's sizes to the weights' or use weights of this shape"
    assert init_from_problems(str(path), TINY) == [
        f"{p}: transformer.h.0.mlp.c_fc.weight has shape (64, 128) but the model (model.n_embd 64) needs "
        f"(64, 256): {fix}",
        f"{p}: transformer.h.0.mlp.c_fc.bias has shape (128,) but the model (model.n_embd 64) needs (256,): {fix}",
        f"{p}: transformer.h.0.mlp.c_proj.weight has shape (128, 64) but the model (model.n_embd 64) needs "
        f"(256, 64): {fix}",
        f"{p}: 3 more tensors have another shape than the model's",
    ]


def test_a_model_of_another_depth_names_the_extra_tensors(tmp_path):
    path = save_hf(hf_model(n_layer=3), tmp_path / "deep")
    assert init_from_problems(str(path), TINY) == [
        f"model.init_from {path}: its config.json has n_layer 3, the run's model.n_layer is 2: set model.n_layer 3",
        f"model.init_from {path}: holds 12 tensors (transformer.h.2.attn.c_attn.bias, "
        "transformer.h.2.attn.c_attn.weight, transformer.h.2.attn.c_proj.bias and 9 more), which the model does "
        "not have: use weights of the configured model (model.n_layer, model.tie_embeddings, model.qkv_bias) or "
        "configure the model as theirs",
    ]
    shallow = GPTConfig.from_preset("gpt2-tiny", n_layer=4)
    lines = init_from_problems(str(path), shallow)
    assert lines[1].startswith(f"model.init_from {path}: lacks 12 tensors (transformer.h.3.attn.c_attn.bias,")


def test_settings_our_gpt_cannot_follow_and_head_ties(tmp_path):
    path = save_hf(hf_model(activation_function="relu", tie_word_embeddings=False), tmp_path / "relu")
    problems = init_from_problems(str(path), TINY)
    assert problems[0] == (
        f"model.init_from {path}: its config.json has tie_word_embeddings false, the run's model.tie_embeddings "
        "is true: set model.tie_embeddings false"
    )
    assert problems[1].startswith(f"model.init_from {path}: its config.json has activation_function 'relu'")
    assert len(problems) == 2  # the head's tensor has the shape a tied model's would: no further problem


def test_the_list_is_capped(narrow_dir):
    """A model that differs in everything still gives a short list: every problem kind once or a few times."""
    other = GPTConfig(vocab_size=1000, block_size=16, n_layer=5, n_head=2, n_embd=16)
    problems = init_from_problems(str(narrow_dir), other)
    assert len(problems) <= 12 and sum("has shape" in p for p in problems) == 3, problems


def test_loading_bad_weights_raises_the_same_problems(narrow_dir):
    model = GPT(TINY)
    before = model.wte.weight.detach().clone()
    with pytest.raises(DsTrainerError) as e:
        load_initial_weights(model, str(narrow_dir), TINY)
    assert str(e.value) == "; ".join(init_from_problems(str(narrow_dir), TINY))
    assert torch.equal(model.wte.weight, before)


# --- launch/pretrain.py -----------------------------------------------------------------------------------


def test_run_with_weights_of_another_shape_stops_with_one_line(narrow_dir, tmp_path, verdict_path):
    proc = run_pretrain(
        tiny_args(tmp_path / "run", verdict_path, 2, **{"model.init_from": narrow_dir}), ranks=0
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    (line,) = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert line.startswith(f"error: model.init_from {narrow_dir}: its config.json has n_embd 32")
    assert "transformer.wte.weight has shape (50257, 32)" in line


def first_batch_loss(hf, run_args: list[str], global_batch: int) -> float:
    """The HF model's loss on the windows of a run's first step (all ranks' together: they read one global
    order, and every window has as many tokens, so the run's mean loss is the mean over these)."""
    from ds_trainer.config import load_run_config
    from ds_trainer.data import GlobalBatchSampler, SampleStream, build_datasets

    run = load_run_config(None, run_args)
    train, _, weights = build_datasets(
        run.data_sources(), run.context_length, run.stride, run.data.val_fraction, TINY.vocab_size
    )
    sampler = GlobalBatchSampler(SampleStream(train.sizes(), weights, run.train.seed), global_batch, 0, 1)
    x, y = train.batch(sampler.next_step(1)[0])
    with torch.no_grad():
        return float(F.cross_entropy(hf(x).logits.view(-1, TINY.vocab_size), y.view(-1)))


def test_run_starts_from_the_weights_and_a_resume_from_its_checkpoint(hf, hf_dir, tmp_path, verdict_path):
    """A fresh run's first loss is the HF model's on the same batch, and it trains on from there; started
    again, it resumes from its checkpoint and leaves model.init_from alone."""
    extra = {"model.init_from": hf_dir, "checkpoint.save_interval": 2}
    args = [
        "--ds_config",
        str(fp32(tmp_path / "z0.json", "zero0")),
        *tiny_args(tmp_path / "run", verdict_path, 2, **extra),
    ]
    proc = run_pretrain(args, ranks=0)
    ok(proc)
    assert f"initial weights from model.init_from {hf_dir}" in proc.stdout
    got = losses(tmp_path / "run")
    assert got[1] == pytest.approx(first_batch_loss(hf, args[2:], 2), rel=1e-5)
    assert set(got) == {1, 2}
    again = run_pretrain(args, ranks=0)
    ok(again)
    assert "resumed from" in again.stdout and "initial weights from" not in again.stdout


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["zero3", "pipeline"])
def test_two_rank_runs_start_from_the_weights(layout, hf, hf_dir, tmp_path, verdict_path):
    """Two ranks under the launcher: ZeRO-3 (each rank fills its partitions from the gathered tensors) and two
    pipeline stages (each stage loads only its own layers, both the tied embedding)."""
    base, extra = ("zero3", []) if layout == "zero3" else ("zero1", ["--pipeline.stages", "2"])
    args = tiny_args(tmp_path / "run", verdict_path, 2, **{"model.init_from": hf_dir})
    ok(run_pretrain(["--ds_config", str(fp32(tmp_path / "ds.json", base)), *args, *extra], ranks=2))
    # ZeRO-3: 2 ranks x micro-batch 2; the pipeline: one data-parallel replica, micro-batch 2.
    global_batch = 4 if layout == "zero3" else 2
    assert losses(tmp_path / "run")[1] == pytest.approx(first_batch_loss(hf, args, global_batch), rel=1e-5)
