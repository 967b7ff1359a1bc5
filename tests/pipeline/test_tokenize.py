import pyarrow as pa
import pytest

from tokensift.config import ConfigError
from tokensift.pipeline.tokenize import BYTE_EOS, Tokenize, TokenizeParams


def test_byte_tokenizer_is_utf8_bytes_plus_eos_and_truncates():
    batch = pa.table({"id": ["a", "b"], "text": ["héllo", "x" * 10]})
    out = Tokenize(TokenizeParams(max_length=6))(batch)
    ids = out.column("input_ids").to_pylist()
    assert ids[0] == list("héllo".encode()) and len(ids[0]) == 6  # 6 bytes, EOS cut by max_length
    assert ids[1] == [ord("x")] * 6
    full = Tokenize(TokenizeParams())(batch).column("input_ids").to_pylist()
    assert full[1] == [ord("x")] * 10 + [BYTE_EOS]
    assert out.column("n_tokens").to_pylist() == [6, 6]


def test_hf_tokenizer_with_prompt_and_response(smollm2):
    _, tok = smollm2
    batch = pa.table({
        "id": ["q", "plain"],
        "text": ["Q: 2+2?\n\nA: 4", "Just some text."],
        "prompt": ["Q: 2+2?", None],
        "response": ["A: 4", None],
    })
    stage = Tokenize(TokenizeParams(tokenizer=tok.name_or_path, prompt_column="prompt", response_column="response"))
    out = stage(batch)
    ids, plen = out.column("input_ids").to_pylist(), out.column("prompt_length").to_pylist()
    prompt = tok("Q: 2+2?", add_special_tokens=False)["input_ids"]
    response = tok("A: 4", add_special_tokens=False)["input_ids"]
    assert ids[0] == prompt + response + [tok.eos_token_id] and plen[0] == len(prompt)
    assert ids[1] == tok("Just some text.", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert plen[1] == 0  # no prompt: every token is scored


def test_prompt_response_rows_get_a_loss_mask_on_the_response():
    batch = pa.table({"id": ["q", "plain"], "text": ["Q: hi\nA: yo", "abc"], "prompt": ["Q: hi\n", None],
                      "response": ["A: yo", None]})
    out = Tokenize(TokenizeParams(prompt_column="prompt", response_column="response"))(batch)
    ids, mask = out.column("input_ids").to_pylist(), out.column("loss_mask").to_pylist()
    assert out.schema.field("loss_mask").type == pa.list_(pa.int8())
    assert ids[0] == list(b"Q: hi\nA: yo") + [BYTE_EOS]
    assert mask[0] == [0] * 6 + [1] * 5 + [1]  # the prompt's 6 bytes untrained; response and EOS trained
    assert mask[1] == [1, 1, 1, 1] and out.column("prompt_length").to_pylist() == [6, 0]
    assert "loss_mask" in Tokenize.adds(TokenizeParams(prompt_column="prompt", response_column="response"))


def test_chat_template_masks_exactly_the_assistant_turns(smollm2):
    _, tok = smollm2
    turns = [{"from": "human", "value": "What is 2+2?"}, {"from": "gpt", "value": "4."},
             {"from": "human", "value": "And 3+3?"}, {"from": "gpt", "value": "6."}]
    batch = pa.table({"id": ["c"], "conversations": [turns]})
    stage = Tokenize(TokenizeParams(tokenizer=tok.name_or_path, messages_column="conversations"))
    out = stage(batch)
    ids, mask = out.column("input_ids").to_pylist()[0], out.column("loss_mask").to_pylist()[0]
    messages = [{"role": "user" if t["from"] == "human" else "assistant", "content": t["value"]} for t in turns]
    full = tok.apply_chat_template(messages, tokenize=False)
    assert ids == tok(full, add_special_tokens=False)["input_ids"]
    trained = tok.decode([i for i, m in zip(ids, mask, strict=True) if m])
    assert trained == "4.<|im_end|>\n6.<|im_end|>\n"  # both replies with their end-of-turn, nothing else
    assert out.column("prompt_length").to_pylist()[0] == mask.index(1)
    pairs = Tokenize(TokenizeParams(tokenizer=tok.name_or_path, prompt_column="p", response_column="r",
                                    chat_template=True))(pa.table({"text": ["x"], "p": ["What is 2+2?"], "r": ["4."]}))
    pmask = pairs.column("loss_mask").to_pylist()[0]
    assert tok.decode([i for i, m in zip(pairs.column("input_ids").to_pylist()[0], pmask, strict=True) if m]) == "4.<|im_end|>\n"


def test_rejected_column_makes_a_preference_pair_and_bad_configs_fail():
    batch = pa.table({"text": ["x"], "prompt": ["Q"], "response": ["good"], "rejected": ["bad"]})
    p = TokenizeParams(prompt_column="prompt", response_column="response", rejected_column="rejected")
    out = Tokenize(p)(batch)
    assert out.column("rejected_input_ids").to_pylist()[0] == list(b"Qbad") + [BYTE_EOS]
    assert out.column("rejected_loss_mask").to_pylist()[0] == [0, 1, 1, 1, 1]
    assert out.column("input_ids").to_pylist()[0] == list(b"Qgood") + [BYTE_EOS]
    with pytest.raises(ConfigError, match="chat template"):
        Tokenize(TokenizeParams(messages_column="conversations"))
    with pytest.raises(ConfigError, match="response_column"):
        Tokenize(TokenizeParams(prompt_column="prompt"))
    with pytest.raises(ValueError, match="row 0.*role"):
        Tokenize(TokenizeParams(tokenizer="byte", rejected_column=None))._conversation([{"who": "x"}], 0)
