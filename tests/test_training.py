"""Training a DSpark drafter: data store, training forward, loss, resume, Ray, end to end.

Fast tests use answers generated with HF transformers (no engine); the slow
ones run the real vLLM data path, a local 2-worker Ray cluster, and the
trained drafter inside the plugin.
"""

import gc
import json

import pytest
import torch
from safetensors.torch import load_file

from dspark_vllm.training.data import DataConfig, TrainingData, make_training_data
from dspark_vllm.training.train import TrainConfig, train

PROMPTS = [
    "Write a python function to reverse a list.",
    "Explain what a dictionary comprehension is.",
    "def fibonacci(n):",
    "Sort a list of tuples by their second element.",
    "What does the with statement do in Python?",
]
TINY = dict(num_layers=1, markov_rank=16, block_size=7, num_anchors=16, batch_size=2, lr=3e-3,
            warmup_steps=2, log_every=5)


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("".join(json.dumps({"turns": [p, "a second turn"]}) + "\n" for p in PROMPTS))
    return str(path)


def data_config(fixture_paths, prompt_file, out, **kw):
    kw = {"max_tokens": 32, "shard_size": 2, "generator": "hf", **kw}
    return DataConfig(target=fixture_paths["target"], prompts=[prompt_file], out=str(out), **kw)


@pytest.fixture(scope="module")
def hf_data(fixture_paths, prompt_file, tmp_path_factory):
    return make_training_data(data_config(fixture_paths, prompt_file, tmp_path_factory.mktemp("hf_data")))


# -- data store ---------------------------------------------------------------------

def test_data_format(hf_data, fixture_paths):
    data = TrainingData(hf_data)
    index = data.index
    assert index["version"] == 1 and index["complete"] and index["num_samples"] == len(data) == 5
    assert index["target_layer_ids"] == [0, 1, 2] and index["hidden_size"] == 128
    assert [s["file"] for s in index["shards"]] == [f"shard-0000{k}.safetensors" for k in range(3)]
    s = data[0]
    meta = index["shards"][0]["samples"][0]
    S, P = meta["length"], meta["answer_start"]
    assert s.input_ids.shape == (S,) and s.features.shape == (S, 3 * 128) and s.last_hidden.shape == (S, 128)
    assert s.features.dtype == torch.bfloat16
    assert s.loss_mask.tolist() == [False] * P + [True] * (S - P)
    raw = load_file(str(hf_data / "shard-00000.safetensors"))
    assert raw["0.input_ids"].dtype == torch.int32 and raw["0.loss_mask"].dtype == torch.uint8


def test_data_is_resumable(hf_data, fixture_paths, prompt_file, tmp_path):
    cfg = data_config(fixture_paths, prompt_file, tmp_path / "d")
    make_training_data(cfg, max_shards=1)  # "interrupted" after the first shard
    first = json.loads((tmp_path / "d" / "index.json").read_text())
    assert not first["complete"] and len(first["shards"]) == 1
    make_training_data(cfg)
    assert (tmp_path / "d" / "index.json").read_text() == (hf_data / "index.json").read_text()
    for k in range(3):
        a = load_file(str(tmp_path / "d" / f"shard-0000{k}.safetensors"))
        b = load_file(str(hf_data / f"shard-0000{k}.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    with pytest.raises(ValueError, match="max_tokens"):
        make_training_data(data_config(fixture_paths, prompt_file, tmp_path / "d", max_tokens=16))


def test_bad_input_names_the_field(fixture_paths, prompt_file, tmp_path):
    with pytest.raises(ValueError, match="prompts"):
        DataConfig(target=fixture_paths["target"], prompts=[str(tmp_path / "nope.jsonl")], out=str(tmp_path))
    with pytest.raises(ValueError, match="TrainConfig.head"):
        TrainConfig.make(data="d", target="t", out="o", head="gated")
    with pytest.raises(FileNotFoundError, match="index.json"):
        TrainingData(tmp_path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        make_training_data(data_config(fixture_paths, str(bad), tmp_path / "x"))


# -- the training forward is one drafting round per anchor ---------------------------

@pytest.mark.parametrize("head", ["vanilla", "rnn", "none"])
def test_training_forward_equals_draft_block(hf_data, fixture_paths, head):
    from dspark_vllm.model.dspark import dense_block_attention
    from dspark_vllm.proposer import draft_block
    from dspark_vllm.sampling import SamplingRows
    from dspark_vllm.training.blocks import anchor_candidates, block_forward
    from dspark_vllm.training.train import draft_config, init_trainable_draft, load_target_head

    data = TrainingData(hf_data)
    cfg = TrainConfig(data=str(hf_data), target=fixture_paths["target"], out="unused", head=head, **TINY)
    model = init_trainable_draft(draft_config(cfg, data), *load_target_head(cfg.target), seed=1).eval()
    if model.confidence_head is not None:  # spread the confidences
        torch.nn.init.normal_(model.confidence_head.proj.weight, std=0.3)
    s = data[1]
    S, K = len(s.input_ids), model.config.block_size
    anchors = anchor_candidates(s.loss_mask)[[0, 3, 7, -2, -1]]
    with torch.no_grad():
        kv = model.context_keys_values(model.fuse_target_features(s.features.float()), torch.arange(S))
        N = len(anchors)
        attend = dense_block_attention([k.expand(N, -1, -1, -1) for k, _ in kv],
                                       [v.expand(N, -1, -1, -1) for _, v in kv], anchors, K)
        for temperature in (0.0, 1.0):
            drafts = draft_block(model, s.input_ids[anchors], anchors, attend, K,
                                 SamplingRows(torch.full((N,), temperature)))
            prev = torch.cat([s.input_ids[anchors][:, None], drafts.tokens[:, :-1]], dim=1)
            pred = block_forward(model, s.input_ids, s.loss_mask, s.features, s.last_hidden, anchors, prev)
            target = model.lm_head(s.last_hidden[pred.labels.label_positions - 1].float())
            torch.testing.assert_close(pred.target_logits, target, atol=1e-6, rtol=0)
            if temperature == 0:
                assert torch.equal(pred.logits.argmax(-1), drafts.tokens)
            else:
                torch.testing.assert_close(pred.logits.softmax(-1), drafts.probs, atol=1e-5, rtol=0)
            if head == "none":
                assert pred.confidence_logits is None and drafts.confidences is None
            else:
                torch.testing.assert_close(pred.confidence_logits.sigmoid(), drafts.confidences, atol=1e-6, rtol=0)


@pytest.mark.parametrize("head_type", ["vanilla", "rnn"])
def test_markov_head_inference_form_follows_weight_updates(head_type):
    """adder (drafting's one-addmm form) equals logits + step (training's form), also
    after an optimizer-style in-place update of W1 and W2 (their cached casts must not go stale)."""
    from dspark_vllm.model.config import DSparkConfig
    from dspark_vllm.model.dspark import RNNMarkovHead, VanillaMarkovHead

    cfg = DSparkConfig(hidden_size=16, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                       intermediate_size=32, num_hidden_layers=1, vocab_size=50, block_size=4,
                       markov_rank=4, markov_head_type=head_type, target_layer_ids=(0,), num_target_layers=2,
                       mask_token_id=3)
    head = (RNNMarkovHead if head_type == "rnn" else VanillaMarkovHead)(cfg).to(torch.bfloat16)
    logits, prev, hidden = torch.randn(3, 50), torch.tensor([1, 7, 49]), torch.randn(3, 16, dtype=torch.bfloat16)
    state = head.init_state(3, hidden)
    for _ in range(2):
        with torch.no_grad():
            bias, expect_state = head.step(prev, hidden, state)
            got, got_state = head.adder(logits.dtype)(logits.clone(), prev, hidden, state)  # adds in place
            torch.testing.assert_close(got, logits + bias.float(), atol=2e-2, rtol=1e-2)  # bf16 bias rounding
            if state is not None:
                torch.testing.assert_close(got_state, expect_state)
            head.markov_w2.weight.mul_(-3.0)  # in place, as an optimizer step
            head.markov_w1.weight.add_(0.5)


@pytest.mark.parametrize("with_markov", [True, False])
def test_confidence_head_inference_form_follows_weight_updates(with_markov):
    """scorer (drafting's one-addmv form, W1's part precomputed per token) equals the head's
    forward on [h ; W1[x]], also after in-place updates of the projection and of W1."""
    from dspark_vllm.model.dspark import ConfidenceHead

    torch.manual_seed(0)
    w1 = torch.nn.Embedding(50, 4)
    head = ConfidenceHead(16 + (4 if with_markov else 0))
    hidden, prev = torch.randn(3, 5, 16), torch.randint(0, 50, (3, 5))
    for _ in range(2):
        with torch.no_grad():
            features = torch.cat([hidden, w1(prev)], -1) if with_markov else hidden
            got = head.scorer(w1.weight if with_markov else None)(hidden, prev)
            assert got.shape == (3, 5) and got.dtype == torch.float32
            torch.testing.assert_close(got, head(features), atol=1e-5, rtol=1e-5)
            head.proj.weight.mul_(-2.0)  # in place, as an optimizer step
            head.proj.bias.add_(0.5)
            w1.weight.add_(0.25)


@pytest.mark.parametrize("head", ["vanilla", "rnn", "none"])
def test_packed_forward_equals_one_sequence_at_a_time(hf_data, fixture_paths, head):
    """Sequences packed into one forward give each block what its own sequence's forward
    gives, and the same loss and gradient: no block sees another sequence's context,
    labels or positions."""
    from dspark_vllm.training.blocks import anchor_candidates, block_forward, pack
    from dspark_vllm.training.loss import dspark_loss
    from dspark_vllm.training.train import draft_config, init_trainable_draft, load_target_head

    data = TrainingData(hf_data)
    cfg = TrainConfig(data=str(hf_data), target=fixture_paths["target"], out="unused", head=head, **TINY)
    model = init_trainable_draft(draft_config(cfg, data), *load_target_head(cfg.target), seed=1)
    samples = [data[i] for i in (0, 2, 3)]
    # every candidate, so the last blocks of each sequence run past its end
    anchors = [anchor_candidates(s.loss_mask) for s in samples]

    def loss_and_grads(preds):
        model.zero_grad()
        loss = sum(dspark_loss(p, cfg.loss_weights).numerator for p in preds)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    one = [block_forward(model, s.input_ids, s.loss_mask, s.features, s.last_hidden, a)
           for s, a in zip(samples, anchors)]
    p = pack(samples, anchors)
    assert p.segments.tolist() == sum(([j] * len(s.input_ids) for j, s in enumerate(samples)), [])
    packed = block_forward(model, p.input_ids, p.loss_mask, p.features, p.last_hidden, p.anchors,
                           segments=p.segments)
    mask = torch.cat([o.labels.mask for o in one])
    assert torch.equal(packed.labels.mask, mask) and 0 < mask.sum() < mask.numel()
    live = mask.bool()
    torch.testing.assert_close(packed.logits[live], torch.cat([o.logits for o in one])[live])
    torch.testing.assert_close(packed.target_logits[live], torch.cat([o.target_logits for o in one])[live])
    if head != "none":
        torch.testing.assert_close(packed.confidence_logits[live],
                                   torch.cat([o.confidence_logits for o in one])[live])
    loss_one, grads_one = loss_and_grads(one)
    loss_packed, grads_packed = loss_and_grads([packed])
    torch.testing.assert_close(loss_packed, loss_one)
    assert len(grads_packed) == len(grads_one) > 0
    for a, b in zip(grads_packed, grads_one):
        torch.testing.assert_close(a, b, atol=1e-5 * b.abs().max().item(), rtol=1e-4)  # summation order


def test_block_labels_and_mask():
    from dspark_vllm.training.blocks import anchor_candidates, block_attention_mask, block_labels

    ids = torch.arange(10)
    loss_mask = torch.tensor([0, 0, 0, 1, 1, 1, 1, 1, 1, 0]).bool()  # answer 3..8, then a pad
    assert anchor_candidates(loss_mask).tolist() == [3, 4, 5, 6, 7]
    lab = block_labels(ids, loss_mask, torch.tensor([3, 7]), 4)
    assert lab.labels.tolist() == [[4, 5, 6, 7], [8, 9, 9, 9]]
    assert lab.mask.tolist() == [[1, 1, 1, 1], [1, 0, 0, 0]]  # stops at the answer's end
    mask = block_attention_mask(10, torch.tensor([3, 7]), 2)
    assert mask[0, :10].tolist() == [True] * 3 + [False] * 7  # context strictly before the anchor
    assert mask[2, :10].tolist() == [True] * 7 + [False] * 3
    assert mask[:, 10:].tolist() == [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]]


def test_loss_weights_and_tau():
    from dspark_vllm.training.blocks import BlockLabels, BlockPredictions
    from dspark_vllm.training.loss import AcceptanceStats, LossWeights, dspark_loss, position_weights

    assert position_weights(3, 4.0).tolist() == pytest.approx([1, 0.7788, 0.6065], abs=1e-4)
    logits = torch.tensor([[[0.0, 0.0], [5.0, -5.0]]])
    pred = BlockPredictions(logits, torch.zeros(1, 2), logits.clone(),
                            BlockLabels(torch.tensor([[0, 0]]), torch.tensor([[1, 2]]), torch.ones(1, 2)))
    parts = dspark_loss(pred, LossWeights(ce=0.0, l1=1.0, confidence=0.0))
    assert parts.numerator.item() == pytest.approx(0.0, abs=1e-6)  # identical distributions
    assert parts.accept[0].tolist() == pytest.approx([1.0, 1.0])
    stats = AcceptanceStats(2)
    stats.add(torch.tensor([[0.5, 0.5]]), torch.ones(1, 2))
    assert stats.summary()["tau_probabilistic"] == pytest.approx(1 + 0.5 + 0.25)


# -- resume is exact ---------------------------------------------------------------------

def test_resume_is_bit_identical(hf_data, fixture_paths, tmp_path):
    kw = dict(data=str(hf_data), target=fixture_paths["target"], steps=12, checkpoint_every=4, head="rnn", **TINY)
    full = train(TrainConfig(out=str(tmp_path / "full"), **kw))
    part = train(TrainConfig(out=str(tmp_path / "resumed"), stop_at=5, **kw))
    assert part.checkpoint is None and part.steps_done == 5
    with pytest.raises(ValueError, match="resume"):
        train(TrainConfig(out=str(tmp_path / "resumed"), **kw))
    with pytest.raises(ValueError, match="lr"):
        train(TrainConfig(out=str(tmp_path / "resumed"), resume=True, **{**kw, "lr": 1e-3}))
    rest = train(TrainConfig(out=str(tmp_path / "resumed"), resume=True, **kw))
    assert len(rest.losses) == 7 and rest.losses == full.losses[5:]
    a = load_file(str(full.checkpoint / "model.safetensors"))
    b = load_file(str(rest.checkpoint / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def test_packing_the_batch_trains_the_same_drafter(hf_data, fixture_paths, tmp_path):
    """pack=2 (the step's two sequences in one forward) follows pack=1's run step for step."""
    kw = dict(data=str(hf_data), target=fixture_paths["target"], steps=4, head="vanilla", **TINY)
    one = train(TrainConfig(out=str(tmp_path / "one"), **kw))
    two = train(TrainConfig(out=str(tmp_path / "two"), pack=2, **kw))
    assert len(one.losses) == len(two.losses) == 4
    torch.testing.assert_close(torch.tensor(two.losses), torch.tensor(one.losses), atol=1e-4, rtol=1e-4)
    assert two.metrics["tau_probabilistic"] == pytest.approx(one.metrics["tau_probabilistic"], rel=1e-4)
    a = load_file(str(one.checkpoint / "model.safetensors"))
    b = load_file(str(two.checkpoint / "model.safetensors"))
    assert a.keys() == b.keys()
    for n in a:
        torch.testing.assert_close(b[n].float(), a[n].float(), atol=1e-4, rtol=1e-3)


def test_dflash_ablation_has_no_heads(hf_data, fixture_paths, tmp_path):
    from dspark_vllm.model.checkpoint import load_draft_model

    cfg = TrainConfig(data=str(hf_data), target=fixture_paths["target"], out=str(tmp_path), head="none",
                      steps=3, target_layer_ids=[0, 2], **TINY)
    assert (cfg.loss_weights.ce, cfg.loss_weights.l1, cfg.loss_weights.confidence) == (1.0, 0.0, 0.0)
    model = load_draft_model(train(cfg).checkpoint)
    assert model.markov_head is None and model.confidence_head is None
    assert model.config.target_layer_ids == (0, 2) and model.fc.in_features == 2 * 128


# -- Ray ------------------------------------------------------------------------------------

@pytest.mark.slow
def test_ray_data_and_two_worker_training(fixture_paths, prompt_file, hf_data, tmp_path):
    import ray

    from dspark_vllm.model.checkpoint import load_draft_model
    from dspark_vllm.training.ray_scale import make_training_data_ray, train_ray

    ray.init(num_cpus=2, include_dashboard=False)
    try:
        out = make_training_data_ray(data_config(fixture_paths, prompt_file, tmp_path / "d", shard_size=1), 2)
        data = TrainingData(out)
        assert data.index["complete"] and len(data) == 5 and len(data.index["shards"]) == 5
        single = TrainingData(hf_data)  # same samples as the single-process store
        assert torch.equal(data[4].input_ids, single[4].input_ids)
        result = train_ray(TrainConfig(data=str(out), target=fixture_paths["target"], out=str(tmp_path / "o"),
                                       steps=4, **TINY), num_workers=2)
    finally:
        ray.shutdown()
    assert result.metrics["step"] == 4 and "tau_probabilistic" in result.metrics
    model = load_draft_model(result.checkpoint)
    assert model.markov_head is not None


# -- end to end with vLLM -------------------------------------------------------------------

ENGINE = dict(max_model_len=512, enforce_eager=True, dtype="float32", seed=0)


@pytest.fixture(scope="module")
def vllm_data(fixture_paths, prompt_file, tmp_path_factory):
    cfg = data_config(fixture_paths, prompt_file, tmp_path_factory.mktemp("vllm_data"), generator="vllm",
                      shard_size=4)
    out = make_training_data(cfg)
    gc.collect()
    return out


@pytest.fixture(scope="module")
def trained(vllm_data, fixture_paths, tmp_path_factory):
    cfg = TrainConfig(data=str(vllm_data), target=fixture_paths["target"], out=str(tmp_path_factory.mktemp("ckpt")),
                      steps=40, checkpoint_every=0, **TINY)
    return train(cfg)


@pytest.mark.slow
def test_vllm_data_and_training_loss_goes_down(vllm_data, trained):
    data = TrainingData(vllm_data)
    assert data.index["generation"]["generator"] == "vllm" and len(data) == 5
    assert all(s.loss_mask.sum() >= 2 for s in (data[i] for i in range(len(data))))
    first, last = sum(trained.losses[:5]) / 5, sum(trained.losses[-5:]) / 5
    assert last < 0.8 * first, trained.losses
    assert 1.0 <= trained.metrics["tau_probabilistic"] <= 8.0


@pytest.mark.slow
def test_trained_drafter_is_exact_in_the_plugin(trained, fixture_paths):
    import dspark_vllm
    from dspark_vllm.model.checkpoint import load_draft_model
    from vllm import LLM, SamplingParams
    from transformers import AutoTokenizer

    load_draft_model(trained.checkpoint)
    tok = AutoTokenizer.from_pretrained(fixture_paths["target"])
    prompts = [{"prompt_token_ids": tok(p).input_ids} for p in PROMPTS]
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)

    def greedy(**kw):
        llm = LLM(model=fixture_paths["target"], **ENGINE, **kw)
        outs = [tuple(o.outputs[0].token_ids) for o in llm.generate(prompts, params, use_tqdm=False)]
        del llm
        gc.collect()
        return outs

    expected = greedy()
    assert greedy(**dspark_vllm.engine_kwargs(str(trained.checkpoint))) == expected
