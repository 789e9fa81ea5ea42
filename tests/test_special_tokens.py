"""Special tokens as the tokenizer defines them: BOS once where the tokenizer adds it, chat
templates on HH transcripts, pad == EOS still learning EOS (ppo_core.data), in SFT/RM encoding,
PPO prompts and the evaluation paths."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForSequenceClassification, PreTrainedTokenizerFast

from ppo_core import data as D
from ppo_core.models import build_tiny_causal_lm, check_tokenizer, last_token_scores, token_values, train_tokenizer
from ppo_core.sft import response_nll

WORDS = ("hello world the river is nice . hi there how are you user assistant system : "
         "fine thanks").split()
BOS, EOS = 1, 2
# ChatML-like, but with words of the test vocabulary; writes BOS itself as Llama-3's template does
TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}"
            "{% if add_generation_prompt %}assistant :{% endif %}")


def llama_style_tokenizer(chat_template: str | None = None) -> PreTrainedTokenizerFast:
    """A word-level tokenizer whose post-processor prepends BOS, as hub Llama/Mistral fast
    tokenizers do (TemplateProcessing "<s> $A"); it has no pad token, so pad becomes EOS."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {w: i for i, w in enumerate(dict.fromkeys(["<unk>", "<s>", "</s>", *WORDS]))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")
    if chat_template is not None:
        fast.chat_template = chat_template
    return check_tokenizer(fast, "test")  # type: ignore[return-value]


def ids_of(tok: PreTrainedTokenizerFast, text: str) -> list[int]:
    return [tok.convert_tokens_to_ids(w) for w in text.split()]


@pytest.fixture
def tok() -> PreTrainedTokenizerFast:
    return llama_style_tokenizer()


def test_the_test_tokenizer_adds_bos_like_llama(tok: PreTrainedTokenizerFast) -> None:
    assert tok("hello world")["input_ids"] == [BOS, *ids_of(tok, "hello world")]
    assert tok("hello world", add_special_tokens=False)["input_ids"] == ids_of(tok, "hello world")
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (BOS, EOS, EOS)


def test_prompt_starts_with_bos_exactly_once(tok: PreTrainedTokenizerFast) -> None:
    assert D.bos_ids(tok) == [BOS]
    assert D.encode_prompt(tok, "hello world") == [BOS, *ids_of(tok, "hello world")]
    # a prompt whose text already starts with the BOS string does not get a second one
    assert D.encode_prompt(tok, "<s> hello world") == [BOS, *ids_of(tok, "hello world")]


def test_tokenizers_without_bos_are_unchanged() -> None:
    tok = train_tokenizer(["the river is nice ."] * 4, vocab_size=300)  # the project's own
    plain = tok("the river is nice .", add_special_tokens=False)["input_ids"]
    assert tok.bos_token_id is not None and D.bos_ids(tok) == []
    assert D.encode_prompt(tok, "the river is nice .") == plain


def test_sft_and_rm_sequences_have_one_bos_and_end_with_eos(tok: PreTrainedTokenizerFast) -> None:
    enc = D.encode_prompt_response(tok, "hello world", "the river is nice .", max_length=64)
    resp = ids_of(tok, "the river is nice .")
    assert enc.input_ids == [BOS, *ids_of(tok, "hello world"), *resp, EOS]
    assert enc.labels == [D.IGNORE_INDEX] * 3 + resp + [EOS]
    pair = D.encode_pair(tok, "hello world", "fine thanks", "the river", max_length=64)
    for seq in (pair.chosen_ids, pair.rejected_ids):
        assert seq[0] == BOS and seq.count(BOS) == 1 and seq[-1] == EOS


def test_left_truncation_keeps_bos(tok: PreTrainedTokenizerFast) -> None:
    prompt = "hello world the river is nice . hi there"  # 9 words
    enc = D.encode_prompt_response(tok, prompt, "fine thanks", max_length=8)
    # budget 8: response + EOS = 3, prompt keeps max(8 - 3, 8 // 2) = 5 = BOS + its last 4 words
    assert enc.truncated
    assert enc.input_ids == [BOS, *ids_of(tok, "nice . hi there fine thanks"), EOS]
    assert enc.labels[:5] == [D.IGNORE_INDEX] * 5


def test_pad_equal_to_eos_still_learns_and_scores_the_eos(tok: PreTrainedTokenizerFast) -> None:
    """pad == EOS: the shorter row's EOS is a label and the RM score is read there, because
    padding is found through the attention mask, never by comparing ids with pad_token_id."""
    short = D.encode_prompt_response(tok, "hello", "fine", 64)            # BOS hello fine EOS
    long = D.encode_prompt_response(tok, "hello world", "the river is nice", 64)
    batch = D.collate_sft([short, long], tok.pad_token_id)
    assert tok.pad_token_id == tok.eos_token_id == EOS
    assert batch["input_ids"][0].tolist() == [BOS, ids_of(tok, "hello")[0], ids_of(tok, "fine")[0],
                                              EOS, EOS, EOS, EOS, EOS]
    assert batch["labels"][0].tolist() == [-100, -100, ids_of(tok, "fine")[0], EOS] + [-100] * 4
    assert batch["attention_mask"][0].tolist() == [1, 1, 1, 1, 0, 0, 0, 0]
    # the SFT loss counts the EOS label of each row: 2 + 5 response tokens
    logits = torch.zeros(2, 8, len(tok))
    _, n = response_nll(logits, batch["labels"])
    assert int(n) == 2 + 5
    # the reward model reads the score at the EOS (position 3), not at the first pad-valued id
    lm = build_tiny_causal_lm(tok, n_layer=1, n_embd=16, n_head=2, n_positions=32)
    cfg = lm.config
    cfg.num_labels = 1
    rm = AutoModelForSequenceClassification.from_config(cfg)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    values = token_values(rm, ids, mask)
    torch.testing.assert_close(last_token_scores(rm, ids, mask), values[[0, 1], [3, 7]])


def test_hh_transcript_parses_back_to_messages() -> None:
    prompt = "\n\nHuman: hi there\n\nAssistant: hello\n\nHuman: how are you\n\nAssistant:"
    assert D.hh_messages(prompt) == [
        {"role": "user", "content": "hi there"}, {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "how are you"}]
    assert D.hh_messages("hi there") is None                              # plain text
    assert D.hh_messages("\n\nHuman: hi\n\nAssistant: hello") is None     # no open assistant turn


def test_chat_template_applied_to_transcripts_with_one_bos() -> None:
    tok = llama_style_tokenizer(TEMPLATE)
    prompt = "\n\nHuman: hi there\n\nAssistant:"
    # rendered "<s>user : hi there assistant :": the template writes BOS, none is added again
    assert D.prompt_text(tok, prompt) == "<s>user : hi there assistant :"
    assert D.encode_prompt(tok, prompt) == [BOS, *ids_of(tok, "user : hi there assistant :")]
    # the response drops the space HH puts after "Assistant:"; EOS ends it
    assert D.encode_response(tok, prompt, " fine thanks") == [*ids_of(tok, "fine thanks"), EOS]
    enc = D.encode_prompt_response(tok, prompt, " fine thanks", 64)
    assert enc.input_ids.count(BOS) == 1
    # plain prompts and tokenizers without a template are not templated
    assert D.encode_prompt(tok, "hello world") == [BOS, *ids_of(tok, "hello world")]
    assert D.prompt_text(llama_style_tokenizer(), prompt) == prompt


def test_evaluation_paths_encode_prompts_with_bos(tok: PreTrainedTokenizerFast, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from assets import evaluation
    from ppo_core import generation

    batches = list(evaluation._prompt_response_batches(tok, ["hello world", "hi"], [[5, EOS], [6, EOS]], 8))
    ids, mask, starts, lengths = batches[0]
    assert ids[0].tolist() == [BOS, *ids_of(tok, "hello world"), 5, EOS]
    assert ids[1].tolist()[:4] == [BOS, ids_of(tok, "hi")[0], 6, EOS]
    assert starts == [3, 2] and lengths == [5, 4]

    model = build_tiny_causal_lm(tok, n_layer=1, n_embd=16, n_head=2, n_positions=32)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    seen: list[torch.Tensor] = []
    real = generation.sample

    def spy(model, input_ids, attention_mask, **kw):
        seen.append(input_ids.masked_fill(attention_mask == 0, -1))
        return real(model, input_ids, attention_mask, **kw)

    monkeypatch.setattr(generation, "sample", spy)
    cfg = SimpleNamespace(seed=0, batch_size=8, max_new_tokens=2, temperature=1.0)
    evaluation.generate(str(tmp_path), ["hello world", "hi"], cfg)  # type: ignore[arg-type]
    # left-padded: [BOS hello world] and [-, BOS hi]
    assert seen[0].tolist() == [[BOS, *ids_of(tok, "hello world")], [-1, BOS, ids_of(tok, "hi")[0]]]


def test_ppo_prompts_start_with_bos(tok: PreTrainedTokenizerFast) -> None:
    from ppo_core.ppo import encode_prompts

    assert encode_prompts(tok, ["hello world", "hi"], 16, "test") == [
        [BOS, *ids_of(tok, "hello world")], [BOS, *ids_of(tok, "hi")]]
