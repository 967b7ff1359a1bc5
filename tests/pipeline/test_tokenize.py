import pyarrow as pa

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
