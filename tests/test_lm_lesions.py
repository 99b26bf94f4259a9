"""Lesion studies of language models (experiment=lm_lesions): the engine's next-token loss under
lesion plans equals fresh forwards, the text data's splits and shift, one-line errors, same-kind
sub-layer swaps, and the CLI on a freshly trained and on a pretrained (save_pretrained) tiny LM.
Tiny random models, nothing downloaded."""

# ruff: noqa: E402
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json
import math

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel

from src.analysis.reorder import compatible_pairs
from src.data import DataUnavailable
from src.data.text import TextDataModule, pydoc_text
from src.engines.lesion import lesion_errors, lesion_plan
from src.errors import ConfigError
from src.lm import LanguageModel
from src.models.hf_adapters import causal_lm_network
from tests.conftest import own_columns, run_cli

VOCAB = 256


def tiny_gpt2(n_layer=3, seed=0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=n_layer, n_embd=16, n_head=2, n_positions=16, vocab_size=VOCAB)
    cfg.bos_token_id = cfg.eos_token_id = 0  # GPT-2's 50256 lies outside a byte vocabulary
    return GPT2LMHeadModel(cfg).eval()


def token_batches(n=3, batch=4, length=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, VOCAB, (batch, length + 1), generator=g)
        out.append((ids[:, :-1], ids[:, 1:]))
    return out


def test_engine_lm_loss_with_prefix_reuse_equals_fresh_forwards():
    net = causal_lm_network(tiny_gpt2()).eval()  # the engine restores this mode
    plans = [lesion_plan(None, deleted=[i]) for i in range(net.n_blocks)]
    plans += [lesion_plan(None, deleted=[1, 4]), lesion_plan(None, order=[0, 3, 2, 1, 4, 5])]
    data = token_batches()
    base, reused = lesion_errors(net, plans, data, metric="loss", reuse=True)
    base_fresh, fresh = lesion_errors(net, plans, data, metric="loss", reuse=False)
    assert base == pytest.approx(base_fresh, rel=1e-6, abs=1e-6)
    assert reused == pytest.approx(fresh, rel=1e-6, abs=1e-6)
    # the loss is the mean next-token cross-entropy over every target of every batch
    x = torch.cat([x for x, _ in data])
    y = torch.cat([y for _, y in data])
    with torch.no_grad():
        logits = net(x, plans[2])
    expected = F.cross_entropy(logits.reshape(-1, VOCAB), y.reshape(-1)).item()
    assert reused[2] == pytest.approx(expected, rel=1e-5)
    assert len(set(round(v, 6) for v in reused)) > 1  # lesions change the loss


def test_engine_error_metric_is_the_default_and_next_token_error_for_lms():
    net = causal_lm_network(tiny_gpt2()).eval()
    data = token_batches(n=1)
    plans = [lesion_plan(None, deleted=[0])]
    assert lesion_errors(net, plans, data) == lesion_errors(net, plans, data, metric="error")
    x, y = data[0]
    with torch.no_grad():
        wrong = (net(x).argmax(-1) != y).double().mean().item()
    assert lesion_errors(net, plans, data)[0] == pytest.approx(wrong)
    with pytest.raises(ConfigError, match="metric='top5'"):
        lesion_errors(net, plans, data, metric="top5")


def test_text_splits_are_contiguous_and_y_is_x_shifted(tmp_path):
    text = "".join(chr(ord("a") + i % 26) for i in range(1000))
    f = tmp_path / "t.txt"
    f.write_text(text)
    dm = TextDataModule(text_file=str(f), seq_len=10, val_fraction=0.1, test_fraction=0.2)
    dm.setup()
    assert dm.num_classes == 256 and dm.channels == 1
    ids = torch.tensor(list(text.encode()))
    starts = {"train": 0, "val": 700, "test": 800}  # train | val | test, in text order
    for split, start in starts.items():
        x, y = dm.splits[split].tensors
        assert x.shape[1] == 10 and torch.equal(x[:, 1:], y[:, :-1])
        assert torch.equal(x.reshape(-1)[:50], ids[start : start + 50])
        assert torch.equal(y.reshape(-1)[:50], ids[start + 1 : start + 51])
    assert len(dm.splits["train"]) == 69 and len(dm.splits["test"]) == 19
    x, y = next(iter(dm.test_dataloader()))
    assert x.dtype == torch.long and x.shape == (19, 10)
    small = TextDataModule(text_file=str(f), seq_len=10, test_fraction=0.2, test_size=3)
    small.setup()
    assert len(small.splits["test"]) == 3


def test_default_text_is_pydoc_and_deterministic():
    text = pydoc_text()
    assert len(text) > 300_000 and "for" in text
    a, b = TextDataModule(seq_len=64), TextDataModule(seq_len=64)
    a.setup()
    b.setup()
    assert torch.equal(a.splits["test"].tensors[0], b.splits["test"].tensors[0])


def test_text_data_one_line_errors(tmp_path):
    with pytest.raises(DataUnavailable, match="no such file"):
        TextDataModule(text_file=str(tmp_path / "missing.txt"))
    with pytest.raises(ConfigError, match="seq_len"):
        TextDataModule(seq_len=0)
    with pytest.raises(ConfigError, match="holds nothing AutoTokenizer can read"):
        TextDataModule(tokenizer=str(tmp_path))
    short = tmp_path / "short.txt"
    short.write_text("tiny")
    with pytest.raises(ConfigError, match="leaves no"):
        TextDataModule(text_file=str(short), seq_len=64).setup()


def test_language_model_refuses_a_vocabulary_smaller_than_the_data():
    net = causal_lm_network(tiny_gpt2())
    with pytest.raises(ConfigError, match="vocabulary"):
        LanguageModel(net, num_classes=1000)
    assert LanguageModel(net, num_classes=VOCAB).metric == "loss"


def test_reorder_swaps_sublayers_of_one_kind_across_layers():
    net = causal_lm_network(tiny_gpt2(n_layer=4))
    kinds = {b["block"]: b["kind"] for b in net.block_info()}
    pairs = compatible_pairs(net)
    assert len(pairs) == 2 * 6  # C(4, 2) attention pairs + C(4, 2) MLP pairs
    assert all(kinds[a] == kinds[b] for a, b in pairs)
    assert len(compatible_pairs(net, same_kind=False)) == 28  # C(8, 2)


def read(run_dir, study):
    return pd.read_csv(run_dir / "analysis" / f"{study}.csv")


QUICK = [
    "experiment=lm_lesions",
    "preset=quick",
    "logger=csv",
    "callbacks.progress_bar=null",
    "callbacks.delete_many.ks=[0,2,4]",
    "callbacks.delete_many.trials=2",
    "callbacks.reorder.swaps=[0,1,4]",
    "callbacks.reorder.trials=2",
    "data.test_size=8",
]


@pytest.mark.slow
def test_lm_lesions_cli_trains_and_measures_loss(tmp_path):
    """experiment=lm_lesions preset=quick, shortened: tables in loss with perplexity."""
    out = tmp_path / "run"
    run_cli(*QUICK, "trainer.max_steps=30", "lm_size.layers=8", f"hydra.run.dir={out}")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["data"] == "text" and metrics["n_blocks"] == 16
    assert metrics["test_perplexity"] == pytest.approx(math.exp(metrics["test_loss"]), rel=1e-4)
    single = read(out, "delete_single")
    assert own_columns(single.iloc[0].to_dict())[-6:] == [
        "kind",
        "loss",
        "perplexity",
        "baseline",
        "baseline_perplexity",
        "bn",
    ]
    assert set(single.metric) == {"loss"} and set(single.kind) == {"attn", "mlp"}
    assert len(single) == 16 and (single.layer == single.block // 2).all()
    assert single.baseline.iloc[0] == pytest.approx(metrics["test_loss"], rel=1e-4)
    assert (single.perplexity == single.loss.map(math.exp)).all()
    many, reorder = read(out, "delete_many"), read(out, "reorder")
    assert set(many.metric) == set(reorder.metric) == {"loss"}
    unlesioned = many[many.k == 0]
    assert (unlesioned.loss == unlesioned.baseline).all()
    summary = json.loads((out / "analysis" / "summary.json").read_text())
    assert summary["baseline_perplexity"] == pytest.approx(math.exp(summary["baseline_loss"]))
    assert set(summary["delete_single"]["mean_loss_by_kind"]) == {"attn", "mlp"}
    for study in ("delete_single", "delete_many", "reorder"):
        assert (out / "analysis" / f"{study}.png").stat().st_size > 0


@pytest.mark.slow
def test_lm_lesions_on_a_pretrained_model_directory(tmp_path):
    """train=false model.path=<save_pretrained dir> data.text_file=<file>: no checkpoint needed."""
    model_dir = tmp_path / "gpt2"
    tiny_gpt2(n_layer=3).save_pretrained(model_dir)
    text = tmp_path / "text.txt"
    text.write_text(pydoc_text()[:20_000])
    out = tmp_path / "run"
    run_cli(
        *QUICK,
        "train=false",
        f"model.path={model_dir}",  # the config's random-weights default is then ignored
        f"data.text_file={text}",
        "data.seq_len=16",
        f"hydra.run.dir={out}",
    )
    single = read(out, "delete_single")
    assert len(single) == 6 and set(single.metric) == {"loss"}
    # a random model: the loss is near log(256) per byte
    assert single.baseline.iloc[0] == pytest.approx(math.log(VOCAB), rel=0.1)
    res = run_cli(*QUICK, f"data.text_file={tmp_path / 'no.txt'}", check=False)
    assert res.returncode != 0 and "no such file" in res.stderr
    assert res.stderr.strip().count("\n") == 0


def test_text_data_with_a_local_tokenizer(tmp_path):
    """data.tokenizer=<dir>: a pretrained model's own tokenizer (here a small BPE fitted and saved
    with save_pretrained), its vocabulary as num_classes."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    text = pydoc_text()[:50_000]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>"]))
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(tmp_path / "tok")
    f = tmp_path / "t.txt"
    f.write_text(text)
    dm = TextDataModule(text_file=str(f), seq_len=32, tokenizer=str(tmp_path / "tok"))
    dm.setup()
    x, y = dm.splits["train"].tensors
    assert dm.num_classes == 300 and int(x.max()) < 300
    assert x.numel() < len(text.encode()) / 2  # BPE tokens, not bytes
    assert torch.equal(x[:, 1:], y[:, :-1])
