"""`lfm2.train`: a short CPU run learns, the result is a `transformers` model that generates,
and a run that is stopped and resumed reproduces the uninterrupted loss curve."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from lfm2 import ArchSpec, build_model
from lfm2.errors import UserError
from lfm2.hf_io import load_hf_folder, save_hf_folder
from lfm2.tokenizer import byte_tokenizer, encode_documents, train_bpe_tokenizer
from lfm2.train import TrainConfig, WindowSampler, load_corpus, lr_factor, read_log, train, training_flops_per_token

#: A small folder of real text that every Python installation has.
CORPUS = str(Path(json.__file__).parent)

TINY = ArchSpec(vocab_size=512, d_model=64, layers=("conv", "attn", "conv"), n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=256)


def quiet(*_):
    pass


def exported(folder: Path, spec: ArchSpec = TINY) -> Path:
    return save_hf_folder(build_model(spec, seed=0), folder)


def small_config(**changes) -> TrainConfig:
    fields = dict(steps=50, corpus=CORPUS, seq_len=32, batch_tokens=256, lr=3e-3, eval_tokens=2048, eval_every=25, checkpoint_every=25, device="cpu", threads=1)
    fields.update(changes)
    return TrainConfig(**fields)


def test_byte_tokenizer_is_the_identity_on_bytes():
    text = "héllo wörld\n\tdef f(x): return x  # ünïcode ✓".encode()
    tokenizer = byte_tokenizer(512)
    assert tokenizer.encode(text.decode()).ids == list(text)
    tokens = encode_documents(tokenizer, [text, b"ab"], "bytes")
    assert tokens.tolist() == [*text, 256, 97, 98, 256]
    assert tokenizer.decode(tokens[: len(text)].tolist()) == text.decode()
    with pytest.raises(UserError, match="at least 257"):
        byte_tokenizer(256)


def test_bpe_tokenizer_fits_the_model_vocabulary():
    corpus = load_corpus(CORPUS)
    tokenizer = train_bpe_tokenizer((d.decode() for d in corpus.documents("train")), 400)
    assert 257 < tokenizer.get_vocab_size() <= 400
    sample = corpus.documents("validation")[0][:500].decode("utf-8", errors="ignore")
    ids = tokenizer.encode(sample).ids
    assert len(ids) < len(sample.encode()) and tokenizer.decode(ids) == sample
    assert max(encode_documents(tokenizer, corpus.documents("validation"), "bpe")) < 400


def test_stdlib_corpus_becomes_documents(tmp_path):
    from lfm2.corpus import FILE_SEPARATOR, Corpus, corpus_by_name

    corpus = load_corpus("stdlib:100000")
    # one Corpus class: training reads the named corpus itself (same bytes, same fingerprint)
    assert isinstance(corpus, Corpus) and corpus is corpus_by_name("stdlib", 100000) and corpus.name == "stdlib[:100000]"
    documents = corpus.documents("train")
    assert len(documents) > 1 and corpus.documents("validation")
    assert not any(FILE_SEPARATOR in doc for doc in documents)  # the file separator became document boundaries
    (tmp_path / "a.txt").write_text("first file\n" * 50)
    (tmp_path / "b.txt").write_text("second file\n" * 50)
    files = load_corpus(str(tmp_path), val_fraction=0.1)
    assert isinstance(files, Corpus) and files.documents("train")[0] == b"first file\n" * 50
    assert b"".join(files.documents("train") + files.documents("validation")) == b"first file\n" * 50 + b"second file\n" * 50
    assert files.fingerprint == load_corpus(str(tmp_path), val_fraction=0.1).fingerprint != load_corpus(str(tmp_path), val_fraction=0.2).fingerprint
    with pytest.raises(UserError, match="stdlib:MAX_BYTES"):
        load_corpus("stdlib:lots")
    bigger = load_corpus("python-sources:100000")
    assert bigger.name == "python-sources[:100000]" and bigger.documents("train")
    with pytest.raises(UserError, match="python-sources"):
        load_corpus("no-such-corpus-or-file")


def test_bpe_run_saves_a_tokenizer_transformers_loads(tmp_path):
    transformers = pytest.importorskip("transformers")
    result = train(exported(tmp_path / "tiny"), tmp_path / "bpe", small_config(steps=3, tokenizer="bpe", eval_every=3), log=quiet)
    tokenizer = transformers.AutoTokenizer.from_pretrained(result.out)
    assert 257 < len(tokenizer) <= TINY.vocab_size and result.summary["tokenizer"] == "bpe"
    text = "def f(x):\n    return x\n"
    assert tokenizer.decode(tokenizer(text).input_ids) == text
    config = json.loads((result.out / "config.json").read_text())
    assert config["eos_token_id"] == tokenizer.eos_token_id == 0


def test_schedule_warms_up_then_decays_to_the_floor():
    factors = [lr_factor(s, 10, 100, 0.1) for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[9:], factors[10:]))
    assert lr_factor(100, 10, 100, 0.1) == pytest.approx(0.1)


def test_flops_per_token_is_six_n_plus_attention():
    n_matmul = TINY.vocab_size * 64 + 3 * 3 * 64 * 128 + 2 * 4 * 64 * 64 + (64 * (4 + 2 * 2) * 16 + 64 * 64)
    # causal attention, counted exactly: a query sees (64 + 1) / 2 keys on average
    expected = 6 * n_matmul + 3 * (2 * 2 * 64 * 3 + 2 * 2 * 4 * 16 * (64 + 1) / 2)
    assert training_flops_per_token(TINY, 64) == pytest.approx(expected)


def test_sampler_position_restores_the_same_batches():
    tokens = np.arange(10_000, dtype=np.uint16)
    a = WindowSampler(tokens, 64, seed=3)
    for _ in range(5):
        a.next_batch(40)  # crosses an epoch boundary (156 windows)
    state = a.state_dict()
    b = WindowSampler(tokens, 64, seed=3)
    b.load_state_dict(state)
    assert torch.equal(a.next_batch(40), b.next_batch(40))


def test_fifty_cpu_steps_lower_the_validation_loss_and_the_result_generates(tmp_path):
    transformers = pytest.importorskip("transformers")
    folder = exported(tmp_path / "tiny")
    result = train(folder, tmp_path / "tiny-trained", small_config(), log=quiet)
    assert result.completed and result.step == 50
    assert result.final_val_loss < result.initial_val_loss - 1.0, (result.initial_val_loss, result.final_val_loss)
    assert result.initial_val_loss == pytest.approx(math.log(512), abs=0.3)  # an untrained model guesses uniformly
    records = read_log(tmp_path / "tiny-trained" / "train" / "log.jsonl")
    assert [r["step"] for r in records if r["kind"] == "train"] == list(range(1, 51))
    assert [r["step"] for r in records if r["kind"] == "val"] == [0, 25, 50]
    assert (tmp_path / "tiny-trained" / "train" / "loss.html").stat().st_size > 1000
    out = result.out
    assert "## Training" in (out / "ARCH.md").read_text()
    # transformers loads the trained folder, agrees with our model, and generates text.
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    ours = load_hf_folder(out).eval()
    prompt = tokenizer("import json\ndef ", return_tensors="pt")
    with torch.no_grad():
        assert (model(**prompt).logits - ours(prompt.input_ids)).abs().max() < 1e-4
        generated = model.generate(**prompt, max_new_tokens=24, do_sample=False)
    assert generated.shape[1] > prompt.input_ids.shape[1]
    text = tokenizer.decode(generated[0], skip_special_tokens=True)
    assert text.startswith("import json\ndef ") and len(text) > len("import json\ndef ")


def test_a_stopped_run_resumes_onto_the_uninterrupted_curve(tmp_path):
    folder = exported(tmp_path / "tiny")
    config = small_config(steps=8, eval_every=3, checkpoint_every=3)
    whole = train(folder, tmp_path / "whole", config, log=quiet)
    stopped = train(folder, tmp_path / "parts", small_config(steps=8, eval_every=3, checkpoint_every=3, stop_after=4), log=quiet)
    assert whole.completed and not stopped.completed and stopped.step == 4
    assert not (tmp_path / "parts" / "model.safetensors").exists()  # only a finished run writes the model
    resumed = train(folder, tmp_path / "parts", config, log=quiet)
    assert resumed.completed and resumed.step == 8

    def curve(run):
        records = read_log(tmp_path / run / "train" / "log.jsonl")
        return [(r["kind"], r["step"], r.get("loss", r.get("val_loss")), r.get("lr")) for r in records]

    a, b = curve("whole"), curve("parts")
    assert [r[:2] for r in a] == [r[:2] for r in b]
    for x, y in zip(a, b):
        assert x[2] == pytest.approx(y[2], rel=1e-5, abs=1e-6), (x, y)
        assert x[3] == y[3]
    for name, tensor in load_hf_folder(tmp_path / "whole").state_dict().items():
        assert torch.allclose(tensor, load_hf_folder(tmp_path / "parts").state_dict()[name], atol=1e-5), name
    # Settings that would change the curve are refused on resume.
    with pytest.raises(UserError, match="--no-resume"):
        train(folder, tmp_path / "parts", small_config(steps=8, seq_len=16), log=quiet)


def test_a_sliding_window_architecture_trains_and_reloads_as_trained(tmp_path):
    """An architecture Hugging Face Lfm2 cannot express (an `swa` layer whose window binds at
    the training length) trains from an lfm2-nas folder; the result is an lfm2-nas folder whose
    model gives exactly the logits of the model the run ended with (its last checkpoint)."""
    from lfm2.hf_io import is_transformers_loadable, load_model_folder, read_provenance, read_spec, save_model_folder

    spec = ArchSpec(vocab_size=512, d_model=64, layers=("swa", "conv", "attn", "swa"), n_heads=4, n_kv_heads=2, ffn_dim=128, swa_window=8, max_seq_len=256)
    folder = save_model_folder(build_model(spec, seed=0), tmp_path / "swa")
    assert not is_transformers_loadable(folder) and read_spec(folder) == spec
    result = train(folder, None, small_config(steps=4, eval_every=4, checkpoint_every=4), log=quiet)
    assert result.completed and result.final_val_loss < result.initial_val_loss
    out = result.out
    assert out == tmp_path / "swa-trained" and not (out / "config.json").exists() and (out / "tokenizer.json").is_file()
    record = read_provenance(out)
    assert record["transformers"]["loadable"] is False and record["spec"] == spec.to_dict() and record["trained"]["steps"] == 4
    assert record["token_ids"]["eos_token_id"] == 256 and "## Training" in (out / "ARCH.md").read_text()

    trained = load_model_folder(out).eval()
    checkpoint = torch.load(out / "train" / "checkpoints" / "step-00000004.pt", map_location="cpu", weights_only=True)
    ended = build_model(spec, device="meta")
    ended.load_state_dict(checkpoint["model"], assign=True)
    ended.lm_head.weight = ended.embed_tokens.weight
    initial = load_model_folder(folder).eval()
    tokens = torch.randint(0, 257, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(trained(tokens), ended.eval()(tokens))
        assert not torch.allclose(trained(tokens), initial(tokens))  # it did train


def test_bad_settings_say_what_to_do(tmp_path):
    folder = exported(tmp_path / "tiny")
    with pytest.raises(UserError, match="--seq-len"):
        train(folder, tmp_path / "a", small_config(seq_len=1024), log=quiet)
    with pytest.raises(UserError, match="--corpus"):
        train(folder, tmp_path / "b", small_config(corpus=str(tmp_path / "missing")), log=quiet)
    with pytest.raises(UserError, match="--out must differ"):
        train(folder, folder, small_config(), log=quiet)
    with pytest.raises(UserError, match="config.json"):
        train(tmp_path, tmp_path / "c", small_config(), log=quiet)
    small = ArchSpec(vocab_size=200, d_model=32, layers=("conv",), n_heads=2, n_kv_heads=1, ffn_dim=64, max_seq_len=128)
    with pytest.raises(UserError, match="at least 257"):
        train(exported(tmp_path / "v200", small), tmp_path / "d", small_config(), log=quiet)
