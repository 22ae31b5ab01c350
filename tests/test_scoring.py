"""Tests for scoring: left padding, label words, multiple choice, continuation log-probs, truncation and
greedy generation, on tiny random Llamas with the SmolLM2 tokenizer."""

from __future__ import annotations

import pytest
import torch
from conftest import build_small_lm

from zo_objectives.scoring import Generation, LabelWords, MultipleChoice, left_pad, predictor_for

WORDS = [" positive", " negative", " neutral"]
PROMPTS = ["This movie was great. It was", "Bad.", "An utterly forgettable two hours, with one good scene. It was",
           "Fine, I guess", "Wow"]
BATCH = [{"prompt": p, "label": i % 3} for i, p in enumerate(PROMPTS)]


def full_logprobs(model, ids: list[int]) -> torch.Tensor:
    """Log-probabilities of a single unpadded sequence, position t predicting t + 1."""
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].float().log_softmax(-1)


def test_left_pad_positions():
    ids, mask, pos = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert pos.tolist() == [[0, 1, 2], [0, 0, 0]]


def test_label_words_batch_equals_one_at_a_time(tokenizer, small_lm):
    lw = LabelWords(tokenizer, WORDS)
    batched = lw.scores(small_lm, BATCH)
    assert batched.shape == (len(BATCH), 3)
    single = torch.cat([lw.scores(small_lm, [ex]) for ex in BATCH])
    torch.testing.assert_close(batched, single, atol=1e-4, rtol=0)
    # the comparison means something: prompts score differently by far more than the tolerance
    assert float((batched - batched[0]).abs().max()) > 0.1
    # and the single-example scores are the label-word logits of a plain forward pass
    ids = tokenizer.encode(PROMPTS[2], add_special_tokens=False)
    with torch.no_grad():
        logits = small_lm(input_ids=torch.tensor([ids])).logits[0, -1]
    torch.testing.assert_close(single[2], logits[lw.label_ids], atol=1e-4, rtol=0)
    assert lw.predict(small_lm, BATCH) == batched.argmax(-1).tolist()


def test_label_words_cross_entropy(tokenizer, small_lm):
    lw = LabelWords(tokenizer, WORDS)
    scores = lw.scores(small_lm, BATCH)
    expected = torch.nn.functional.cross_entropy(scores, torch.tensor([ex["label"] for ex in BATCH]))
    assert lw.cross_entropy(small_lm, BATCH) == pytest.approx(float(expected), abs=1e-5)


def test_multi_token_label_word_raises_naming_it(tokenizer):
    word = " antidisestablishmentarianism"
    assert len(tokenizer.encode(word, add_special_tokens=False)) > 1
    with pytest.raises(ValueError, match="antidisestablishmentarianism"):
        LabelWords(tokenizer, [" positive", word])


def test_repeated_label_words_raise(tokenizer):
    with pytest.raises(ValueError, match="repeated"):
        LabelWords(tokenizer, [" yes", " yes"])


MC_BATCH = [
    {"prompt": "The man broke his toe. What was the cause?",
     "candidates": [" He dropped a hammer on his foot.", " He got a hole in his sock."], "label": 0},
    {"prompt": "I wanted to conserve energy.", "candidates": [" I swept the floor.", " I turned off the lights",
                                                              " Sleep."], "label": 1},
    {"prompt": "Hi", "candidates": [" a", " b c d e f g h"], "label": 1},
]


@pytest.mark.parametrize("length_normalize", [True, False])
def test_multiple_choice_batch_equals_one_at_a_time(tokenizer, small_lm, length_normalize):
    mc = MultipleChoice(tokenizer, length_normalize=length_normalize)
    batched = mc.scores(small_lm, MC_BATCH)
    assert batched.shape == (3, 3)
    assert torch.isinf(batched[0, 2]) and batched[0, 2] < 0 and torch.isinf(batched[2, 2])
    for row, ex in enumerate(MC_BATCH):
        single = mc.scores(small_lm, [ex])[0]
        k = len(ex["candidates"])
        torch.testing.assert_close(batched[row, :k], single, atol=1e-4, rtol=0)
        # against a manual, unpadded computation
        prompt = tokenizer.encode(ex["prompt"], add_special_tokens=False)
        for c, cand in enumerate(ex["candidates"]):
            cont = tokenizer.encode(cand, add_special_tokens=False)
            lp = full_logprobs(small_lm, prompt + cont)
            total = sum(float(lp[len(prompt) - 1 + t, tok]) for t, tok in enumerate(cont))
            expected = total / len(cont) if length_normalize else total
            assert float(batched[row, c]) == pytest.approx(expected, abs=1e-4)
    assert mc.predict(small_lm, MC_BATCH) == batched.argmax(-1).tolist()
    labels = torch.tensor([ex["label"] for ex in MC_BATCH])
    assert mc.cross_entropy(small_lm, MC_BATCH) == pytest.approx(
        float(torch.nn.functional.cross_entropy(batched, labels)), abs=1e-5)


def test_continuation_logprobs_match_full_forward(tokenizer, small_lm):
    pred = Generation(tokenizer)
    prompts = ["Q: Who wrote Hamlet?\nA:", "2+2=", "A much longer prompt, with several words in it, ends here:"]
    conts = [" William Shakespeare", " 4", " yes"]
    total, count = pred.continuation_logprobs(small_lm, prompts, conts)
    for i, (p, c) in enumerate(zip(prompts, conts)):
        p_ids = tokenizer.encode(p, add_special_tokens=False)
        c_ids = tokenizer.encode(c, add_special_tokens=False)
        lp = full_logprobs(small_lm, p_ids + c_ids)
        expected = sum(float(lp[len(p_ids) - 1 + t, tok]) for t, tok in enumerate(c_ids))
        assert float(total[i]) == pytest.approx(expected, abs=1e-4)
        assert float(count[i]) == len(c_ids)
    batch = [{"prompt": p, "target": c} for p, c in zip(prompts, conts)]
    assert pred.cross_entropy(small_lm, batch) == pytest.approx(float(-total.sum() / count.sum()), abs=1e-5)


def test_empty_continuation_raises(tokenizer, small_lm):
    with pytest.raises(ValueError, match="empty"):
        Generation(tokenizer).continuation_logprobs(small_lm, ["x"], [""])


def long_prompt(n_words=150):
    return " ".join(f"word{i % 37}" for i in range(n_words)) + ". It was"


def test_long_prompts_truncated_from_the_left(tokenizer, small_lm):
    prompt = long_prompt()
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    assert len(ids) > 64  # longer than the model's 64 positions
    lw = LabelWords(tokenizer, WORDS, max_length=10)
    scores = lw.scores(small_lm, [{"prompt": prompt}, {"prompt": "Short. It was"}])
    with torch.no_grad():
        logits = small_lm(input_ids=torch.tensor([ids[-10:]])).logits[0, -1]
    torch.testing.assert_close(scores[0], logits[lw.label_ids], atol=1e-4, rtol=0)
    # without max_length the model's context bounds the prompt: no error, the end of the prompt is kept
    full = LabelWords(tokenizer, WORDS).scores(small_lm, [{"prompt": prompt}])
    with torch.no_grad():
        logits = small_lm(input_ids=torch.tensor([ids[-64:]])).logits[0, -1]
    torch.testing.assert_close(full[0], logits[lw.label_ids], atol=1e-4, rtol=0)


def test_long_prompts_truncated_for_candidates_and_generation(tokenizer, small_lm):
    prompt = long_prompt()
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    cont = tokenizer.encode(" good", add_special_tokens=False)
    mc = MultipleChoice(tokenizer, max_length=12)
    scores = mc.scores(small_lm, [{"prompt": prompt, "candidates": [" good", " bad"], "label": 0}])
    lp = full_logprobs(small_lm, ids[-(12 - len(cont)):] + cont)
    expected = sum(float(lp[12 - len(cont) - 1 + t, tok]) for t, tok in enumerate(cont)) / len(cont)
    assert float(scores[0, 0]) == pytest.approx(expected, abs=1e-4)
    # the model's own context (64) bounds prompt + continuation when max_length is not given
    assert torch.isfinite(MultipleChoice(tokenizer).scores(
        small_lm, [{"prompt": prompt, "candidates": [" good", " bad"], "label": 0}])).all()
    out = Generation(tokenizer, max_new_tokens=4).generate(small_lm, [prompt, "Hi"])
    assert len(out) == 2 and all(isinstance(t, str) for t in out)


# --- generation ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def chain_lm(tokenizer):
    """A one-layer Llama that, greedily, continues ":" with " hello", " hello" with "\\n", "\\n" with " world"
    and " world" with "\\n": the attention and MLP outputs are zeroed, so each logit row depends only on the
    current token, and the embeddings / output rows of those four tokens are chosen to form that chain."""
    tok = {s: tokenizer.encode(s, add_special_tokens=False) for s in (":", " hello", "\n", " world")}
    assert all(len(v) == 1 for v in tok.values())
    colon, hello, newline, world = (tok[s][0] for s in (":", " hello", "\n", " world"))
    model = build_small_lm(len(tokenizer), layers=1)
    layer = model.model.layers[0]
    with torch.no_grad():
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
        emb, head = model.model.embed_tokens.weight, model.lm_head.weight
        head[:, :4] = 0.0
        head.mul_(0.05)
        for k, t in enumerate((colon, hello, newline, world)):
            emb[t] = 0.0
            emb[t, k] = 1.0
        head[hello, 0] = 10.0  # after ":" (direction 0)
        head[newline, 1] = 10.0  # after " hello"
        head[world, 2] = 10.0  # after "\n"
        head[newline, 3] = 10.0  # after " world"
    return model.eval()


def test_generation_greedy_stops_at_newline(tokenizer, chain_lm):
    prompts = ["Question: what do you say first? Answer:", "A:"]  # different lengths: left padding
    raw = Generation(tokenizer, max_new_tokens=4, stop=()).generate(chain_lm, prompts)
    assert raw == ["hello\n world"] * 2  # no stop string: the newline stays (outer whitespace stripped)
    out = Generation(tokenizer, max_new_tokens=6).generate(chain_lm, prompts)
    assert out == ["hello", "hello"]
    assert Generation(tokenizer, max_new_tokens=6).predict(chain_lm, [{"prompt": p} for p in prompts]) == out
    # max_new_tokens bounds the output
    assert Generation(tokenizer, max_new_tokens=1, stop=()).generate(chain_lm, prompts) == ["hello", "hello"]
    # another stop string
    assert Generation(tokenizer, max_new_tokens=4, stop=(" world",)).generate(chain_lm, prompts) == ["hello"] * 2


def test_generation_on_random_model_returns_strings_without_newline(tokenizer, small_lm):
    out = Generation(tokenizer, max_new_tokens=8).generate(small_lm, PROMPTS)
    assert len(out) == len(PROMPTS)
    assert all(isinstance(t, str) and "\n" not in t and t == t.strip() for t in out)


def test_generation_sampling_is_seeded_and_leaves_global_rng(tokenizer, small_lm):
    gen = Generation(tokenizer, max_new_tokens=6, temperature=1.5, stop=())
    torch.manual_seed(0)
    before = torch.get_rng_state()
    first = gen.generate(small_lm, PROMPTS[:3])
    assert torch.equal(torch.get_rng_state(), before)
    assert gen.generate(small_lm, PROMPTS[:3]) == first


def test_generation_invalid_max_new_tokens(tokenizer):
    with pytest.raises(ValueError, match="max_new_tokens"):
        Generation(tokenizer, max_new_tokens=0)


def test_predictor_for_task_kinds(tokenizer):
    from tasks import get_task

    assert isinstance(predictor_for(get_task("sst2"), tokenizer), LabelWords)
    assert isinstance(predictor_for(get_task("copa"), tokenizer), MultipleChoice)
    gen = predictor_for(get_task("squad"), tokenizer, max_length=100)
    assert isinstance(gen, Generation) and gen.max_length == 100


def test_candidate_scores_are_continuation_logprobs_padded_with_minus_inf(tokenizer, small_lm):
    gen = Generation(tokenizer)
    prompts, candidates = ["Q: capital? A:", "Q: colour? A:"], [[" Paris", " the city of Lyon"], [" blue"]]
    scores = gen.candidate_scores(small_lm, prompts, candidates)
    assert scores.shape == (2, 2) and scores[1, 1] == float("-inf")
    for row, cands in enumerate(candidates):
        total, _ = gen.continuation_logprobs(small_lm, [prompts[row]] * len(cands), cands)
        assert torch.allclose(scores[row, : len(cands)], total, atol=1e-4)
    mean = gen.candidate_scores(small_lm, prompts, candidates, length_normalize=True)
    assert mean[0, 1] == pytest.approx(float(scores[0, 1]) / len(tokenizer.encode(" the city of Lyon")), rel=1e-4)
