"""Tests for scoring: left padding, label words, multiple choice, continuation log-probs, truncation and
greedy generation, on tiny random Llamas with the SmolLM2 tokenizer."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import build_small_lm

from zo_objectives.scoring import ChoicePredictor, GenerationPredictor, LabelWordPredictor, left_pad, predictor_for

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
    lw = LabelWordPredictor(tokenizer, WORDS)
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
    lw = LabelWordPredictor(tokenizer, WORDS)
    scores = lw.scores(small_lm, BATCH)
    expected = torch.nn.functional.cross_entropy(scores, torch.tensor([ex["label"] for ex in BATCH]))
    assert lw.cross_entropy(small_lm, BATCH) == pytest.approx(float(expected), abs=1e-5)


def test_multi_token_label_word_raises_naming_it(tokenizer):
    word = " antidisestablishmentarianism"
    assert len(tokenizer.encode(word, add_special_tokens=False)) > 1
    with pytest.raises(ValueError, match="antidisestablishmentarianism"):
        LabelWordPredictor(tokenizer, [" positive", word])


def test_repeated_label_words_raise(tokenizer):
    with pytest.raises(ValueError, match="repeated"):
        LabelWordPredictor(tokenizer, [" yes", " yes"])


MC_BATCH = [
    {"prompt": "The man broke his toe. What was the cause?",
     "candidates": [" He dropped a hammer on his foot.", " He got a hole in his sock."], "label": 0},
    {"prompt": "I wanted to conserve energy.", "candidates": [" I swept the floor.", " I turned off the lights",
                                                              " Sleep."], "label": 1},
    {"prompt": "Hi", "candidates": [" a", " b c d e f g h"], "label": 1},
]


@pytest.mark.parametrize("length_normalize", [True, False])
def test_multiple_choice_batch_equals_one_at_a_time(tokenizer, small_lm, length_normalize):
    mc = ChoicePredictor(tokenizer, length_normalize=length_normalize)
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
    pred = GenerationPredictor(tokenizer)
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


def test_continuation_logprobs_of_a_short_sequence_beside_a_long_continuation(tokenizer, small_lm):
    """The logits kept per sequence are set by the longest continuation; a group of shorter sequences (here a group
    of one: 3 tokens beside a 9-token continuation) is padded to that many positions, and scores as in one group."""
    prompts, conts = ["Hi", "Q: Who wrote Hamlet?\nA:"], [" 4", " William Shakespeare, in London, around 1600"]
    assert len(tokenizer.encode(prompts[0] + conts[0])) < len(tokenizer.encode(conts[1]))
    together, alone = GenerationPredictor(tokenizer), GenerationPredictor(tokenizer)
    alone.group_size = 1
    expected, _ = together.continuation_logprobs(small_lm, prompts, conts)
    assert torch.allclose(alone.continuation_logprobs(small_lm, prompts, conts)[0], expected, atol=1e-4)


def test_empty_continuation_raises(tokenizer, small_lm):
    with pytest.raises(ValueError, match="empty"):
        GenerationPredictor(tokenizer).continuation_logprobs(small_lm, ["x"], [""])


def long_prompt(n_words=150):
    return " ".join(f"word{i % 37}" for i in range(n_words)) + ". It was"


def greedy_reference(model, tokenizer, ids: list[int], max_new_tokens: int) -> str:
    """Greedy decoding one token at a time on an unpadded sequence, cut at the first newline and stripped."""
    ids = list(ids)
    out: list[int] = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            token = int(model(input_ids=torch.tensor([ids + out])).logits[0, -1].argmax())
            if token == model.generation_config.eos_token_id:
                break
            out.append(token)
    return tokenizer.decode(out, skip_special_tokens=True).split("\n")[0].strip()


def test_long_prompts_truncated_from_the_left(tokenizer, small_lm):
    prompt = long_prompt()
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    assert len(ids) > 64  # longer than the model's 64 positions
    lw = LabelWordPredictor(tokenizer, WORDS, max_length=10)
    with pytest.warns(UserWarning, match=rf"1 of 2 prompts cut from the left to fit 10 tokens: {len(ids) - 10} tokens "
                                         rf"cut, the longest prompt has {len(ids)} tokens"):
        scores = lw.scores(small_lm, [{"prompt": prompt}, {"prompt": "Short. It was"}])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per predictor
        assert torch.equal(lw.scores(small_lm, [{"prompt": prompt}, {"prompt": "Short. It was"}]), scores)
    with torch.no_grad():
        logits = small_lm(input_ids=torch.tensor([ids[-10:]])).logits[0, -1]
    torch.testing.assert_close(scores[0], logits[lw.label_ids], atol=1e-4, rtol=0)
    # without max_length the model's context bounds the prompt: no error, the end of the prompt is kept
    with pytest.warns(UserWarning, match=f"fit 64 tokens: {len(ids) - 64} tokens cut"):
        full = LabelWordPredictor(tokenizer, WORDS).scores(small_lm, [{"prompt": prompt}])
    with torch.no_grad():
        logits = small_lm(input_ids=torch.tensor([ids[-64:]])).logits[0, -1]
    torch.testing.assert_close(full[0], logits[lw.label_ids], atol=1e-4, rtol=0)


def test_long_prompts_truncated_for_candidates_and_generation(tokenizer, small_lm):
    prompt = long_prompt()
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    cont = tokenizer.encode(" good", add_special_tokens=False)
    mc = ChoicePredictor(tokenizer, max_length=12)
    with pytest.warns(UserWarning, match=f"cut from the left to fit {12 - len(cont)} tokens"):
        scores = mc.scores(small_lm, [{"prompt": prompt, "candidates": [" good", " bad"], "label": 0}])
    lp = full_logprobs(small_lm, ids[-(12 - len(cont)):] + cont)
    expected = sum(float(lp[12 - len(cont) - 1 + t, tok]) for t, tok in enumerate(cont)) / len(cont)
    assert float(scores[0, 0]) == pytest.approx(expected, abs=1e-4)
    # the model's own context (64) bounds prompt + continuation when max_length is not given
    with pytest.warns(UserWarning, match="cut from the left"):
        assert torch.isfinite(ChoicePredictor(tokenizer).scores(
            small_lm, [{"prompt": prompt, "candidates": [" good", " bad"], "label": 0}])).all()
    # generation keeps the prompt's last 64 - max_new_tokens tokens: as greedy decoding of those alone
    with pytest.warns(UserWarning, match=f"1 of 2 prompts cut from the left to fit 60 tokens: {len(ids) - 60} tokens"):
        out = GenerationPredictor(tokenizer, max_new_tokens=4).generate(small_lm, [prompt, "Hi"])
    hi = tokenizer.encode("Hi", add_special_tokens=False)
    assert out == [greedy_reference(small_lm, tokenizer, ids[-60:], 4), greedy_reference(small_lm, tokenizer, hi, 4)]
    assert out[0]  # the comparison means something: the random model says something
    with pytest.raises(ValueError, match="max_new_tokens=64 leaves no room for a prompt in the 64-token limit"):
        GenerationPredictor(tokenizer, max_new_tokens=64).generate(small_lm, ["Hi"])


def test_label_words_without_a_leading_space_warn_after_prompts_that_end_in_a_word(tokenizer, small_lm):
    bare = LabelWordPredictor(tokenizer, ["Yes", "No"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bare.scores(small_lm, [{"prompt": "Is it true? Yes or No?\n"}])  # after a newline: as RTE writes them
        LabelWordPredictor(tokenizer, WORDS).scores(small_lm, BATCH)  # leading spaces: nothing to say
    with pytest.warns(UserWarning, match=r"label words \['Yes', 'No'\] have no leading space.*' Yes'"):
        bare.scores(small_lm, [{"prompt": "Is it true? Answer:"}])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per predictor
        bare.scores(small_lm, [{"prompt": "Is it true? Answer:"}])


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
    raw = GenerationPredictor(tokenizer, max_new_tokens=4, stop=()).generate(chain_lm, prompts)
    assert raw == ["hello\n world"] * 2  # no stop string: the newline stays (outer whitespace stripped)
    out = GenerationPredictor(tokenizer, max_new_tokens=6).generate(chain_lm, prompts)
    assert out == ["hello", "hello"]
    assert GenerationPredictor(tokenizer, max_new_tokens=6).predict(chain_lm, [{"prompt": p} for p in prompts]) == out
    # max_new_tokens bounds the output
    assert GenerationPredictor(tokenizer, max_new_tokens=1, stop=()).generate(chain_lm, prompts) == ["hello", "hello"]
    # another stop string
    world = GenerationPredictor(tokenizer, max_new_tokens=4, stop=(" world",))
    assert world.generate(chain_lm, prompts) == ["hello"] * 2


def test_generation_on_random_model_is_greedy_decoding_of_each_prompt_alone(tokenizer, small_lm):
    out = GenerationPredictor(tokenizer, max_new_tokens=8).generate(small_lm, PROMPTS)  # left-padded together
    expected = [greedy_reference(small_lm, tokenizer, tokenizer.encode(p, add_special_tokens=False), 8)
                for p in PROMPTS]
    assert out == expected
    assert len(set(out)) > 1 and all("\n" not in t and t == t.strip() for t in out)


def test_generation_sampling_is_seeded_and_leaves_global_rng(tokenizer, small_lm):
    gen = GenerationPredictor(tokenizer, max_new_tokens=6, temperature=1.5, stop=())
    torch.manual_seed(0)
    before = torch.get_rng_state()
    first = gen.generate(small_lm, PROMPTS[:3])
    assert torch.equal(torch.get_rng_state(), before)
    assert gen.generate(small_lm, PROMPTS[:3]) == first
    # sampling differs from greedy, and another sample_seed draws other texts
    greedy = GenerationPredictor(tokenizer, max_new_tokens=6, stop=()).generate(small_lm, PROMPTS[:3])
    other = GenerationPredictor(tokenizer, max_new_tokens=6, temperature=1.5, stop=(), sample_seed=1)
    assert first != greedy and other.generate(small_lm, PROMPTS[:3]) != first


def test_generation_invalid_max_new_tokens(tokenizer):
    with pytest.raises(ValueError, match="max_new_tokens"):
        GenerationPredictor(tokenizer, max_new_tokens=0)


def test_predictor_for_task_kinds(tokenizer):
    from tasks import get_task

    assert isinstance(predictor_for(get_task("sst2"), tokenizer), LabelWordPredictor)
    assert isinstance(predictor_for(get_task("copa"), tokenizer), ChoicePredictor)
    gen = predictor_for(get_task("squad"), tokenizer, max_length=100)
    assert isinstance(gen, GenerationPredictor) and gen.max_length == 100


def test_candidate_scores_are_continuation_logprobs_padded_with_minus_inf(tokenizer, small_lm):
    gen = GenerationPredictor(tokenizer)
    prompts, candidates = ["Q: capital? A:", "Q: colour? A:"], [[" Paris", " the city of Lyon"], [" blue"]]
    scores = gen.candidate_scores(small_lm, prompts, candidates)
    assert scores.shape == (2, 2) and scores[1, 1] == float("-inf")
    for row, cands in enumerate(candidates):
        total, _ = gen.continuation_logprobs(small_lm, [prompts[row]] * len(cands), cands)
        assert torch.allclose(scores[row, : len(cands)], total, atol=1e-4)
    mean = gen.candidate_scores(small_lm, prompts, candidates, length_normalize=True)
    lyon = tokenizer.encode(" the city of Lyon", add_special_tokens=False)
    assert mean[0, 1] == pytest.approx(float(scores[0, 1]) / len(lyon), rel=1e-4)


def test_tokenizer_without_a_pad_token_pads_with_eos(tokenizer, small_lm):
    """Many causal LMs ship no pad token: padding falls back to end-of-sequence (masked out), same scores."""
    import copy

    bare = copy.deepcopy(tokenizer)
    bare.pad_token = None
    assert bare.pad_token_id is None and bare.eos_token_id is not None
    for make in (lambda tok: LabelWordPredictor(tok, WORDS), lambda tok: ChoicePredictor(tok)):
        batch = [{**ex, "candidates": WORDS} for ex in BATCH]
        assert torch.allclose(make(bare).scores(small_lm, batch), make(tokenizer).scores(small_lm, batch), atol=1e-5)
    assert (GenerationPredictor(bare, max_new_tokens=4).generate(small_lm, PROMPTS)
            == GenerationPredictor(tokenizer, max_new_tokens=4).generate(small_lm, PROMPTS))


def test_chat_formatted_puts_prompts_in_the_chat_template(tokenizer):
    import copy

    from zo_objectives.scoring import chat_formatted

    examples = [{"prompt": "Question: who? Answer:", "answers": ["me"]}]
    (chat,) = chat_formatted(examples, tokenizer)
    assert tokenizer.chat_template and chat["answers"] == ["me"] and examples[0]["prompt"] == "Question: who? Answer:"
    assert chat["prompt"] == tokenizer.apply_chat_template([{"role": "user", "content": "Question: who? Answer:"}],
                                                           tokenize=False, add_generation_prompt=True)
    assert chat["prompt"].index("Question: who? Answer:") < chat["prompt"].rindex("assistant")  # the answer follows
    bare = copy.deepcopy(tokenizer)
    bare.chat_template = None
    with pytest.raises(ValueError, match="has no chat template"):
        chat_formatted(examples, bare)


def test_lm_head_gets_a_contiguous_input_once_hooked(tokenizer, small_lm):
    """transformers hands the head a strided slice (``logits_to_keep``); a frozen bf16 head then takes a slow CPU
    kernel that copies its weight per row, so scoring makes the head's input contiguous (one hook per model)."""
    lw = LabelWordPredictor(tokenizer, WORDS)
    before = lw.scores(small_lm, BATCH)
    head = small_lm.get_output_embeddings()
    seen = []
    head.register_forward_pre_hook(lambda module, args: seen.append(args[0].is_contiguous()))
    small_lm.requires_grad_(False)  # a frozen head, as under LoRA
    torch.testing.assert_close(lw.scores(small_lm, BATCH), before, atol=1e-5, rtol=0)
    lw.scores(small_lm, BATCH)
    assert seen and all(seen)
    assert len(head._forward_pre_hooks) == 2  # ours, once, and the test's
