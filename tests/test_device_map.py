"""Models bigger than one device (`model.device_map`, src/models/hf_adapters.py: `place`,
`dispatch`, `check_device_map`): a tiny GPT-2, Llama and GPT-NeoX (parallel residual layers)
dispatched by accelerate with a device map of one entry per embedding, decoder layer, final norm,
rotary embedding and LM head, give the undispatched model's logits, lesion values and exact
gradient decomposition; moving the dispatched network keeps the map; `hf_causal_lm` takes
`device_map` for a random-weight config and for a saved model; what cannot run is refused in one
line (accelerate missing, offload, training, a bad map, a dispatched non-HF model).

On a CPU-only machine every device of a map is the CPU: accelerate still hooks every module the
map names (`force_hooks`) and `place(force=True)` puts the block and head moves in, but they move
nothing, so the values are bit-for-bit those of the undispatched network. Where CUDA is visible
the same tests also run two real splits, CPU + GPU either way round (`main_device="cpu"`: each
module runs where it is mapped, no offload), compared with the undispatched CPU network within
float32 rounding; these have not run yet (no GPU so far), nor has any split over two GPUs."""

# ruff: noqa: E402
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import importlib.util

import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoConfig, AutoModelForCausalLM

from src.engines.decomposition import propagate
from src.engines.lesion import lesion_errors, lesion_plan
from src.errors import ConfigError, validate
from src.models import hf_adapters
from src.models.adapt import adapt, check_equal
from src.models.hf_adapters import check_device_map, hf_causal_lm, place

# the dispatching tests need accelerate (pip install -e '.[multi]'; '.[dev]' has it too); the
# refusals and the config checks run without it
needs_accelerate = pytest.mark.skipif(
    importlib.util.find_spec("accelerate") is None, reason="accelerate is not installed"
)

VOCAB, T, LAYERS = 48, 10, 4
IDS = dict(vocab_size=VOCAB, bos_token_id=0, eos_token_id=0)  # the default ids lie outside VOCAB
CONFIGS = {
    "gpt2": dict(n_layer=LAYERS, n_embd=16, n_head=2, n_positions=32, **IDS),
    "llama": dict(
        num_hidden_layers=LAYERS,
        hidden_size=16,
        intermediate_size=32,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
        **IDS,
    ),
    "gpt_neox": dict(
        num_hidden_layers=LAYERS,
        hidden_size=16,
        intermediate_size=32,
        num_attention_heads=2,
        rotary_pct=0.5,
        use_parallel_residual=True,
        max_position_embeddings=32,
        **IDS,
    ),
}
# model_type -> (modules with the embeddings, the decoder layers' ModuleList, the modules after)
LAYOUT = {
    "gpt2": (
        ("transformer.wte", "transformer.wpe", "transformer.drop", "lm_head"),  # lm_head: tied
        "transformer.h",
        ("transformer.ln_f",),
    ),
    "llama": (
        ("model.embed_tokens",),
        "model.layers",
        ("model.norm", "model.rotary_emb", "lm_head"),
    ),
    "gpt_neox": (
        ("gpt_neox.embed_in", "gpt_neox.emb_dropout"),
        "gpt_neox.layers",
        ("gpt_neox.final_layer_norm", "gpt_neox.rotary_emb", "lm_head"),
    ),
}
# split -> (device of the embeddings and even layers, of the odd layers and what follows)
SPLITS = {"cpu": ("cpu", "cpu")}  # every device here is the CPU: hooks everywhere, no moves
if torch.cuda.is_available():
    SPLITS |= {"cpu+cuda": ("cpu", "cuda:0"), "cuda+cpu": ("cuda:0", "cpu")}


def tiny(model_type, dtype=torch.float32):
    """A tiny random model, the same for a seed, with its norms moved off their initial values
    (so that a norm read on the wrong input gives other logits)."""
    torch.manual_seed(0)
    cfg = AutoConfig.for_model(model_type, **CONFIGS[model_type])
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager", dtype=dtype)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln_" in name:
                p.add_(0.5 * torch.randn(p.shape, generator=g).to(dtype))
    return model.eval()


def tokens(seed=2, b=3):
    return torch.randint(0, VOCAB, (b, T), generator=torch.Generator().manual_seed(seed))


def device_map(model_type, first, second) -> dict:
    """One entry per embedding, layer, final norm, rotary embedding, LM head: the embeddings
    and the even layers on `first`, the odd layers and the final modules on `second` (so the
    final norm and a tied LM head lie apart, as device_map=auto puts them)."""
    before, layers, after = LAYOUT[model_type]
    out = dict.fromkeys(before, first)
    out |= {f"{layers}.{i}": (first, second)[i % 2] for i in range(LAYERS)}
    return out | dict.fromkeys(after, second)


def dispatched(model_type, split, dtype=torch.float32):
    """(model, network) with the model dispatched over `split`, each module where it is mapped
    (`main_device="cpu"`: the CPU entries are no offload), the network adapted and verified."""
    from accelerate import dispatch_model

    model = tiny(model_type, dtype)
    first, second = SPLITS[split]
    dispatch_model(
        model, device_map(model_type, first, second), main_device="cpu", force_hooks=True
    )
    net = adapt(model)
    if not net.dispatched:  # one device: adapt had nothing to place; put the moves in anyway
        place(net, force=True)
        check_equal(net, model)
    return model, net


def devices(net) -> list[torch.device]:
    return [p.device for p in net.parameters()]


def same(got, want, split):
    """Bit for bit on one device; within float32 rounding across CPU and GPU kernels."""
    want = want.to(got.device)
    if split == "cpu":
        assert torch.equal(got, want)
    else:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


CASES = [(m, s) for m in CONFIGS for s in SPLITS]


@needs_accelerate
@pytest.mark.parametrize(("model_type", "split"), CASES)
def test_dispatched_logits_equal_the_undispatched_model(model_type, split):
    model, net = dispatched(model_type, split)
    undispatched = tiny(model_type)
    reference = adapt(undispatched)
    x = tokens().to(devices(net)[0])
    with torch.no_grad():
        got, own = net(x), model(x).logits
        want, own_want = reference(tokens()), undispatched(tokens()).logits
    same(got, want, split)  # the network, dispatched or not
    same(own, own_want, split)  # the model's own forward, through accelerate's hooks or not
    torch.testing.assert_close(got, own, rtol=1e-4, atol=1e-5)  # adapt's float32 tolerance
    if split == "cpu":  # the moves are in, forced: on one device they move nothing
        assert all(b.device is not None for b in net.blocks)
    else:  # the stream stays on the stem's device; the odd layers' blocks run on theirs
        first, second = (torch.device(d) for d in SPLITS[split])
        assert got.device == first
        assert {b.device for b in net.blocks if b.layer_index % 2} == {second}
        assert {b.device for b in net.blocks if not b.layer_index % 2} == {None}


@needs_accelerate
@pytest.mark.parametrize(("model_type", "split"), CASES)
def test_lesion_values_equal_the_undispatched_network(model_type, split):
    _, net = dispatched(model_type, split)
    reference = adapt(tiny(model_type))
    plans = [lesion_plan(None, [i]) for i in (0, 1, 3, 2 * LAYERS - 1)]
    plans.append(lesion_plan(None, order=[0, 2, 1, *range(3, 2 * LAYERS)]))
    batches = [(tokens(seed=s), tokens(seed=s + 10)) for s in (2, 3)]
    where = devices(net)
    for metric in ("loss", "error"):
        base, values = lesion_errors(net, plans, batches, metric=metric)
        naive = lesion_errors(net, plans, batches, metric=metric, reuse=False)
        want = lesion_errors(reference, plans, batches, metric=metric)
        assert (base, values) == naive  # the prefix cache holds activations from every device
        if split == "cpu":
            assert (base, values) == want
        else:
            assert values == pytest.approx(want[1], rel=1e-5, abs=1e-6)
    assert devices(net) == where  # the engine's moves left every block where the map put it


@needs_accelerate
@pytest.mark.parametrize(("model_type", "split"), CASES)
def test_exact_gradient_decomposition_on_a_dispatched_network(model_type, split):
    _, net = dispatched(model_type, split, torch.float64)
    reference = adapt(tiny(model_type, torch.float64))
    x, y = tokens(), tokens(seed=5)
    main = devices(net)[0]
    got = propagate(net.eval(), x.to(main), y.to(main), wrt="stem")
    want = propagate(reference.eval(), x, y, wrt="stem")
    if split == "cpu":
        assert torch.equal(got, want)
    else:
        torch.testing.assert_close(got.cpu(), want, rtol=1e-9, atol=1e-12)


@needs_accelerate
def test_moving_a_dispatched_network_keeps_its_map():
    """`net.to(device)` (Lightning, the engines) leaves each tensor where the map put it; a
    move with a cast is refused in one line (here "meta" is only the other device asked for:
    no value is computed on it)."""
    _, net = dispatched("gpt2", next(reversed(SPLITS)))
    where = devices(net)
    net.to("meta")
    net.to(where[0])
    assert devices(net) == where
    with pytest.raises(ConfigError, match="model.dtype") as err:
        net.to("meta", torch.float64)
    assert "\n" not in str(err.value)
    assert devices(net) == where


@needs_accelerate
@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_hf_causal_lm_takes_a_device_map(model_type, tmp_path):
    """`device_map` for a random-weight config (`dispatch`) and a saved model (`from_pretrained`):
    here all on the CPU, the same logits as without one."""
    config = {"model_type": model_type, **CONFIGS[model_type]}
    torch.manual_seed(0)
    want = hf_causal_lm(config=config)
    want.source.save_pretrained(tmp_path)
    x = tokens()
    with torch.no_grad():
        logits = want.eval()(x)
        for dm in ("auto", device_map(model_type, "cpu", "cpu")):
            torch.manual_seed(0)
            for net in (
                hf_causal_lm(config=config, device_map=dm),
                hf_causal_lm(path=str(tmp_path), device_map=dm),
            ):
                main = devices(net)[0]  # auto, where CUDA is visible: the GPU
                same(net.eval()(x.to(main)), logits, "cpu" if main.type == "cpu" else "gpu")


GPT2 = {"model_type": "gpt2", **CONFIGS["gpt2"]}


@needs_accelerate  # without it, every map is refused for that first
@pytest.mark.parametrize(
    ("device_map", "said"),
    [
        ({"transformer": "cpu", "lm_head": "disk"}, "offloads lm_head to disk: offload is off"),
        ({"transformer": "meta", "lm_head": "cpu"}, "offloads transformer to meta"),
        ({"transformer": 0, "lm_head": "cpu"}, "offloads lm_head to cpu: offload is off"),
        ("balanced", "give auto"),
        ({}, "give auto"),
        ({"transformer": "gpu", "lm_head": "cpu"}, "'gpu' is no device"),
        ({"transformer.wte": "cpu"}, "model.device_map: "),  # leaves modules out
    ],
)
def test_a_bad_device_map_is_refused_in_one_line(device_map, said):
    with pytest.raises(ConfigError, match=said) as err:
        hf_causal_lm(config=GPT2, device_map=device_map)
    assert "\n" not in str(err.value)


def test_a_device_map_without_accelerate_is_refused_in_one_line(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        hf_adapters.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "accelerate" else real(name, *a),
    )
    with pytest.raises(ConfigError, match="pip install accelerate") as err:
        check_device_map("auto")
    assert "\n" not in str(err.value)


def test_training_a_dispatched_model_is_refused_in_one_line():
    cfg = OmegaConf.create(
        {"train": True, "ckpt_path": None, "model": {"device_map": "auto"}, "trainer": {}}
    )
    with pytest.raises(ConfigError, match="analysis only: add train=false") as err:
        validate(cfg)
    assert "\n" not in str(err.value)
    validate(OmegaConf.merge(cfg, {"train": False, "model": {"path": "x"}}))  # analysis: fine


def test_offloaded_parameters_are_refused_in_one_line():
    """A model accelerate offloaded (weights on the meta device, streamed in per call)."""
    model = tiny("gpt2")
    model.transformer.h[1].to("meta")
    with pytest.raises(ConfigError, match="offloaded to cpu or disk") as err:
        adapt(model)
    assert "\n" not in str(err.value)


def test_a_dispatched_vision_model_is_refused_in_one_line():
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.resnet18(num_classes=3)
    model.fc.to("meta")
    with pytest.raises(ConfigError, match="only a Hugging Face causal LM") as err:
        adapt(model)
    assert "\n" not in str(err.value)


def test_the_lm_model_configs_declare_device_map():
    """conf/model/{hf_causal_lm,gpt_neox}.yaml default to one device; the schema (src/schema.py)
    takes auto, a mapping or null from the command line and refuses anything else."""
    from pathlib import Path

    from src import schema

    conf = Path(__file__).resolve().parents[1] / "conf" / "model"
    for name in ("hf_causal_lm", "gpt_neox"):
        assert OmegaConf.load(conf / f"{name}.yaml").device_map is None
    declared = schema.params(hf_causal_lm)[0]["device_map"]
    for ok in ("auto", {"transformer": 0, "lm_head": 1}, None):
        assert schema.mismatch(ok, declared) is None
    assert "one of auto or a mapping or null" in schema.mismatch("balanced", declared)
