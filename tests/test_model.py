"""model.py and sampler.py against transformers (the reference implementation) on tiny random checkpoints."""
import copy
import json
import math
import os
from array import array

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import checkpoint
import decode_model
import head
import model as M
import sampler
import toy
from conftest import make_hf_checkpoint
from sampler import Sampler, generate, slots_that_fit

KINDS = ["qwen2-tied", "qwen2-untied-sharded", "qwen3"]


@pytest.fixture(scope="module", params=KINDS)
def ckpt(request, tmp_path_factory):
    path = str(tmp_path_factory.mktemp(request.param))
    hf = make_hf_checkpoint(path, request.param)
    return path, hf, request.param


def ragged_batch(lengths, vocab=128, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def right_pad(prompts, pad=0):
    T = max(map(len, prompts))
    return torch.tensor([p + [pad] * (T - len(p)) for p in prompts])


def test_sharded_fixture_really_is_sharded(tmp_path):
    make_hf_checkpoint(str(tmp_path), "qwen2-untied-sharded")
    assert os.path.exists(tmp_path / "model.safetensors.index.json")
    assert len([f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]) > 1


def test_logits_match_transformers_fp32(ckpt):
    path, hf, kind = ckpt
    m = checkpoint.load_model(path)
    assert m.config.tie_word_embeddings == (kind == "qwen2-tied")
    ids = torch.randint(0, 128, (3, 21))
    with torch.no_grad():
        torch.testing.assert_close(m(ids), hf(ids).logits, atol=1e-4, rtol=0)
        torch.testing.assert_close(m(ids, head=False), hf.model(ids).last_hidden_state, atol=1e-4, rtol=0)


def test_ragged_padded_batch_matches_transformers(ckpt):
    # right padding needs no mask: causal attention keeps every real token from seeing the pads after it
    path, hf, _ = ckpt
    m = checkpoint.load_model(path)
    prompts = ragged_batch([5, 13, 9])
    with torch.no_grad():
        ours = m(right_pad(prompts))
        for i, p in enumerate(prompts):  # compare real tokens only
            torch.testing.assert_close(ours[i, :len(p)], hf(torch.tensor([p])).logits[0], atol=1e-4, rtol=0)


def test_logits_match_transformers_bf16(tmp_path):
    hf = make_hf_checkpoint(str(tmp_path), "qwen2-untied", dtype=torch.bfloat16)
    m = checkpoint.load_model(str(tmp_path))
    assert m.lm_head.weight.dtype == torch.bfloat16  # dtype=None keeps the checkpoint's dtype
    ids = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        a, b = m(ids), hf(ids).logits.float()
    assert a.dtype == torch.float32  # straight from the matmul (head_logits); transformers rounds its to bf16
    assert (a - b).abs().max() < 0.05 * b.abs().max()
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.9


def test_head_logits_are_fp32_from_the_matmul_not_rounded_to_bf16():
    # bf16 hidden states and weights: the logits are the exact products summed in fp32 (what CUDA's mm with out_dtype
    # gives), never rounded to bf16; rounding them (the old path) loses 2^-9 of each logit, here many times more error
    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(64, 96, generator=g).bfloat16(), torch.randn(500, 96, generator=g).bfloat16()
    exact = h.double() @ w.double().t()
    logits = head.head_logits(h, w)
    assert logits.dtype == torch.float32
    err, rounded_err = (logits.double() - exact).abs().max(), ((h @ w.t()).double() - exact).abs().max()
    assert err < 1e-4 and rounded_err > 20 * err
    lp = lambda x: torch.log_softmax(x.double(), -1)
    assert (lp(logits) - lp(exact)).abs().max() * 20 < (lp(h @ w.t()) - lp(exact)).abs().max()
    with torch.no_grad():  # and the model's own logits, through it
        m = M.Transformer(M.ModelConfig(vocab_size=500, hidden_size=96, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=2)).bfloat16()
        ids = torch.randint(0, 500, (2, 5), generator=g)
        hidden = m(ids, head=False)
        torch.testing.assert_close(m(ids), head.head_logits(hidden.flatten(0, 1), m.lm_head.weight).view(2, 5, 500))


def test_load_into_other_dtype(tmp_path):
    make_hf_checkpoint(str(tmp_path), "qwen2-tied")
    m = checkpoint.load_model(str(tmp_path), dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in m.parameters())
    assert m.lm_head.weight is m.model.embed_tokens.weight


def test_rope_parameters_spelling(tmp_path):
    make_hf_checkpoint(str(tmp_path), "qwen2-tied")
    cfg = json.load(open(tmp_path / "config.json"))
    theta = cfg.pop("rope_theta", None) or cfg["rope_parameters"]["rope_theta"]
    cfg["rope_parameters"] = {"rope_theta": theta, "rope_type": "default"}
    assert M.ModelConfig.from_hf(cfg).rope_theta == theta
    cfg2 = {k: v for k, v in cfg.items() if k != "rope_parameters"}
    cfg2["rope_theta"] = 12345.0
    assert M.ModelConfig.from_hf(cfg2).rope_theta == 12345.0


def test_real_configs_parse():
    from conftest import DATA, need_shared
    need_shared()
    expected = {"Qwen2.5-0.5B-Instruct": (1e6, 64), "Qwen2.5-1.5B-Instruct": (1e6, 128), "Qwen2.5-7B": (1e6, 128),
                "DeepSeek-R1-Distill-Qwen-7B": (1e4, 128)}  # (RoPE base, head_dim), read from the files by hand
    for name, (theta, head_dim) in expected.items():
        cfg = M.ModelConfig.from_hf(json.load(open(os.path.join(DATA, "configs", f"{name}.config.json"))))
        assert (cfg.rope_theta, cfg.head_dim) == (theta, head_dim), name
    assert M.ModelConfig.from_hf(json.load(open(os.path.join(DATA, "configs", "Qwen2.5-1.5B-Instruct.config.json")))).rope_theta == 1e6


@pytest.mark.parametrize("kind", ["qwen2-tied", "qwen2-untied", "qwen3"])
def test_save_model_loads_in_transformers_and_round_trips(tmp_path, kind):
    import transformers
    make_hf_checkpoint(str(tmp_path / "src"), kind)
    m = checkpoint.load_model(str(tmp_path / "src"))
    checkpoint.save_model(m, str(tmp_path / "out"))
    if kind == "qwen2-tied":
        assert "lm_head.weight" not in load_file(str(tmp_path / "out" / "model.safetensors"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
    ids = torch.randint(0, 128, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, m(ids), atol=1e-4, rtol=0)
    m2 = checkpoint.load_model(str(tmp_path / "out"))
    for (n1, p1), (n2, p2) in zip(m.state_dict().items(), m2.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)


def test_save_model_shards_with_index(tmp_path):
    import transformers
    make_hf_checkpoint(str(tmp_path / "src"), "qwen2-untied")
    m = checkpoint.load_model(str(tmp_path / "src"))
    checkpoint.save_model(m, str(tmp_path / "out"), max_shard_bytes=40_000)
    index = json.load(open(tmp_path / "out" / "model.safetensors.index.json"))
    assert len(set(index["weight_map"].values())) > 1
    assert set(index["weight_map"]) == set(m.state_dict())
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
    ids = torch.randint(0, 128, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, m(ids), atol=1e-4, rtol=0)
    m2 = checkpoint.load_model(str(tmp_path / "out"))
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), m2.state_dict().values()))


def _rewrite(path, fn):
    f = os.path.join(path, "model.safetensors")
    sd = load_file(f)
    fn(sd)
    save_file(sd, f)


def test_bad_checkpoints_raise_clear_errors(tmp_path):
    make_hf_checkpoint(str(tmp_path), "qwen2-untied")
    _rewrite(str(tmp_path), lambda sd: sd.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match="missing tensors: model.layers.1.mlp.up_proj.weight"):
        checkpoint.load_model(str(tmp_path))
    make_hf_checkpoint(str(tmp_path), "qwen2-untied")
    _rewrite(str(tmp_path), lambda sd: sd.__setitem__("model.layers.0.self_attn.q_proj.weight", torch.zeros(3, 3)))
    with pytest.raises(ValueError, match=r"q_proj.weight.*shape \(3, 3\)"):
        checkpoint.load_model(str(tmp_path))
    make_hf_checkpoint(str(tmp_path), "qwen2-untied")
    _rewrite(str(tmp_path), lambda sd: sd.__setitem__("model.extra.weight", torch.zeros(3)))
    with pytest.raises(ValueError, match="unexpected tensor 'model.extra.weight'"):
        checkpoint.load_model(str(tmp_path))
    cfg = json.load(open(tmp_path / "config.json"))
    for patch, msg in [({"model_type": "llama"}, "model_type 'llama' is not supported"),
                       ({"use_sliding_window": True}, "sliding-window"),
                       ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "'yarn' is not implemented"),
                       # a field of the wrong type, named with the file (before: loaded, or an error naming no file)
                       ({"num_hidden_layers": 0}, "field 'num_hidden_layers' must be a positive integer, got 0"),
                       ({"num_key_value_heads": 0}, "field 'num_key_value_heads' must be a positive integer, got 0"),
                       ({"num_key_value_heads": 3}, "num_attention_heads 4 is not a multiple of num_key_value_heads 3"),
                       ({"rms_norm_eps": "1e-6"}, "field 'rms_norm_eps' must be a positive number, got '1e-6'"),
                       ({"rope_parameters": {"rope_theta": "x"}}, "field 'rope_theta' must be a positive number"),
                       ({"tie_word_embeddings": "false"}, "field 'tie_word_embeddings' must be true or false"),
                       ({"max_position_embeddings": "32k"}, "field 'max_position_embeddings' must be a positive integer"),
                       ({"eos_token_id": "<|im_end|>"}, "field 'eos_token_id' must be a token id or a list of them"),
                       ({"torch_dtype": "bfloat61"}, "field 'torch_dtype' must be float32, bfloat16 or float16, got 'bfloat61'"),
                       ({"torch_dtype": None, "dtype": "int8"}, "field 'torch_dtype' must be float32, bfloat16 or float16")]:
        json.dump({**cfg, **patch}, open(tmp_path / "config.json", "w"))
        with pytest.raises(ValueError, match=f"config.json: {msg}" if "field" in msg or "multiple" in msg else msg):
            checkpoint.load_model(str(tmp_path))
    json.dump({**cfg, "rope_parameters": {"rope_theta": 10000}, "eos_token_id": [1, 2]}, open(tmp_path / "config.json", "w"))
    assert checkpoint.load_config(str(tmp_path)).rope_theta == 10000.0  # an integer base is a number too
    # fields a config may leave out read as transformers reads them: untied (this checkpoint's head is its own), and as
    # many KV heads as query heads
    json.dump({k: v for k, v in cfg.items() if k not in ("tie_word_embeddings", "num_key_value_heads")}, open(tmp_path / "config.json", "w"))
    loaded = checkpoint.load_config(str(tmp_path))
    assert (loaded.tie_word_embeddings, loaded.num_key_value_heads) == (False, cfg["num_attention_heads"])
    os.remove(tmp_path / "model.safetensors")
    json.dump(cfg, open(tmp_path / "config.json", "w"))
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        checkpoint.load_model(str(tmp_path))


# ----------------------------------------------------------------------------- sampler

def test_greedy_generate_matches_transformers(ckpt):
    path, hf, _ = ckpt
    m = checkpoint.load_model(path)
    for p in ragged_batch([4, 11, 7], seed=3):
        ours = generate(m, [p], max_new_tokens=12, temperature=0)[0]
        ref = hf.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False)[0, len(p):].tolist()
        assert len(ref) == 12
        assert ours == ref


def test_cached_decoding_equals_recompute(ckpt):
    path, _, _ = ckpt
    m = checkpoint.load_model(path)
    p = ragged_batch([6], seed=4)[0]
    out = generate(m, [p], max_new_tokens=10, temperature=0)[0]
    seq = list(p)
    with torch.no_grad():
        for _ in range(10):
            seq.append(int(m(torch.tensor([seq]))[0, -1].argmax()))
    assert out == seq[len(p):]


@pytest.mark.parametrize("temperature", [0, 1.0, 0.7])
def test_sampler_logprobs_are_the_full_forwards(ckpt, temperature):
    # each generated token's log-prob as the sampler reports it (its cached decode, fp32 here) equals log softmax of
    # a full forward over [prompt, output] at that token, tempered: what GRPO compares with the trainer's. Ids past the
    # tokenizer's vocabulary (100 of the embedding's 128 here) are never drawn but stay in the normaliser, as there
    path, _, _ = ckpt
    m = checkpoint.load_model(path)
    prompts = ragged_batch([5, 9], seed=6)
    outs, logps = Sampler(m, slots=4, max_len=32).generate(prompts, 10, temperature, n=2, seed=3, logprobs=True,
                                                           vocab_size=100)
    assert max(max(o) for o in outs) < 100
    for i, (o, lp) in enumerate(zip(outs, logps)):
        p = prompts[i // 2]
        with torch.no_grad():
            logits = m(torch.tensor([p + o]))[0, len(p) - 1:-1] / (temperature or 1)
        ref = torch.log_softmax(logits, -1).gather(1, torch.tensor(o)[:, None]).squeeze(1)
        assert len(lp) == len(o)
        torch.testing.assert_close(torch.tensor(lp), ref, atol=1e-5, rtol=0)


def test_fused_projections_decode_as_the_model_does(ckpt, monkeypatch):
    # the rollout copy on GPUs (forced here on CPU): q/k/v and gate/up as one GEMM each, filled by copy_weights from
    # the plain model's names; the same logits to fp32 rounding, and the same greedy and sampled generations
    path, _, _ = ckpt
    monkeypatch.setattr(decode_model, "FUSED_PROJECTION_DEVICES", ("cpu",))
    m = checkpoint.load_model(path)
    engine = Sampler.for_policy(m, torch.device("cpu"), slots=4, max_len=40)
    engine.load_weights(m)
    names = {n for n, _ in engine.model.named_parameters()}
    assert "model.layers.0.self_attn.qkv_proj.weight" in names and "model.layers.0.mlp.gate_up_proj.weight" in names
    assert not any(n.endswith(("q_proj.weight", "gate_proj.weight")) for n in names)
    ids = torch.tensor(ragged_batch([9, 9], seed=2))
    with torch.no_grad():
        torch.testing.assert_close(engine.model(ids), m(ids), atol=1e-5, rtol=1e-5)
    prompts = ragged_batch([5, 11, 3], seed=7)
    assert engine.generate(prompts, 10, temperature=0) == generate(m, prompts, 10, temperature=0)
    assert engine.generate(prompts, 10, n=2, seed=5) == generate(m, prompts, 10, n=2, seed=5)
    compiled = Sampler(engine.model, slots=4, max_len=40, compile=True, backend="eager")  # traced as the GPU's step is
    assert compiled.generate(prompts, 10, temperature=0) == generate(m, prompts, 10, temperature=0)
    loaded = decode_model.fuse_projections(checkpoint.load_model(path))  # a loaded judge (eval.py) keeps its weights when fused
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), m(ids), atol=1e-5, rtol=1e-5)


def test_ragged_batch_equals_one_by_one(ckpt):
    path, _, _ = ckpt
    m = checkpoint.load_model(path)
    prompts = ragged_batch([3, 15, 8, 1], seed=5)
    batched = generate(m, prompts, max_new_tokens=9, temperature=0)
    assert batched == [generate(m, [p], max_new_tokens=9, temperature=0)[0] for p in prompts]


def test_stop_ids_and_compaction_keep_rows_right(tmp_path):
    make_hf_checkpoint(str(tmp_path), "qwen2-untied")
    m = checkpoint.load_model(str(tmp_path))
    prompts = ragged_batch([3, 9, 5, 7, 2, 6], seed=6)
    free = [generate(m, [p], max_new_tokens=12, temperature=0)[0] for p in prompts]
    stop = {free[0][2], free[3][4]}  # make some rows stop early so the batch compacts mid-run
    outs = generate(m, prompts, max_new_tokens=12, temperature=0, stop_ids=stop)
    for f, o in zip(free, outs):
        cut = next((i + 1 for i, t in enumerate(f) if t in stop), len(f))
        assert o == f[:cut]
    assert any(len(o) < 12 for o in outs)


def test_n_samples_share_prefill_and_follow_seed(tmp_path, monkeypatch):
    make_hf_checkpoint(str(tmp_path), "qwen2-untied")
    m = checkpoint.load_model(str(tmp_path))
    prompts = ragged_batch([5, 8], seed=7)
    calls = []
    orig = M.Transformer.forward
    monkeypatch.setattr(M.Transformer, "forward", lambda self, ids, *a, **k: calls.append(ids.shape) or orig(self, ids, *a, **k))
    a = generate(m, prompts, max_new_tokens=6, n=4, seed=11)
    assert calls[0] == (2, 8)  # one prefill of the 2 prompts, not 8
    assert all(s[1] == 1 for s in calls[1:])  # then one token per step
    assert len(a) == 8
    assert a == generate(m, prompts, max_new_tokens=6, n=4, seed=11)
    assert a != generate(m, prompts, max_new_tokens=6, n=4, seed=12)
    assert len({tuple(x) for x in a[:4]}) > 1  # samples of one prompt differ
    # group identity: outputs are prompt-major, sample j of prompt i at i * n + j
    g = generate(m, prompts, max_new_tokens=6, n=3, temperature=0)
    assert g[0] == g[1] == g[2] == generate(m, prompts[:1], 6, temperature=0)[0]
    assert g[3] == g[4] == g[5] == generate(m, prompts[1:], 6, temperature=0)[0]


def test_continuous_batching_equals_one_by_one(tmp_path):
    # 7 ragged prompts x n=2 through 5 slots: prompts wait, finished rows free slots for the next prompt,
    # slots are packed at the end; greedy outputs equal one-by-one generation token for token, stop ids kept
    make_hf_checkpoint(str(tmp_path), "qwen2-untied")
    m = checkpoint.load_model(str(tmp_path))
    prompts = ragged_batch([3, 12, 5, 1, 9, 7, 4], seed=9)
    free = [generate(m, [p], max_new_tokens=14, temperature=0)[0] for p in prompts]
    stop = {free[0][3], free[4][6], free[5][1]}
    alone = [generate(m, [p], max_new_tokens=14, temperature=0, stop_ids=stop)[0] for p in prompts]
    assert len({len(o) for o in alone}) > 2 and any(o[-1] in stop for o in alone)  # ragged outputs
    for continuous in (True, False):
        engine = Sampler(m, slots=5, max_len=26)
        outs = engine.generate(prompts, 14, temperature=0, n=2, stop_ids=stop, continuous=continuous)
        assert outs == [o for o in alone for _ in range(2)]
    reported = []  # on_finish: each output once, final when handed over, and then not kept
    kept = engine.generate(prompts, 14, temperature=0, n=2, stop_ids=stop, on_finish=lambda idx, o: reported.append(
        [(i, o[i]) for i in idx]))
    assert sorted(x for at in reported for x in at) == list(enumerate(outs)) and len(reported) > 2 and kept == [None] * 14
    assert engine.generate(prompts[:2], 3, temperature=0) == [o[:3] for o in free[:2]]  # the engine is reused


def test_sampled_output_does_not_depend_on_batching(tmp_path):
    # the random draw is keyed by (seed, sequence, token), so slots, admission order and sequence ids decide nothing
    make_hf_checkpoint(str(tmp_path), "qwen2-untied")
    m = checkpoint.load_model(str(tmp_path))
    prompts = ragged_batch([4, 10, 6, 2], seed=10)
    wide = Sampler(m, slots=12, max_len=30).generate(prompts, 12, n=3, seed=5)
    narrow = Sampler(m, slots=3, max_len=30).generate(prompts, 12, n=3, seed=5)
    assert wide == narrow and len({tuple(o) for o in wide}) > 6
    # a rank that holds prompts 1 and 3 of a rollout draws what one process draws for them
    part = Sampler(m, slots=6, max_len=30).generate([prompts[1], prompts[3]], 12, n=3, seed=5, prompt_ids=[1, 3])
    assert part == wide[3:6] + wide[9:12]
    assert wide != Sampler(m, slots=12, max_len=30).generate(prompts, 12, n=3, seed=6)


def test_prefill_in_bounded_chunks_and_cache_size(tmp_path, monkeypatch):
    # prefill_tokens bounds the padded prompt tokens of one prefill forward: the prompts are then prefilled in
    # several forwards, with the same K/V and first tokens, so the samples are those of one big prefill
    make_hf_checkpoint(str(tmp_path), "qwen2-untied")
    m = checkpoint.load_model(str(tmp_path))
    prompts = ragged_batch([4, 10, 6, 2, 9], seed=11)
    whole = Sampler(m, slots=15, max_len=30).generate(prompts, 10, n=3, seed=5)
    calls = []
    orig = M.Transformer.forward
    monkeypatch.setattr(M.Transformer, "forward", lambda self, ids, *a, **k: calls.append(ids.shape) or orig(self, ids, *a, **k))
    chunked = Sampler(m, slots=15, max_len=30, prefill_tokens=20)
    assert chunked.generate(prompts, 10, n=3, seed=5) == whole
    assert calls[:3] == [(2, 10), (2, 10), (1, 10)]  # 5 prompts padded to 10 tokens, at most 20 tokens a forward
    # the arithmetic a GPU engine sizes its slots with is the cache it allocates
    attn = m.model.layers[0].self_attn
    allocated = sum(layer.self_attn.k_cache.nbytes + layer.self_attn.v_cache.nbytes for layer in m.model.layers)
    fit = lambda budget, group=1: slots_that_fit(budget, m.config, 30, attn.k_cache.dtype, group)
    assert fit(allocated) == 15 and fit(allocated - 1) == 14
    # under a memory cap, whole groups of slots (GRPO's n samples of a prompt are admitted together)
    assert [fit(allocated * 30.5 / 15, g) for g in (1, 7, 31)] == [30, 28, 0]


def test_compiles_are_bounded_and_not_per_layer():
    # the GPU failure modes, caught on CPU with the eager backend: the decode step is one full graph per
    # (bucket, span of the cache, greedy or sampled) whatever the calls, prompt lengths and batch sizes; the compiled blocks
    # are not recompiled per layer (4 layers here) nor per sequence length (dynamic from the first call)
    import grpo
    import sft
    from torch._dynamo.utils import counters
    cfg = M.ModelConfig(model_type="qwen2", vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0, tie_word_embeddings=False,
                        max_position_embeddings=256, torch_dtype="float32")
    m = toy.init_weights(M.Transformer(cfg), seed=0)
    torch._dynamo.reset()
    counters.clear()
    engine, plain = Sampler(m, slots=40, max_len=64, compile=True, backend="eager"), Sampler(m, slots=40, max_len=64)
    assert engine.buckets() == [40, 10]
    g = torch.Generator().manual_seed(0)
    for call, temperature in enumerate((1.0, 0.0, 1.0, 0.0)):
        prompts = [torch.randint(1, 97, (int(L),), generator=g).tolist() for L in torch.randint(1, 20, (30 + 3 * call,), generator=g)]
        out = engine.generate(prompts, 16, temperature=temperature, stop_ids=[5, 7], seed=call)
        # buckets of slots and spans of the cache change nothing: the eager engine runs exact sizes
        assert out == plain.generate(prompts, 16, temperature=temperature, stop_ids=[5, 7], seed=call)
    assert counters["stats"]["unique_graphs"] <= 2 * len(engine.buckets()) * len(engine.kv_spans)
    counters.clear()
    torch._dynamo.reset()
    M.compile_blocks(m, backend="eager")
    for P, R in [(5, 7), (9, 3), (12, 11), (3, 4), (8, 8)]:
        prompts = [torch.randint(1, 97, (P,), generator=g).tolist() for _ in range(2)]
        responses = [torch.randint(1, 97, (R,), generator=g).tolist() for _ in range(6)]
        grpo.response_logprobs(m, prompts, responses, 3, 0, "cpu", 1.0)[0].sum().backward()  # GRPO's packed group
        traces = [(torch.randint(1, 97, (n,), generator=g).tolist(), [1] * n) for n in (P + R, P, R, 2)]
        for rows in sft.micro_batches(traces, 2 * (P + R)) + [[[traces[0]], [traces[2]]]]:  # SFT: packed, then plain rows
            ids, positions, targets, weights, packed = sft.pack_batch(rows, 0, "cpu", torch.float32)
            m(ids, positions, targets=targets, loss_weights=weights, packed=packed).backward()
    assert counters["stats"]["unique_graphs"] <= 2  # a graph per layout (packed, plain causal) for all 4 layers


def test_decode_step_compiles_one_block_for_all_layers():
    # compile time: the decode step traces one block and reuses it for every layer (model.Block.decode), so
    # what Dynamo captures grows by a call or two per layer, not by a block's ~70 ops (unrolled: 39 s per
    # decode shape for 24 layers on an H100)
    from torch._dynamo.utils import counters
    captured, graphs = {}, {}
    for layers in (2, 6):
        cfg = M.ModelConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                            num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0)
        m = toy.init_weights(M.Transformer(cfg), seed=0)
        torch._dynamo.reset()
        counters.clear()
        out = Sampler(m, slots=8, max_len=32, compile=True, backend="eager").generate([[1, 2, 3], [4, 5]], 6, temperature=0)
        assert out == generate(m, [[1, 2, 3], [4, 5]], 6, temperature=0)
        graphs[layers], captured[layers] = counters["stats"]["unique_graphs"], counters["stats"]["calls_captured"]
    assert graphs[2] == graphs[6] <= 4  # a graph per span of the cache the step attends to
    assert captured[6] - captured[2] <= 4 * 3 * graphs[2], captured


@pytest.mark.slow
def test_checkpointing_inside_compiled_blocks(tmp_path):
    # activation checkpointing is applied inside each block, so a compiled block recomputes within its own backward
    # graph (no second trip through Python per block: on this CPU, 28 tiny blocks under FSDP2 spent 3.2 ms each in
    # host time with the checkpoint outside, 2.2 ms inside); autograd keeps about one hidden state per recomputing
    # block, the first recompute_blocks blocks recompute, and the gradients are unchanged. Compiled by Inductor's
    # front end (its decompositions and its partitioner, which decides what the backward recomputes and what the
    # forward keeps) without its code generation (which made this test 66 s instead of 24 s on a 2-core CPU): Inductor's
    # kernels with checkpointing inside run in test_grpo.py's single-GPU path
    backend = "aot_eager_decomp_partition"
    cfg = M.ModelConfig(vocab_size=97, hidden_size=64, intermediate_size=352, num_hidden_layers=4, num_attention_heads=4,
                        num_key_value_heads=2, rope_theta=10000.0)
    ids = torch.randint(0, 97, (2, 64))
    L, H, I, tokens = cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size, ids.numel()

    def run(compiled, recompute):  # -> bytes of the storages autograd keeps (weights aside), gradients
        m = toy.init_weights(M.Transformer(cfg), seed=0)
        if compiled:
            torch._dynamo.reset()
            M.compile_blocks(m, backend)
        m.recompute_blocks = recompute
        weights, kept = {p.data_ptr() for p in m.parameters()}, {}

        def keep(t):
            if t.data_ptr() not in weights:
                kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            out = m(ids, head=False)
        calls = []  # the recomputation never re-enters a block's __call__ (nor its hooks: FSDP2's all-gather)
        for layer in m.model.layers:
            layer.register_forward_pre_hook(lambda *_: calls.append(1))
        out.square().sum().backward()
        assert not calls
        return sum(kept.values()), {n: p.grad for n, p in m.named_parameters()}
    full, reference = run(False, 0)
    for compiled in (False, True):
        kept = {}
        for recompute in (0, L // 2, L):
            kept[recompute], grads = run(compiled, recompute)
            for n, g in grads.items():
                torch.testing.assert_close(g, reference[n], atol=1e-3, rtol=1e-4)
        assert kept[L] < 3 * L * tokens * H * 4 < kept[0] / 4, kept  # fp32: 4 bytes a value
        assert kept[L] < kept[L // 2] < kept[0] and abs(kept[L // 2] - (kept[L] + kept[0]) / 2) < kept[0] / 8, kept
        # training.fit_recompute's estimate of a kept block's values a token (Qwen's intermediate / hidden ratio)
        assert kept[0] / (L * tokens * 4) < 5 * I + 8 * H, (compiled, kept[0] / (L * tokens * 4))
    # GRPO's layout (a PackedRows goes through the checkpoint into the compiled block)
    import grpo
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, 97, (n,), generator=g).tolist() for n in (5, 9)]
    responses = [torch.randint(1, 97, (n,), generator=g).tolist() for n in (3, 7, 4, 6, 2, 5)]

    def grpo_grads(compiled, recompute):
        m = toy.init_weights(M.Transformer(cfg), seed=0)
        if compiled:
            M.compile_blocks(m, backend)
        m.recompute_blocks = L if recompute else 0
        grpo.response_logprobs(m, prompts, responses, 3, 0, "cpu", 1.0)[0].sum().backward()
        return {n: p.grad for n, p in m.named_parameters()}
    eager = grpo_grads(False, False)
    for n, g in grpo_grads(True, True).items():
        torch.testing.assert_close(g, eager[n], atol=1e-4, rtol=1e-4)


def test_compiled_decode_writes_the_cache_in_place_and_reads_a_span():
    # Inductor compiled a scatter_ into the KV cache as two copies of the whole cache per layer and step, so a
    # step cost O(slots x max_len) whatever the lengths (on this CPU, 16 slots of 16k positions: 22 tok/s, 190 with
    # the indexed write). No loop in the generated code may run over a cache's size. Attention reads the smallest
    # span of the cache (max_len / 8, / 4, / 2, max_len) that covers the positions in use: as the traces grow
    # the step moves through the spans (here the first two: a graph each), and the output is eager's
    import re
    from torch._dynamo.utils import counters
    from torch._inductor.utils import run_and_get_code
    cfg = M.ModelConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, rope_theta=10000.0)
    m = toy.init_weights(M.Transformer(cfg), seed=0)
    torch._dynamo.reset()
    counters.clear()
    engine = Sampler(m, slots=4, max_len=64, compile=True)
    assert engine.kv_spans == [8, 16, 32, 64] and engine.kv_span(9) == 16 and engine.kv_span(64) == 64
    cache_size = m.model.layers[0].self_attn.k_cache.numel()
    out, code = run_and_get_code(lambda: engine.generate([[1, 2, 3], [4, 5]], 13, temperature=0))
    assert counters["stats"]["unique_graphs"] == 2  # spans 8 (3 + 1 positions) and 16 (3 + 13)
    loops = [int(n) for src in code for n in re.findall(r"<\s*static_cast<int64_t>\((\d+)L\)", src)]
    assert loops and max(loops) < cache_size // 8, (max(loops), cache_size)
    # stop ids: the compiled step keeps finished rows in its batch (fixed shapes) but their output is cut
    stop = {out[0][1]}
    cut = [o[:next((i + 1 for i, t in enumerate(o) if t in stop), len(o))] for o in out]
    assert cut != out and engine.generate([[1, 2, 3], [4, 5]], 13, temperature=0, stop_ids=stop) == cut
    assert counters["stats"]["unique_graphs"] == 2  # (the same two graphs)
    # eager's tokens (an engine of its own over m: the model holds one engine's KV cache at a time)
    assert out == generate(m, [[1, 2, 3], [4, 5]], 13, temperature=0)
    assert Sampler(m, slots=4, max_len=64).kv_span(37) == 37  # eager: exactly the positions in use


def test_sampling_distribution_and_vocab_limit(tmp_path):
    # 4000 first tokens from a 6-token vocabulary follow softmax(logits / T) (chi-square, 5 d.o.f., p = 0.001)
    make_hf_checkpoint(str(tmp_path), "qwen2-untied", vocab_size=8)
    m = checkpoint.load_model(str(tmp_path))
    with torch.no_grad():
        m.lm_head.weight.mul_(10)  # spread the logits so the probabilities differ visibly
        logits = m(torch.tensor([[1, 2, 3]]))[0, -1]
    for temperature in (1.0, 0.7):
        outs = generate(m, [[1, 2, 3]], max_new_tokens=1, n=4000, seed=0, vocab_size=6, temperature=temperature)
        counts = torch.bincount(torch.tensor([o[0] for o in outs]), minlength=8).double()
        probs = (logits[:6] / temperature).softmax(-1).double()
        assert counts[6:].sum() == 0  # ids past the tokenizer's vocabulary are never drawn
        expected = 4000 * probs
        assert probs.min() > 0.01 and ((counts[:6] - expected) ** 2 / expected).sum() < 20.5
    greedy_top_k1 = generate(m, [[1, 2, 3]], max_new_tokens=5, top_k=1, seed=0)
    assert greedy_top_k1 == generate(m, [[1, 2, 3]], max_new_tokens=5, temperature=0)
    tiny_p = generate(m, [[1, 2, 3]], max_new_tokens=5, top_p=1e-6, seed=0)
    assert tiny_p == greedy_top_k1


def test_uniforms_are_uniform_and_keyed_by_sequence_and_token():
    seq, t = torch.arange(100000), torch.zeros(100000, dtype=torch.long)
    u = sampler.uniforms(torch.tensor(3), seq, t)
    assert 0 <= u.min() and u.max() < 1
    counts = torch.histc(u, bins=20, min=0, max=1)
    assert ((counts - 5000) ** 2 / 5000).sum() < 43.8  # chi-square, 19 d.o.f., p = 0.001
    assert abs(torch.corrcoef(torch.stack([u[:-1], u[1:]]))[0, 1]) < 0.02  # neighbours independent
    assert torch.equal(u[5:9], sampler.uniforms(torch.tensor(3), seq[5:9], t[5:9]))  # depends on the key only
    assert not torch.equal(u, sampler.uniforms(torch.tensor(4), seq, t))
    assert not torch.equal(u, sampler.uniforms(torch.tensor(3), seq, t + 1))


def test_sampling_never_draws_a_zero_probability_token():
    logits = torch.tensor([[0.0, float("-inf"), 1.0, float("-inf"), float("-inf")]] * 3)
    u = sampler.uniforms(torch.tensor(0), torch.arange(12000), torch.zeros(12000, dtype=torch.long))
    counts = torch.bincount(sampler.sample_next(logits.repeat(4000, 1), u, 1.0, 1.0, 0), minlength=5)
    assert counts[[1, 3, 4]].sum() == 0
    assert abs(counts[2].item() / counts.sum().item() - math.e / (1 + math.e)) < 0.02
    # the extremes of the uniform draw: 0 takes the first token with p > 0, a draw that reaches the total
    # (float rounding) the last one, never the masked tail
    for u, expected in ((0.0, 0), (1.0, 2)):
        assert sampler.sample_next(logits, torch.full((3,), u), 1.0, 1.0, 0).tolist() == [expected] * 3


# ----------------------------------------------------------------------------- chunked log-probs

def test_chunked_logprobs_equal_cross_entropy_values_and_grads():
    torch.manual_seed(0)
    h = torch.randn(37, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 50, (37,))
    g = torch.randn(37, dtype=torch.float64)
    for temp in (1.0, 0.7):
        logp, ent = head.ChunkedTokenLogProb.apply(h, w, t, 8, temp)
        ref = -F.cross_entropy((h @ w.t()) / temp, t, reduction="none")
        torch.testing.assert_close(logp.double(), ref.double(), atol=1e-5, rtol=0)
        full = torch.log_softmax((h @ w.t()) / temp, -1)
        torch.testing.assert_close(ent.double(), -(full.exp() * full).sum(-1), atol=1e-5, rtol=0)
        gh, gw = torch.autograd.grad((logp * g).sum(), (h, w))
        rh, rw = torch.autograd.grad((ref * g).sum(), (h, w))
        torch.testing.assert_close(gh, rh, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(gw, rw, atol=1e-5, rtol=1e-5)


def test_weighted_logprob_sum_equals_cross_entropy_values_and_grads():
    torch.manual_seed(1)
    h = torch.randn(29, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(40, 16, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 40, (29,))
    weights = torch.rand(29, dtype=torch.float64)
    for temp in (1.0, 0.7):
        total = head.ChunkedWeightedLogProbSum.apply(h, w, t, weights, 8, temp)
        ref = -(F.cross_entropy((h @ w.t()) / temp, t, reduction="none") * weights).sum()
        torch.testing.assert_close(total.double(), ref, atol=1e-5, rtol=0)
        gh, gw = torch.autograd.grad(3.0 * total, (h, w))
        rh, rw = torch.autograd.grad(3.0 * ref, (h, w))
        torch.testing.assert_close(gh, rh, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(gw, rw, atol=1e-5, rtol=1e-5)


def test_bf16_head_gradients_summed_over_many_chunks_stay_close_to_fp64():
    # in bf16 the head's weight gradient is summed over chunks in place in bf16 (no weight-sized fp32 buffer): over 32
    # chunks its error stays within 2% of the largest entry (one chunk, the bf16 inputs alone: 0.6%)
    g = torch.Generator().manual_seed(3)
    h, w = torch.randn(512, 64, generator=g), torch.randn(3000, 64, generator=g) * 0.3
    t, weights = torch.randint(0, 3000, (512,), generator=g), torch.full((512,), 1 / 512)

    def grads(dtype, chunk):
        hh, ww = h.to(dtype).requires_grad_(True), w.to(dtype).requires_grad_(True)
        total = head.ChunkedWeightedLogProbSum.apply(hh, ww, t, weights, chunk, 1.0)
        return [x.double() for x in (total, *torch.autograd.grad(total, (hh, ww)))]
    for got, ref in zip(grads(torch.bfloat16, 16), grads(torch.float64, 512)):
        assert (got - ref).abs().max() < 0.02 * ref.abs().max()


@pytest.mark.slow
def test_fused_head_compiled_equals_eager_with_one_graph_per_dtype(monkeypatch):
    # on GPUs each chunk's elementwise work (softmax, log-prob, entropy, d/d logits) runs compiled by Inductor; run here
    # on CPU: the same values and gradients as eager in bf16 and fp32, and a bounded number of graphs whatever the
    # chunk sizes (the last chunk is shorter) and whether the log-probs' gradient comes expanded (a sum's) or not
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    g = torch.Generator().manual_seed(3)
    for dtype, tol in ((torch.bfloat16, dict(atol=2e-2, rtol=2e-2)), (torch.float32, dict(atol=1e-5, rtol=1e-4))):
        for N in (37, 20):
            h = torch.randn(N, 16, generator=g).to(dtype).requires_grad_(True)
            w = torch.randn(300, 16, generator=g).to(dtype).requires_grad_(True)
            t, weights, coef = torch.randint(0, 300, (N,), generator=g), torch.rand(N, generator=g), torch.randn(N, generator=g)
            results = []
            for devices in ((), ("cpu",)):  # eager, then compiled
                monkeypatch.setattr(head, "FUSED_HEAD_DEVICES", devices)
                total = head.ChunkedWeightedLogProbSum.apply(h, w, t, weights, 8, 0.7)
                logp, entropy = head.ChunkedTokenLogProb.apply(h, w, t, 8, 0.7)
                results.append([total, logp, entropy, *torch.autograd.grad(total, (h, w)),
                                *torch.autograd.grad((logp * coef).sum() + logp.sum(), (h, w))])
            for eager, compiled in zip(*results):
                torch.testing.assert_close(compiled, eager, **tol)
    # logits are fp32 whatever the inputs (head_logits): one log-prob + entropy graph, a logit-gradient graph per
    # dtype of the gradient it returns (the hidden states': bf16, fp32)
    assert counters["stats"]["unique_graphs"] == 3
    assert not counters["unimplemented"]  # no graph break, nothing fell back to eager


def test_model_logprob_mode_matches_logits(tmp_path):
    make_hf_checkpoint(str(tmp_path), "qwen2-tied")
    m = checkpoint.load_model(str(tmp_path))
    m.logprob_chunk = 5
    ids = torch.randint(0, 128, (2, 9))
    tgt = torch.randint(0, 128, (2, 9))
    logp, _ = m(ids, targets=tgt)
    ref = torch.log_softmax(m(ids).float(), -1).gather(-1, tgt[..., None]).squeeze(-1)
    torch.testing.assert_close(logp, ref, atol=1e-5, rtol=0)
    logp.sum().backward()
    g1 = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    m.recompute_blocks = len(m.model.layers)
    m(ids, targets=tgt)[0].sum().backward()
    for n, p in m.named_parameters():
        torch.testing.assert_close(p.grad, g1[n], atol=1e-5, rtol=1e-4)
    m.zero_grad()
    torch.log_softmax(m(ids).float(), -1).gather(-1, tgt[..., None]).sum().backward()
    for n, p in m.named_parameters():
        torch.testing.assert_close(p.grad, g1[n], atol=1e-5, rtol=1e-4)
    # token_mask: the head runs on masked positions only, zeros elsewhere, same gradients as masking after
    mask = torch.rand(2, 9) < 0.5
    m.zero_grad()
    lp_masked, ent = m(ids, targets=tgt, token_mask=mask)
    torch.testing.assert_close(lp_masked, ref * mask, atol=1e-5, rtol=0)
    assert (ent[~mask] == 0).all() and (ent[mask] > 0).all()
    lp_masked.sum().backward()
    g2 = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    (m(ids, targets=tgt)[0] * mask).sum().backward()
    for n, p in m.named_parameters():
        torch.testing.assert_close(g2[n], p.grad, atol=1e-5, rtol=1e-4)
    # loss_weights: the SFT path, a scalar with the gradients of sum(w * log p)
    wts = mask.float() * 0.25
    m.zero_grad()
    total = m(ids, targets=tgt, loss_weights=wts)
    assert total.item() == pytest.approx((ref * wts).sum().item(), abs=1e-4)
    total.backward()
    for n, p in m.named_parameters():
        torch.testing.assert_close(p.grad, g2[n] * 0.25, atol=1e-5, rtol=1e-4)


def test_paged_cache_generates_what_the_dense_one_does(ckpt):
    # a paged KV cache (pages of 8 positions, read through FlexAttention) gives the dense cache's tokens and log-probs,
    # greedy and sampled, with continuous batching and packing; a pool of 12 pages cannot hold every running sample,
    # so samples are preempted and resumed (re-prefilled from their tokens) and still draw the same tokens
    path, _, _ = ckpt
    m = checkpoint.load_model(path)
    prompts = ragged_batch([3, 20, 9, 1, 14, 6, 11], seed=12)
    stop = list(range(12))  # ragged lengths: about one token in ten stops
    for temperature in (0.0, 1.0):
        dense, dense_logps = Sampler(m, slots=6, max_len=48).generate(prompts, 24, temperature, n=2, stop_ids=stop, seed=4,
                                                                        logprobs=True)
        assert len({len(o) for o in dense}) > (3 if temperature else 1)
        for pages in (None, 12):
            engine = Sampler(m, slots=6, max_len=48, page_size=8, pages=pages)
            out, logps = engine.generate(prompts, 24, temperature, n=2, stop_ids=stop, seed=4, logprobs=True)
            assert out == dense
            assert max(abs(a - b) for x, y in zip(logps, dense_logps) for a, b in zip(x, y)) < 1e-4
            assert (engine.preemptions > 0) == (pages == 12)
            # every page is back in the pool, and the device's tables say so
            assert sorted(engine.pages.free) == list(range(1, m.page_index.shape[0])) and not any(engine.pages.holders)
            assert (m.page_table == 0).all()
        as_held = [array("i", p) for p in prompts]  # prompts as tokenize_prompts holds them: the same, preempted too
        assert Sampler(m, slots=6, max_len=48, page_size=8, pages=12).generate(as_held, 24, temperature, n=2, stop_ids=stop,
                                                                               seed=4) == dense


def test_paged_decode_reads_only_each_rows_own_pages():
    # the block mask a paged step attends with: row b's blocks are its own pages 0..pos[b] / P (what the kernel reads
    # grows with the row's length, not the longest row's), and within them the positions <= pos[b]. Rows 0 and 1 are
    # two samples of one prompt: they share its two full pages (7, 2), then each has its own
    cfg = M.ModelConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                        num_key_value_heads=2)
    m = M.Transformer(cfg)
    m.setup_cache(slots=3, max_len=32, page_size=4, pages=10)
    held = [[7, 2, 9], [7, 2, 1], [3, 8, 4, 5]]  # slot -> its pages in order
    for s, pages in enumerate(held):
        m.page_table[s, :len(pages)] = torch.tensor(pages)
        for j, p in enumerate(pages):
            m.page_index[p] = j
    pos = torch.tensor([9, 10, 15])
    where, mask = m.decode_addressing(pos)
    assert where.tolist() == [9 * 4 + 1, 1 * 4 + 2, 5 * 4 + 3]  # pool positions of logical 9, 10, 15
    # the pages before the last are full blocks (no mask_mod), the last one partial
    assert mask.full_kv_num_blocks.flatten().tolist() == [2, 2, 3] and mask.kv_num_blocks.flatten().tolist() == [1, 1, 1]
    for b in range(3):
        assert mask.full_kv_indices[b, 0, 0, :len(held[b]) - 1].tolist() == held[b][:-1]
        assert mask.kv_indices[b, 0, 0, 0].item() == held[b][-1]
        expected = torch.zeros(40, dtype=torch.bool)
        for p in range(int(pos[b]) + 1):
            expected[held[b][p // 4] * 4 + p % 4] = True
        dense = torch.tensor([[mask.mask_mod(torch.tensor(b), 0, 0, torch.tensor(kv)) for kv in range(40)]])
        assert torch.equal(dense.flatten(), expected)
        # what the kernel sees: every position of a full block, and those of a partial block that mask_mod keeps
        seen = torch.zeros(40, dtype=torch.bool)
        for page in mask.full_kv_indices[b, 0, 0, :mask.full_kv_num_blocks[b, 0, 0]].tolist():
            seen[page * 4:page * 4 + 4] = True
        for page in mask.kv_indices[b, 0, 0, :mask.kv_num_blocks[b, 0, 0]].tolist():
            seen[page * 4:page * 4 + 4] |= dense.flatten()[page * 4:page * 4 + 4]
        assert torch.equal(seen, expected)


def test_a_paged_step_lists_no_more_pages_than_each_row_holds():
    # a row's mask lists pages 0..pos / P: a running row holds them, and a row without a sequence (finished, preempted,
    # packed away or never used) must list one (the sink page), not pos / P copies of it (at 7B, a row freed at
    # position 12k listed 96 every step). Checked at every decode step of a call with ragged traces, preemption and
    # steps on fewer rows; the tokens are the dense cache's
    cfg = M.ModelConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                        num_key_value_heads=2)
    m = toy.init_weights(M.Transformer(cfg), seed=0)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(1, 97, (int(L),), generator=g).tolist() for L in torch.randint(2, 30, (10,), generator=g)]
    dense = Sampler(copy.deepcopy(m), slots=8, max_len=96).generate(prompts, 60, 1.0, n=2, stop_ids=[5, 7, 11], seed=1)
    engine = Sampler(m, slots=8, max_len=96, page_size=4, pages=40)
    listed, addressing = [], m.decode_addressing

    def record(pos, kv_len=None):
        where, mask = addressing(pos, kv_len)
        blocks = mask.kv_num_blocks.flatten() + mask.full_kv_num_blocks.flatten()
        listed.append((blocks.tolist(), [max(len(h), 1) for h in engine.pages.held[:len(pos)]]))
        return where, mask
    m.decode_addressing = record
    out = engine.generate(prompts, 60, 1.0, n=2, stop_ids=[5, 7, 11], seed=1)
    assert out == dense
    assert engine.preemptions > 0 and len({len(o) for o in out}) > 5 and any(len(n) < 8 for n, _ in listed)
    assert all(n <= h for blocks, held in listed for n, h in zip(blocks, held)), next(
        (blocks, held) for blocks, held in listed if any(n > h for n, h in zip(blocks, held)))


def test_a_prompts_samples_hold_its_full_pages_once(ckpt):
    # 4 samples of a 40-token prompt in pages of 8: its 5 full pages once, and 2 pages each for the 16 new tokens: 13
    # pages, where 4 unshared sequences take 28. A pool of 13 runs them all at once, and they draw the dense cache's
    # tokens; the shared pages go back to the pool only when the last sample lets go of them
    path, _, _ = ckpt
    m = checkpoint.load_model(path)
    prompt = ragged_batch([40], seed=3)
    dense = Sampler(m, slots=4, max_len=56).generate(prompt, 16, 1.0, n=4, seed=2)
    engine = Sampler(m, slots=4, max_len=56, page_size=8, pages=14)
    assert engine.generate(prompt, 16, 1.0, n=4, seed=2) == dense and engine.preemptions == 0
    pages = engine.pages  # on CPU the engine checks every step, so admission gives pages for 1 position past the prompt
    assert pages.grow([0, 1, 2, 3], 41, shared=5) and len(pages.free) == 13 - 9  # 5 shared + 1 each
    assert pages.held[0][:5] == pages.held[3][:5] and len({h[5] for h in pages.held}) == 4
    pages.flush()  # a host check whose slots need no new page writes no table row to the device
    assert pages.grow([0, 1, 2, 3], 48) and not pages.rows and len(pages.free) == 4
    assert pages.grow([2], 49) and pages.rows == {2} and len(pages.free) == 3
    for s in range(3):
        pages.release(s)
    assert len(pages.free) == 13 - 6  # the last sample still holds the prompt's pages
    pages.release(3)
    assert len(pages.free) == 13
    # admission needs the prompt's 5 full pages and a page each: a pool of 8 is too small for a 40-token prompt, and
    # runs a 39-token one (4 full pages), preempting samples as they grow
    small = Sampler(m, slots=4, max_len=56, page_size=8, pages=9)
    with pytest.raises(ValueError, match="pool of 8 KV pages"):
        small.generate(prompt, 16, 1.0, n=4, seed=2)
    shorter = [prompt[0][:39]]
    assert small.generate(shorter, 16, 1.0, n=4, seed=2) == Sampler(m, slots=4, max_len=56).generate(shorter, 16, 1.0, n=4, seed=2)
    assert small.preemptions > 0


def test_the_sampler_refuses_a_call_it_cannot_finish(ckpt):
    # an empty prompt, a sequence past the cache's positions, more samples than slots: refused before any work,
    # and the largest call that fits runs
    engine = Sampler(checkpoint.load_model(ckpt[0]), slots=4, max_len=56)
    for prompts, new, n, msg in (([[1, 2], []], 4, 1, "at least one token"), ([[1] * 50], 7, 1, r"up to 50 tokens \+ 7 new"),
                                 ([[1]], 4, 5, "n=5 do not fit 4 slots of 56")):
        with pytest.raises(ValueError, match=msg):
            engine.generate(prompts, new, n=n)
    assert [len(o) for o in engine.generate([[1] * 50], 6, n=4, seed=1)] == [6] * 4  # no stop ids: the whole budget


def test_the_opening_all_prompts_share_is_written_once_and_held_once(ckpt, monkeypatch):
    # 3 prompts of 45-49 tokens opening with the same 35 (a judge template), pages of 8: the opening's 4 whole pages are
    # written by one forward of the opening alone and held once for every sample of every prompt, and the prompts'
    # prefill runs only the rest (13-17 tokens) against them. 2 samples each, 12 new tokens: the 6 samples run at once
    # in 22 pages, with the dense cache's tokens and log-probs; holding the opening per prompt takes 8 pages more, and
    # the same pool then preempts (the same tokens still)
    path, _, _ = ckpt
    m = checkpoint.load_model(path)
    opening = ragged_batch([35], seed=9)[0]
    prompts = [opening + p for p in ragged_batch([10, 12, 14], seed=10)]
    dense, dense_logps = Sampler(m, slots=6, max_len=64).generate(prompts, 12, 1.0, n=2, seed=3, logprobs=True)
    engine = Sampler(m, slots=6, max_len=64, page_size=8, pages=23)
    prefilled = []  # the (padded) tokens of each prefill forward

    def count(module, args):
        if args[0].shape[1] > 1:  # not a decode step
            prefilled.append(args[0].numel())
    hook = m.model.embed_tokens.register_forward_pre_hook(count)
    out, logps = engine.generate(prompts, 12, 1.0, n=2, seed=3, logprobs=True)
    hook.remove()
    assert prefilled == [32, 3 * 17]  # the opening's 4 pages once, then the 3 rests padded to the longest (dense: 3 x 49)
    assert out == dense and engine.preemptions == 0 and engine.pages.peak == 22
    assert max(abs(a - b) for x, y in zip(logps, dense_logps) for a, b in zip(x, y)) < 1e-4
    # the call lets go of the opening: every page is back, and prefills write every position again
    assert sorted(engine.pages.free) == list(range(1, 23)) and not any(engine.pages.holders) and m.cached_prefix == 0
    monkeypatch.setattr(Sampler, "write_common_prefix", lambda self, prompts: None)  # the opening held per prompt
    unshared = Sampler(m, slots=6, max_len=64, page_size=8, pages=23)
    assert unshared.generate(prompts, 12, 1.0, n=2, seed=3) == dense and unshared.preemptions > 0
    roomy = Sampler(m, slots=6, max_len=64, page_size=8)  # a pool for everything: it takes 30
    assert roomy.generate(prompts, 12, 1.0, n=2, seed=3) == dense and roomy.pages.peak == 30


def test_paged_decode_compiled_by_inductor_gives_the_dense_tokens():
    # the GPU's path as far as a CPU goes: Inductor (not the eager backend) compiles the paged step, FlexAttention and
    # the page-table mask_mod included (its C++ kernel; a GPU gets Triton's from the same lowering), over prompts whose
    # samples share pages (and whose opening all share) and a pool that preempts; the tokens are the eager dense
    # cache's. Compiled, the kernel reads
    # only the blocks (pages) the block mask lists, where eager FlexAttention applies mask_mod to the whole pool: this
    # test is the one that checks those lists end to end (a row missing its last page fails it, and no eager test)
    cfg = M.ModelConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, rope_theta=10000.0, max_position_embeddings=256)
    m = toy.init_weights(M.Transformer(cfg), seed=0)
    # (pages of 32 positions: the CPU kernel miscomputes some other sizes, which Sampler refuses, tested below)
    opening = ragged_batch([70], vocab=97, seed=6)[0]  # shared by all three: its 2 whole pages are held once
    prompts = [opening + p for p in ragged_batch([40, 2, 70], vocab=97, seed=5)]  # 110, 72, 140 tokens
    dense = Sampler(copy.deepcopy(m), slots=8, max_len=170).generate(prompts, 24, 1.0, n=4, stop_ids=[3], seed=7)
    torch._dynamo.reset()
    engine = Sampler(m, slots=8, max_len=170, page_size=32, pages=11, compile=True)
    assert engine.generate(prompts, 24, 1.0, n=4, stop_ids=[3], seed=7) == dense
    assert engine.preemptions > 0 and engine.pages.peak == engine.pages.pool


def test_inductor_on_a_cpu_gets_pages_of_a_multiple_of_32_positions():
    # torch's C++ FlexAttention kernel (Inductor on a CPU) gave wrong attention with KV blocks of 8, 24, 40 and 56
    # positions (fp32, AVX2; NaN at 8 in bf16), and right with 16, 32, 48 and 64: so compiled there, a page size that is
    # not a multiple of 32 is refused, where it would sample from wrong logits without a word
    m = M.Transformer(M.ModelConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                    num_attention_heads=4, num_key_value_heads=2))
    for page in (8, 16, 24, 48):
        with pytest.raises(ValueError, match=f"page size {page}: .* a multiple of 32"):
            Sampler(m, slots=4, max_len=64, page_size=page, compile=True)
    for page, compile, backend in ((32, True, "inductor"), (8, True, "eager"), (8, False, "inductor")):
        assert Sampler(m, slots=4, max_len=64, page_size=page, compile=compile, backend=backend).pages.size == page


def test_paged_decode_compiles_a_graph_per_bucket():
    # compiled (eager backend), the paged step is one graph per (bucket, greedy or sampled): no span of the cache, and
    # no recompile as pages change hands or samples are preempted; the tokens are the eager engine's
    from torch._dynamo.utils import counters
    cfg = M.ModelConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                        num_key_value_heads=2, rope_theta=10000.0, max_position_embeddings=256)
    m = toy.init_weights(M.Transformer(cfg), seed=0)
    plain = copy.deepcopy(m)
    torch._dynamo.reset()
    counters.clear()
    engine = Sampler(m, slots=32, max_len=64, page_size=8, pages=40, compile=True, backend="eager")
    g = torch.Generator().manual_seed(1)
    for call, temperature in enumerate((1.0, 0.0)):
        prompts = [torch.randint(1, 97, (int(L),), generator=g).tolist() for L in torch.randint(1, 30, (8,), generator=g)]
        out = engine.generate(prompts, 24, temperature, n=2, stop_ids=[5, 7], seed=call)
        assert out == Sampler(plain, slots=8, max_len=64).generate(prompts, 24, temperature, n=2, stop_ids=[5, 7], seed=call)
    assert engine.preemptions > 0
    assert counters["stats"]["unique_graphs"] <= 2 * len(engine.buckets())


def test_an_engine_whose_model_another_engine_has_since_set_up_is_refused():
    # the KV cache is the model's: a second Sampler over it with another layout takes it over, and the first then refuses
    # to run until it is made again (without the check: a shape error deep in attention when compiled, and a dense
    # engine after a paged one decoded from wrong log-probs, silently); one of the same layout shares the cache, and
    # each call runs as it would alone
    m = toy.init_weights(M.Transformer(M.ModelConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                     num_attention_heads=4, num_key_value_heads=2)), seed=0)
    prompts = [[1, 2, 3], [4, 5]]
    for first, second in (({}, {}), ({}, dict(page_size=8)), (dict(page_size=8), dict(page_size=16)),
                          (dict(page_size=8), dict(page_size=8, pages=20))):
        a = Sampler(m, slots=4, max_len=32, **first)
        expected = a.generate(prompts, 6, temperature=0)
        b = Sampler(m, slots=4, max_len=32, **second)
        assert b.generate(prompts, 6, temperature=0) == expected
        if first == second:
            assert a.generate(prompts, 6, temperature=0) == expected
        else:
            with pytest.raises(RuntimeError, match="another Sampler made over this model since gave it a KV cache"):
                a.generate(prompts, 6, temperature=0)
            assert Sampler(m, slots=4, max_len=32, **first).generate(prompts, 6, temperature=0) == expected


def test_a_pool_too_small_for_one_sequence_is_refused():
    m = M.Transformer(M.ModelConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                    num_attention_heads=4, num_key_value_heads=2))
    engine = Sampler(m, slots=4, max_len=64, page_size=8, pages=5)  # 4 pages to hand out: 32 positions
    with pytest.raises(ValueError, match="pool of 4 KV pages"):
        engine.generate([[1, 2, 3]], 40)
    assert len(engine.generate([[1, 2, 3]], 20)[0]) == 20
    # by hand, pages of 8 and a host check every 8 steps: 2 samples of a 15-token prompt share its one full page, and
    # each needs pages for 15 + 8 = 23 positions (3 pages), 2 of them its own: 5 pages in all
    pages = engine.pages
    for pool, fits in ((4, False), (5, True)):
        pages.pool = pool
        assert pages.can_progress(2, 15, 8, 23) == fits
        assert not pages.can_progress(1, 1, 8, 8 * pool + 1)  # one sequence longer than the pool


def test_packed_rows_mask_by_hand_and_both_kernels_agree():
    # row 0: a 3-token prefix, then sequences of 2 and 3 tokens, then 2 pads; row 1: two sequences and no prefix
    doc = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, -1, -1], [1, 1, 1, 1, 2, 2, 2, 2, 2, 2]])
    dense = M.PackedRows(doc)
    keep = dense.mask[:, 0] == 0  # [B, T, T]: query t sees key s
    assert keep[0, 4].tolist() == [1, 1, 1, 1, 1, 0, 0, 0, 0, 0]  # sequence 1 sees the prefix and itself, causally
    assert keep[0, 6].tolist() == [1, 1, 1, 0, 0, 1, 1, 0, 0, 0]  # sequence 2: the prefix, not sequence 1
    assert keep[0, 9].tolist() == [1, 1, 1, 0, 0, 0, 0, 0, 1, 1]  # a pad: the prefix and pads, nothing real after it
    assert keep[1, 5].tolist() == [0, 0, 0, 0, 1, 1, 0, 0, 0, 0]  # no prefix: a sequence sees only itself
    assert not keep[0, :8, 8:].any()  # no real token ever sees a pad
    # the CUDA kernel's BlockMask (FlexAttention, run eagerly here) gives the dense kernel's outputs, GQA included
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(2, 4, 10, 8, generator=g), torch.randn(2, 2, 10, 8, generator=g), torch.randn(2, 2, 10, 8, generator=g)
    torch.testing.assert_close(M.PackedRows(doc, flex=True).attend(q, k, v), dense.attend(q, k, v), atol=1e-5, rtol=1e-5)
    # its blocks (128 x 128): a 128-token prefix (block 0), sequence 1 of 256 (blocks 1-2), sequence 2 of 128 (block 3).
    # Each query block reads its diagonal block under the mask, the blocks it sees whole without it, and skips the rest
    flex = M.PackedRows(torch.tensor([0] * 128 + [1] * 256 + [2] * 128)[None], flex=True).block_mask
    partial = [flex.kv_indices[0, 0, i, :n].tolist() for i, n in enumerate(flex.kv_num_blocks[0, 0].tolist())]
    whole = [sorted(flex.full_kv_indices[0, 0, i, :n].tolist()) for i, n in enumerate(flex.full_kv_num_blocks[0, 0].tolist())]
    assert partial == [[0], [1], [2], [3]] and whole == [[], [0], [0, 1], [0]]  # sequence 2 skips sequence 1's blocks


def test_a_decoding_copy_the_gpu_cannot_hold_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    # a rank's share of the rollout copy (grpo.py --rollout-tp, eval.py --tp) counted by hand: Qwen2.5-32B's bf16 copy
    # is 65.5 GB whole and 10.9 GB a rank over 8, so on an 80 GB GPU with the default 25% KV cache it needs the split
    import argparse
    import grpo
    from conftest import DATA, need_shared
    h, inter, hd, heads, kv, layers, vocab = 5120, 27648, 128, 40, 8, 64, 152064
    share = lambda T: (layers * ((h + 1) * (heads + 2 * kv) * hd // T + heads * hd * h // T + 3 * h * inter // T + 2 * h)
                       + 2 * vocab * h + h) * 2
    ck = tmp_path / "32b"
    ck.mkdir()
    with open(os.path.join(need_shared(DATA), "configs", "Qwen2.5-32B.config.json")) as f:
        (ck / "config.json").write_text(f.read())
    assert [decode_model.copy_bytes(checkpoint.load_config(ck), T, torch.bfloat16) for T in (1, 8)] == [share(1), share(8)]
    assert round(share(1) / 1e9, 1) == 65.5 and round(share(8) / 1e9, 1) == 10.9
    monkeypatch.setattr(decode_model, "gpu_memory", lambda: 80e9)
    ap = argparse.ArgumentParser()
    with pytest.raises(SystemExit):
        decode_model.check_split(ap, "--rollout-tp", 1, str(ck), torch.bfloat16, 0.25)
    assert "its decoding copy takes 65.5 GB a GPU split over 1 rank(s) (--rollout-tp) and its KV cache 0.25" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "8")
    decode_model.check_split(ap, "--rollout-tp", 8, str(ck), torch.bfloat16, 0.25)  # fits
    # grpo.py checks the copy in its compute dtype (bf16; fp32 under --precision fp32), eval.py its --dtype
    monkeypatch.setattr(decode_model, "gpu_memory", lambda: share(8) / 0.75 + 1)  # holds the bf16 share and its cache
    base = ["--model", str(ck), "--data", "unused.jsonl", "--out", str(tmp_path / "run"), "--rollout-tp", "8", "--offload"]
    assert grpo.parse_args(base).rollout_tp == 8
    with pytest.raises(SystemExit):
        grpo.parse_args(base + ["--precision", "fp32"])
    assert "takes 21.8 GB a GPU split over 8 rank(s) (--rollout-tp)" in capsys.readouterr().err  # 4 bytes a parameter
    import eval as evaluation
    monkeypatch.setattr(decode_model, "gpu_memory", lambda: share(8) + 1)  # eval sizes its cache from what is left
    judge = ["--judge", str(ck), "--bench", "rmb", "--data", "unused", "--out", str(tmp_path / "eval"), "--tp", "8"]
    decode_model.check_split(ap, "--tp", 8, str(ck))  # in the checkpoint's dtype (bf16), as eval.py loads it by default
    with pytest.raises(SystemExit):
        evaluation.main(judge + ["--dtype", "float32"])
    assert "takes 21.8 GB a GPU split over 8 rank(s) (--tp): more than the GPU's 10.9 GB" in capsys.readouterr().err
    # grpo.py counts the rank's training shards too, where they stay on the GPU (no --offload): 14B over 8 ranks,
    # 16 bytes a parameter and 2 for the bf16 reference (--kl > 0), 33.2 GB beside the copy and cache
    ck14 = tmp_path / "14b"
    ck14.mkdir()
    with open(os.path.join(DATA, "configs", "Qwen2.5-14B.config.json")) as f:
        (ck14 / "config.json").write_text(f.read())
    monkeypatch.setattr(decode_model, "gpu_memory", lambda: 80e9)
    big = ["--model", str(ck14), "--data", "unused.jsonl", "--out", str(tmp_path / "run14")]
    with pytest.raises(SystemExit):
        grpo.parse_args(big)
    err = capsys.readouterr().err
    assert ("its decoding copy takes 29.5 GB a GPU split over 1 rank(s) (--rollout-tp) and its KV cache 0.25 of the GPU, "
            "beside 33.2 GB of training state: more than the GPU's 80.0 GB") in err and "add --offload" in err
    assert grpo.parse_args(big + ["--offload"]).offload and grpo.parse_args(big + ["--kv-cache-frac", "0.15"])
    # sft.py's judging (--val-data, --eval-data) decodes through a whole copy, beside each rank's training shards
    import sft
    tune = ["--model", str(ck), "--data", "unused.jsonl", "--out", str(tmp_path / "sft"), "--eval-data", "unused.jsonl"]
    assert sft.parse_args(tune + ["--eval-limit", "0"]).eval_limit == 0  # nothing judged: no copy
    for offload, state in (([], "beside 65.5 GB of training state"), (["--offload"], "of the GPU: more")):
        with pytest.raises(SystemExit):
            sft.parse_args(tune + offload)
        err = capsys.readouterr().err  # 16 bytes a parameter over the 8 ranks, none with --offload: 85.5 GB still
        assert "its decoding copy takes 65.5 GB a GPU split over 1 rank(s) (judging --val-data / --eval-data)" in err
        assert state in err and "Judge the saved model with eval.py instead (--tp splits it)" in err


@pytest.mark.slow
def test_a_tensor_parallel_copy_decodes_as_the_whole_model(tmp_path):
    # grpo.py --rollout-tp 2 on CPU (gloo): each rank holds half the heads, KV heads and MLP columns of the rollout copy
    # (decode_model.tensor_parallel_copy) and the o_proj / down_proj outputs are summed over the pair. Against the whole model:
    # logits to fp32 rounding; greedy and sampled tokens and their log-probs, through the dense and the paged cache,
    # with q/k/v and gate/up fused (the GPU's copy) and not, eager and compiled (Dynamo's eager backend: the all-reduce
    # traced into the decode step, as many graphs as the whole model's compiled engine makes; and Inductor, sampled); a
    # call that one rank gives up (a stop signal) ends on both
    from conftest import ROOT, run_torchrun
    make_hf_checkpoint(str(tmp_path / "ck"))
    script = tmp_path / "tp.py"
    script.write_text(f"""import json, sys
sys.path.insert(0, {ROOT!r})
import torch, torch.distributed as dist
from torch._dynamo.utils import counters
import checkpoint, decode_model
from decode_model import tensor_parallel_group
from sampler import Sampler
from training import end_distributed
dist.init_process_group("gloo")
rank, cpu, m = dist.get_rank(), torch.device("cpu"), checkpoint.load_model({str(tmp_path / "ck")!r})
group, prompts, out = tensor_parallel_group(2, rank), [[3, 5, 7, 11, 2, 9], [13, 17, 19]], []
ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(1))
for fused, compile, page in [(False, False, 0), (True, False, 16), (True, True, 0), (False, True, 16)]:
    decode_model.FUSED_PROJECTION_DEVICES = ("cuda", "cpu") if fused else ("cuda",)
    torch._dynamo.reset()
    counters.clear()
    e = Sampler.for_policy(m, cpu, 8, 64, compile=compile, backend="eager", page_size=page, tp_group=group)
    e.load_weights(m)
    run = lambda engine: [engine.generate(prompts, 12, temperature=0.0),
                          engine.generate(prompts, 12, temperature=1.0, n=3, seed=4, logprobs=True)]
    with torch.no_grad():
        diff = (e.model(ids) - m(ids)).abs().max().item()
    g1, (s1, lp1) = run(e)
    case = dict(diff=diff, greedy=g1, sampled=s1, lp=lp1, graphs=counters["stats"]["unique_graphs"], tp=list(e.tp),
                share=sum(p.numel() for n, p in e.model.named_parameters() if "layers" in n) /
                      sum(p.numel() for n, p in m.named_parameters() if "layers" in n))
    if rank == 0:  # the whole model's run, once (the test compares both ranks' with it)
        torch._dynamo.reset()
        counters.clear()
        g0, (s0, lp0) = run(Sampler(m, 8, 64, compile=compile, backend="eager", page_size=page))
        case["whole"] = dict(greedy=g0, sampled=s0, lp=lp0, graphs=counters["stats"]["unique_graphs"])
    out.append(case)
checks, free = [], len(e.pages.free)  # a call given up (grpo.py: a stop signal) that rank 1 alone asks for, at its 2nd check
given_up = e.generate(prompts, 12, temperature=1.0, n=3, seed=4, stop_when=lambda: checks.append(1) or rank == len(checks) - 1 == 1)
out.append(dict(given_up=given_up, checks=len(checks), free=[free, len(e.pages.free)],
                again=e.generate(prompts, 12, temperature=1.0, n=3, seed=4) == s1))
decode_model.FUSED_PROJECTION_DEVICES = ("cuda", "cpu")  # and by Inductor, as on GPUs: the collective lowered into the step
torch._dynamo.reset()
e = Sampler.for_policy(m, cpu, 8, 128, compile=True, tp_group=group)  # 16 positions: one span of the cache, one graph
e.load_weights(m)
s1, lp1 = e.generate(prompts, 10, temperature=1.0, n=3, seed=4, logprobs=True)
s0, lp0 = Sampler(m, 8, 128).generate(prompts, 10, temperature=1.0, n=3, seed=4, logprobs=True)
out.append(dict(sampled=s1 == s0, lp=max(abs(a - b) for x, y in zip(lp1, lp0) for a, b in zip(x, y))))
json.dump(out, open({str(tmp_path)!r} + f"/rank{{rank}}.json", "w"))
end_distributed()  # (the TP group outlives it: see there)
""")
    run_torchrun(str(script), [])
    wholes = [case["whole"] for case in json.load(open(tmp_path / "rank0.json"))[:-2]]
    for rank in range(2):
        *cases, given_up, inductor = json.load(open(tmp_path / f"rank{rank}.json"))
        assert inductor["sampled"] and inductor["lp"] < 1e-5, inductor
        # both ranks give the call up at rank 1's 2nd check, let go of every page, and the next call runs as before
        assert given_up == dict(given_up=None, checks=2, free=[given_up["free"][0]] * 2, again=True), given_up
        assert len(cases) == len(wholes) == 4
        for case, whole in zip(cases, wholes):
            lp = max(abs(a - b) for x, y in zip(case["lp"], whole["lp"]) for a, b in zip(x, y))
            assert case["tp"] == [2, rank] and case["diff"] < 1e-5 and lp < 1e-5, (case, lp)
            assert case["greedy"] == whole["greedy"] and case["sampled"] == whole["sampled"], (case, whole)
            assert 0.5 < case["share"] < 0.52, case  # half of each block, and its norms whole
            assert case["graphs"] == whole["graphs"], (case["graphs"], whole["graphs"])


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.bfloat16, 2e-2)])
def test_cpu_decode_attention_matches_sdpa(dtype, tol):
    # a CPU decode step (T = 1) takes masked_attention's two-matmul path; against SDPA over the same mask (the path
    # prefills and GPUs take), with grouped KV heads and rows of different lengths
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(shape, generator=g).to(dtype) for shape in ((5, 4, 1, 16), (5, 2, 9, 16), (5, 2, 9, 16)))
    keep = (torch.arange(9) <= torch.tensor([0, 3, 8, 5, 1])[:, None])[:, None, None, :]
    y = M.masked_attention(q, k, v, keep)
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=keep, enable_gqa=True)
    assert y.dtype == dtype and y.shape == q.shape
    assert (y.float() - ref).abs().max().item() < tol
    assert torch.equal(y[0].float(), v[0, :, :1].float().repeat_interleave(2, 0))  # a row that sees one key returns it
