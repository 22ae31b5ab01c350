"""How predictions come from a causal LM: label words, multiple choice, greedy generation; and from a masked LM:
label words at a mask token.

Each predictor takes ``(model, batch)`` where ``batch`` is a list of task examples (dicts with "prompt" and
"candidates"/"label" or "answers"/"target"), and offers ``predict`` (for metrics) and ``cross_entropy``
(the differentiable-style baseline objective). Scoring runs under ``torch.inference_mode`` without a KV
cache, left-padded to the batch's longest sequence with position ids counted from the first real token.
Prompts longer than ``max_length`` tokens (default: the model's context) are truncated from the left (the end
of a prompt is kept), with a warning the first time a predictor cuts one.
"""

from __future__ import annotations

import inspect
import warnings
import zlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from zo_objectives.noise import mix
from zo_objectives.step import current_step

if TYPE_CHECKING:  # type hints only: importing transformers' tokenizers is not needed to score
    from transformers import PreTrainedTokenizerBase

Batch = Sequence[dict]


def prompts_seed(prompts: Sequence[str], salt: int = 0) -> int:
    """A seed fixed by a batch's prompts: both sides of an SPSA estimate draw the same random numbers."""
    return zlib.crc32("\x00".join(prompts).encode(), salt)


def sampling_seed(prompts: Sequence[str], salt: int = 0) -> int:
    """The seed of sampled completions: fixed by the prompts and ``salt``, and inside a MeZO step by the
    optimizer's seed and the step's index too (:func:`zo_objectives.step.current_step`)."""
    step = current_step()
    return prompts_seed(prompts, salt if step is None else mix(*step, salt) & 0xFFFFFFFF)


def context_length(model: torch.nn.Module, default: int = 2048) -> int:
    """The model's maximum number of positions."""
    return int(getattr(model.config, "max_position_embeddings", None) or default)


def cache_argument(model: torch.nn.Module) -> str:
    """The forward argument that takes a KV cache: ``cache`` in recent transformers, ``past_key_values`` before."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # a peft wrapper passes it on
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def _contiguous(module: torch.nn.Module, args: tuple) -> tuple | None:
    x = args[0] if args else None
    return (x.contiguous(), *args[1:]) if isinstance(x, torch.Tensor) and not x.is_contiguous() else None


def model_device(model: torch.nn.Module) -> torch.device:
    """The model's device; first (once per model) a hook that hands its LM head a contiguous input.

    Why: transformers slices the hidden states for ``logits_to_keep`` (``h[:, -k:]``, a strided view), and torch's
    CPU matmul of a strided 3-D input with a weight that does not require grad (a head frozen by LoRA, prefix
    tuning or ``--trainable``) takes a batched kernel that copies the weight once per row: SmolLM2's bf16 head on
    32 rows took 5 s instead of 0.04 s, and a LoRA step 3.7 times a full-parameter one."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if isinstance(head, torch.nn.Module) and not getattr(head, "_zo_contiguous", False):
        head.register_forward_pre_hook(_contiguous)
        head._zo_contiguous = True
    return next(model.parameters()).device


def left_pad(sequences: list[list[int]], pad_id: int,
             width: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-pad token lists to the longest (at least ``width`` positions); return input ids, attention mask and
    position ids (0 at each first real token)."""
    width = max(width, *(len(s) for s in sequences))
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if seq:
            ids[row, width - len(seq):] = torch.tensor(seq)
            mask[row, width - len(seq):] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, positions


class Predictor:
    """Shared tokenization and the forward pass that keeps only the last ``keep`` positions' logits.

    Sequences run in groups of ``group_size``, sorted by length. Under MeZO every forward pass also rebuilds the
    perturbed weights (a pass over them), so a few large groups beat many small ones: with SmolLM2-135M in bf16 on
    SST-2 batches of 16, a step took 1.1-1.35 x two objective evaluations with groups of 16, 1.65-1.8 x with groups
    of 4 (``python benchmarks/group_size.py``)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_length: int | None = None, group_size: int = 16):
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.group_size = group_size
        self._warned_cut = False

    members = 1  # a population's batch holds its examples once per member (zo_objectives.estimators.population)

    def _groups(self, lengths: list[int], keep: list[bool] | None = None) -> list[list[int]]:
        """The rows of each model call: up to ``group_size`` examples, sorted by length (those ``keep`` marks).

        With ``members`` > 1 the rows are ``members`` copies of the examples, one after another, and each call
        holds every member's copy of its examples, grouped by member, as a population's forward hooks expect."""
        n = len(lengths) // self.members
        order = sorted((i for i in range(n) if keep is None or keep[i]), key=lambda i: lengths[i])
        return [[m * n + i for m in range(self.members) for i in order[start:start + self.group_size]]
                for start in range(0, len(order), self.group_size)]

    def _tokens(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    @property
    def pad_id(self) -> int:
        """The id padding positions hold: the pad token, else end-of-sequence (many causal LMs define no pad
        token), else 0. Padded positions are masked out, so any id in the vocabulary serves."""
        for token_id in (self.tokenizer.pad_token_id, self.tokenizer.eos_token_id):
            if token_id is not None:
                return int(token_id)
        return 0

    def _fit(self, prompts: list[list[int]], room: int) -> list[list[int]]:
        """Each prompt's last ``room`` tokens; the first time prompts are cut, a warning says by how much."""
        longest = max(map(len, prompts), default=0)
        if longest > room and not self._warned_cut:
            self._warned_cut = True
            cut = [len(p) - room for p in prompts if len(p) > room]
            warnings.warn(f"{len(cut)} of {len(prompts)} prompts cut from the left to fit {room} tokens: "
                          f"{sum(cut)} tokens cut, the longest prompt has {longest} tokens; the start of a long "
                          "prompt is lost and every step pays for its length: shorten the prompts or set "
                          "max_length (warned once per predictor)", stacklevel=3)
        return [p[max(0, len(p) - room):] for p in prompts]

    def _limit(self, model: torch.nn.Module) -> int:
        return self.max_length or context_length(model)

    def _forward(self, model: torch.nn.Module, sequences: list[list[int]], keep: int) -> torch.Tensor:
        """Logits of the last ``keep`` positions of each sequence, shape (sequences, keep, vocab).

        The sequences run sorted by length in groups of ``group_size``, each padded to its own longest, so a
        batch of mixed lengths computes far fewer padding positions than padded to its single longest; and to at
        least ``keep`` positions, since ``keep`` is set by the batch's longest continuation and a group of short
        sequences can be narrower (the model would return fewer than ``keep`` positions' logits)."""
        device = model_device(model)
        out: list[torch.Tensor] = [torch.empty(0)] * len(sequences)
        for group in self._groups([len(s) for s in sequences]):
            ids, mask, positions = left_pad([sequences[i] for i in group], self.pad_id, width=keep)
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                           position_ids=positions.to(device), use_cache=False, logits_to_keep=keep).logits
            for row, i in enumerate(group):
                out[i] = logits[row, -keep:, :].float()
        return torch.stack(out)

    def continuation_logprobs(self, model: torch.nn.Module, prompts: Sequence[str],
                              continuations: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Sum of log-probabilities of each continuation after its prompt, and its token count."""
        limit = self._limit(model)
        conts = [self._tokens(c) for c in continuations]
        if any(not c for c in conts):
            raise ValueError("an answer candidate or target is empty; every continuation needs a token")
        seqs = []
        for prompt, cont in zip(prompts, conts):
            if len(cont) >= limit:
                raise ValueError(f"a continuation of {len(cont)} tokens leaves no room for its prompt "
                                 f"in the model's {limit}-token context")
            seqs.append(self._fit([self._tokens(prompt)], limit - len(cont))[0] + cont)
        keep = max(len(c) for c in conts) + 1
        with torch.inference_mode():
            logprobs = self._forward(model, seqs, keep).log_softmax(-1)[:, :-1]  # position t predicts t+1
        total = torch.zeros(len(seqs))
        for row, cont in enumerate(conts):
            targets = torch.tensor(cont, device=logprobs.device)
            picked = logprobs[row, keep - 1 - len(cont):].gather(-1, targets[:, None])
            total[row] = picked.sum().cpu()
        return total, torch.tensor([len(c) for c in conts], dtype=torch.float32)

    def candidate_scores(self, model: torch.nn.Module, prompts: Sequence[str],
                         candidates: Sequence[Sequence[str]], length_normalize: bool = False) -> torch.Tensor:
        """Log-likelihood of each prompt's candidate continuations (mean per token with ``length_normalize``),
        shape (prompts, most candidates); missing candidates score -inf.

        Each prompt runs once (in groups of ``group_size``, sorted by length); its KV cache is then copied for
        each of its candidates, which run together, right-padded: a prompt's tokens are not recomputed per
        candidate. Prompt-learning PEFT models (prefix tuning), which bring their own cache, score each
        prompt + candidate sequence whole instead."""
        out = torch.full((len(prompts), max([1, *(len(c) for c in candidates)])), float("-inf"))
        if getattr(getattr(model, "active_peft_config", None), "is_prompt_learning", False):
            flat = [(row, col, c) for row, cands in enumerate(candidates) for col, c in enumerate(cands)]
            if flat:
                total, count = self.continuation_logprobs(model, [prompts[r] for r, _, _ in flat],
                                                          [c for _, _, c in flat])
                for (row, col, _), t, n in zip(flat, total, count):
                    out[row, col] = t / n if length_normalize else t
            return out
        device, limit = model_device(model), self._limit(model)
        conts = [[self._tokens(c) for c in cands] for cands in candidates]
        if any(not c for cands in conts for c in cands):
            raise ValueError("an answer candidate or target is empty; every continuation needs a token")
        prompt_ids = [self._tokens(p) for p in prompts]
        for group in self._groups([len(p) for p in prompt_ids], [bool(c) for c in conts]):
            longest = max(len(c) for i in group for c in conts[i])
            if longest >= limit:
                raise ValueError(f"a continuation of {longest} tokens leaves no room for its prompt "
                                 f"in the model's {limit}-token context")
            ids, mask, positions = left_pad(self._fit([prompt_ids[i] for i in group], limit - longest),
                                            self.pad_id)
            flat = [(row, col) for row, i in enumerate(group) for col in range(len(conts[i]))]
            rows = torch.tensor([row for row, _ in flat])
            tokens = [conts[group[row]][col] for row, col in flat]
            width = max(len(t) for t in tokens)
            cont_ids = torch.full((len(flat), width), self.pad_id, dtype=torch.long)
            cont_mask = torch.zeros((len(flat), width), dtype=torch.long)
            for k, t in enumerate(tokens):
                cont_ids[k, : len(t)], cont_mask[k, : len(t)] = torch.tensor(t), 1
            with torch.inference_mode():
                first = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                              position_ids=positions.to(device), use_cache=True, logits_to_keep=1)
                cache = first.past_key_values
                cache.reorder_cache(rows.to(device))  # one copy of its prompt's cache per candidate
                rest = model(input_ids=cont_ids.to(device),
                             attention_mask=torch.cat([mask[rows], cont_mask], 1).to(device),
                             position_ids=(positions[rows, -1:] + 1 + torch.arange(width)).to(device),
                             **{cache_argument(model): cache}, use_cache=True).logits
                logits = torch.cat([first.logits[rows.to(device), -1:], rest[:, :-1]], 1).float().log_softmax(-1)
            picked = logits.gather(-1, cont_ids.to(device)[..., None])[..., 0].cpu() * cont_mask
            for k, (row, col) in enumerate(flat):
                total = float(picked[k].sum())
                out[group[row], col] = total / len(tokens[k]) if length_normalize else total
        return out


class ClassScores(Predictor):
    """A predictor that scores each example's classes (or candidates): ``scores(model, batch)`` of shape
    (batch, classes). The prediction is the best-scoring class; the cross-entropy is that of the gold class
    under softmax(scores), as MeZO's prompt-based classification trains."""

    def scores(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        raise NotImplementedError

    def predict(self, model: torch.nn.Module, batch: Batch) -> list[int]:
        return self.scores(model, batch).argmax(-1).tolist()

    def cross_entropy(self, model: torch.nn.Module, batch: Batch) -> float:
        labels = torch.tensor([ex["label"] for ex in batch])
        return float(F.cross_entropy(self.scores(model, batch), labels))


class LabelWordPredictor(ClassScores):
    """Classification by the next-token logits of one single-token label word per class (one forward pass).

    A label word without a leading space after a prompt that ends in a word (" It was" + "great") is scored
    glued to that word: the first batch where that happens warns (" great" is what a reader would write)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, label_words: Sequence[str], max_length: int | None = None):
        super().__init__(tokenizer, max_length)
        ids = []
        for word in label_words:
            tokens = self._tokens(word)
            if len(tokens) != 1:
                raise ValueError(f"label word {word!r} is {len(tokens)} tokens {tokens}; label words must be one "
                                 "token each (try a leading space, or use a multiple-choice task)")
            ids.append(tokens[0])
        if len(set(ids)) != len(ids):
            raise ValueError(f"label words {list(label_words)} map to repeated tokens {ids}")
        self.label_words, self.label_ids = list(label_words), torch.tensor(ids)
        self._checked_spaces = all(w[:1].isspace() for w in self.label_words)  # True: nothing to warn about

    def _check_spaces(self, prompts: list[str]) -> None:
        glued = [p for p in prompts if p[-1:] and not p[-1:].isspace()]
        if glued:
            self._checked_spaces = True
            bare = [w for w in self.label_words if not w[:1].isspace()]
            warnings.warn(f"label words {bare} have no leading space but prompts end in a word "
                          f"(...{glued[0][-20:]!r}): each is scored as glued to it; write them with a leading "
                          f"space ({' ' + bare[0]!r}) unless the prompts end in a space or newline", stacklevel=3)

    def scores(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        """Logits of the label words at the next position, shape (batch, classes)."""
        if not self._checked_spaces:
            self._check_spaces([ex["prompt"] for ex in batch])
        seqs = self._fit([self._tokens(ex["prompt"]) for ex in batch], self._limit(model))
        with torch.inference_mode():
            logits = self._forward(model, seqs, keep=1)[:, -1]
        return logits[:, self.label_ids.to(logits.device)].cpu()


class MaskedLabelWordPredictor(LabelWordPredictor):
    """Classification by a masked LM (RoBERTa, BERT): the label words' logits at the prompt's mask token, as the
    prompt-based fine-tuning of LM-BFF (Gao et al., 2021) and of MeZO's RoBERTa-large experiments scores them.

    A prompt without the tokenizer's mask token gets one where its label word would follow (after a space when
    the label words start with one): "... It was <mask>". Each prompt runs with the tokenizer's special tokens
    ("<s> ... </s>"), right-padded, the model counting its own positions; a prompt longer than the model's
    context loses its start (with a warning), and must keep its one mask token."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, label_words: Sequence[str], max_length: int | None = None):
        if tokenizer.mask_token is None:
            raise ValueError("a masked LM predicts at a mask token, but this tokenizer has none (mask_token is None)")
        super().__init__(tokenizer, label_words, max_length)
        self._checked_spaces = True  # the mask stands where the word goes: nothing is glued to the prompt
        framed = tokenizer.encode(tokenizer.mask_token, add_special_tokens=True)  # e.g. [<s>, <mask>, </s>]
        cut = framed.index(tokenizer.mask_token_id)
        self.prefix, self.suffix = framed[:cut], framed[cut + 1:]

    def masked_prompt(self, prompt: str) -> str:
        """The prompt with its mask token (appended where the label word goes, unless the prompt holds one)."""
        mask = self.tokenizer.mask_token
        if mask in prompt:
            return prompt
        spaced = all(w[:1].isspace() for w in self.label_words) and not prompt[-1:].isspace()
        return prompt + (" " if spaced else "") + mask

    def _limit(self, model: torch.nn.Module) -> int:
        return self.max_length or min(self.tokenizer.model_max_length, context_length(model))

    def scores(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        """Logits of the label words at the mask token, shape (batch, classes)."""
        room = self._limit(model) - len(self.prefix) - len(self.suffix)
        bodies = self._fit([self._tokens(self.masked_prompt(ex["prompt"])) for ex in batch], room)
        mask_id = self.tokenizer.mask_token_id
        for body, ex in zip(bodies, batch):
            if body.count(mask_id) != 1:
                raise ValueError(f"a masked-LM prompt needs exactly one {self.tokenizer.mask_token} token, this one "
                                 f"has {body.count(mask_id)} after fitting {room} tokens: {ex['prompt'][-60:]!r}")
        seqs = [self.prefix + body + self.suffix for body in bodies]
        device = model_device(model)
        out: list[torch.Tensor] = [torch.empty(0)] * len(seqs)
        for group in self._groups([len(s) for s in seqs]):  # groups by length, as Predictor._forward runs them
            width = max(len(seqs[i]) for i in group)
            ids = torch.full((len(group), width), self.tokenizer.pad_token_id, dtype=torch.long)
            attention = torch.zeros((len(group), width), dtype=torch.long)
            for row, i in enumerate(group):
                ids[row, : len(seqs[i])], attention[row, : len(seqs[i])] = torch.tensor(seqs[i]), 1
            with torch.inference_mode():
                logits = model(input_ids=ids.to(device), attention_mask=attention.to(device)).logits
                at = (ids == mask_id).long().argmax(-1).to(device)
                picked = logits[torch.arange(len(group), device=device), at][:, self.label_ids.to(device)]
            for row, i in enumerate(group):
                out[i] = picked[row].float().cpu()
        return torch.stack(out)


class ChoicePredictor(ClassScores):
    """Pick the candidate continuation with the highest (optionally length-normalized) log-likelihood."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, length_normalize: bool = True,
                 max_length: int | None = None):
        super().__init__(tokenizer, max_length)
        self.length_normalize = length_normalize

    def scores(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        """Candidate scores, shape (batch, most candidates); missing candidates score -inf."""
        return self.candidate_scores(model, [ex["prompt"] for ex in batch], [ex["candidates"] for ex in batch],
                                     self.length_normalize)


class GenerationPredictor(Predictor):
    """Greedy generation, or sampling at ``temperature`` (and ``top_p``) seeded by the prompts and ``sample_seed``
    (and, inside a MeZO step, by the optimizer's seed and the step's index), so that both sides of an SPSA estimate
    see the same random numbers and each step (each epoch over repeated prompts) new ones; the text is cut at the
    first stop string (default: a newline), after at most ``max_new_tokens`` tokens.

    When most completions of a batch run into ``max_new_tokens`` unfinished, or are cut at a stop string before any
    letter or digit (an instruct model's JSON cut to ``{``), a warning says so once per predictor: every reward of
    such text is the same, and nothing else would say why."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_new_tokens: int = 16,
                 stop: Sequence[str] = ("\n",), max_length: int | None = None,
                 temperature: float = 0.0, sample_seed: int = 0, top_p: float = 1.0):
        super().__init__(tokenizer, max_length)
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        self.max_new_tokens, self.stop = max_new_tokens, [s for s in stop if s]
        self.temperature, self.sample_seed, self.top_p = temperature, sample_seed, top_p
        self._warned: set[str] = set()

    def generate(self, model: torch.nn.Module, prompts: Sequence[str], strip: bool = True) -> list[str]:
        """Completions for ``prompts``; sampling (temperature > 0) is seeded and leaves the global RNG as it was.

        ``strip=False`` keeps the whitespace the model generated (a leading space, say), so that the text
        scored again after its prompt is tokenized as it was generated."""
        room = self._limit(model) - self.max_new_tokens
        if room < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens} leaves no room for a prompt in the "
                             f"{self._limit(model)}-token limit")
        ids, mask, _ = left_pad(self._fit([self._tokens(p) for p in prompts], room), self.pad_id)
        device = model_device(model)
        sampling = {"do_sample": True, "temperature": self.temperature, "top_k": 0, "top_p": self.top_p} if (
            self.temperature) else {"do_sample": False}
        with torch.inference_mode(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(sampling_seed(prompts, self.sample_seed))
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                 max_new_tokens=self.max_new_tokens, pad_token_id=self.pad_id,
                                 stop_strings=self.stop or None, tokenizer=self.tokenizer, **sampling)
        new = out[:, ids.shape[1]:]
        texts = self.tokenizer.batch_decode(new, skip_special_tokens=True)
        cut = [self._cut(t, strip) for t in texts]
        self._check_cuts(new, texts, cut)
        return cut

    def _check_cuts(self, new: torch.Tensor, texts: list[str], cut: list[str]) -> None:
        """Warn (once per predictor and cause) when most completions hit the length limit or stopped at once."""
        ends = {self.pad_id, self.tokenizer.eos_token_id}
        unfinished = [t for t, row in zip(texts, new.tolist()) if len(row) == self.max_new_tokens
                      and row[-1] not in ends and not any(s in t for s in self.stop)]
        empty = [(t, c) for t, c in zip(texts, cut) if any(s in t for s in self.stop)
                 and not any(ch.isalnum() for ch in c)]
        half = len(texts) / 2
        if len(unfinished) > half and "length" not in self._warned:
            self._warned.add("length")
            warnings.warn(f"{len(unfinished)} of {len(texts)} completions reached max_new_tokens="
                          f"{self.max_new_tokens} unfinished (e.g. {unfinished[0][-40:]!r}): they are cut there; "
                          "raise it (zo-tune --max-new-tokens, ZOConfig(max_completion_length=...)) "
                          "(warned once)", stacklevel=3)
        if len(empty) > half and "stop" not in self._warned:
            self._warned.add("stop")
            raw, kept = empty[0]
            warnings.warn(f"{len(empty)} of {len(texts)} completions were cut at a stop string {self.stop} before "
                          f"any letter or digit ({raw[:40]!r} -> {kept!r}): a multi-line answer (JSON, code, a chat "
                          "model's reply) needs other stop strings: zo-tune --stop '' (none) or --stop '\\n\\n' "
                          "(warned once)", stacklevel=3)

    def _cut(self, text: str, strip: bool = True) -> str:
        for s in self.stop:
            text = text.split(s)[0]
        return text.strip() if strip else text

    def predict(self, model: torch.nn.Module, batch: Batch) -> list[str]:
        return self.generate(model, [ex["prompt"] for ex in batch])

    def cross_entropy(self, model: torch.nn.Module, batch: Batch) -> float:
        """Mean per-token cross-entropy of each example's target answer after its prompt."""
        total, count = self.continuation_logprobs(model, [ex["prompt"] for ex in batch],
                                                  [ex["target"] for ex in batch])
        return float(-(total.sum() / count.sum()))


def chat_formatted(examples: Sequence[dict], tokenizer: PreTrainedTokenizerBase) -> list[dict]:
    """The examples with each prompt put in the tokenizer's chat template as the user's turn, ending where the
    assistant's answer begins (``add_generation_prompt``): how instruct models expect a question. Conversational
    examples (:func:`conversational`) are already in it."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"the tokenizer ({type(tokenizer).__name__}) has no chat template: leave --chat-template off "
                         "for a base model")
    return [ex if MESSAGES in ex else {**ex, "prompt": tokenizer.apply_chat_template(
        [{"role": "user", "content": ex["prompt"]}], tokenize=False, add_generation_prompt=True)} for ex in examples]


MESSAGES = "prompt_messages"  # a conversational example's prompt as its data gave it: a list of messages


def is_messages(value: Any) -> bool:
    """Whether ``value`` is a conversation as TRL's conversational format gives one: [{"role", "content"}, ...]."""
    return (isinstance(value, (list, tuple)) and bool(value)
            and all(isinstance(m, dict) and {"role", "content"} <= set(m) for m in value))


def conversational(examples: Sequence[dict], tokenizer: PreTrainedTokenizerBase) -> list[dict]:
    """The examples whose data gives the prompt as a list of messages (TRL's conversational format) with that
    conversation in the tokenizer's chat template, ending where the assistant's turn begins, as the prompt; the
    messages are kept under ``MESSAGES`` (reward functions get them as ``prompts`` and their completions as
    messages). Other examples are returned as they are."""
    out = []
    for ex in examples:
        messages = (ex.get("raw") or {}).get("prompt") if isinstance(ex.get("raw"), dict) else None
        if MESSAGES in ex or not is_messages(messages):
            out.append(ex)
            continue
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(f"the data gives prompts as messages (conversational) but the tokenizer "
                             f"({type(tokenizer).__name__}) has no chat template: use an instruct model's tokenizer")
        prompt = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
        out.append({**ex, "prompt": prompt, MESSAGES: list(messages)})
    return out


def predictor_for(task: Any, tokenizer: PreTrainedTokenizerBase, max_length: int | None = None,
                  temperature: float = 0.0, model: torch.nn.Module | None = None, *,
                  max_new_tokens: int | None = None, stop: Sequence[str] = ("\n",),
                  top_p: float = 1.0) -> Predictor:
    """The predictor a task's kind calls for: label words, multiple choice, or generation (at most
    ``max_new_tokens``, default the task's, cut at ``stop``); for a masked LM ``model`` (RoBERTa, BERT), label
    words at a mask token (classification tasks only)."""
    if model is not None:
        from zo_objectives.models import is_masked_lm  # imports transformers: only when a model is given

        if is_masked_lm(model):
            if task.kind != "classification":
                raise ValueError(f"a masked LM scores label words at a mask token: it takes classification tasks; "
                                 f"{task.name} is {task.kind}")
            return MaskedLabelWordPredictor(tokenizer, task.label_words, max_length=max_length)
    if task.kind == "classification":
        return LabelWordPredictor(tokenizer, task.label_words, max_length=max_length)
    if task.kind == "multiple_choice":
        return ChoicePredictor(tokenizer, max_length=max_length)
    return GenerationPredictor(tokenizer, max_new_tokens=max_new_tokens or task.max_new_tokens, stop=stop,
                               max_length=max_length, temperature=temperature, top_p=top_p)
