"""Fan-out prompt and parser on messy, realistic model outputs."""

import pytest

from r4t_pipeline.fanout import (
    ParsedFanout,
    build_messages,
    build_prompt_text,
    format_penalty,
    parse_fanout,
    with_query,
)


def test_messages_carry_query_and_k():
    system, user = build_messages("bohemian festival style", 10)
    assert system["role"] == "system" and user["role"] == "user"
    assert "bohemian festival style" in user["content"] and "10" in user["content"]
    text = build_prompt_text("bohemian festival style", 7)
    assert text.startswith(system["content"]) and "bohemian festival style" in text and "7" in text


def test_prompt_template_comes_from_assets_dir(tmp_path, monkeypatch):
    (tmp_path / "prompts").mkdir()
    (tmp_path / "prompts" / "fanout.txt").write_text("Give {k} lines for <{query}>")
    (tmp_path / "prompts" / "fanout_system.txt").write_text("sys")
    monkeypatch.setenv("R4T_ASSETS_DIR", str(tmp_path))
    assert build_messages("jazz", 3) == [{"role": "system", "content": "sys"},
                                         {"role": "user", "content": "Give 3 lines for <jazz>"}]


@pytest.mark.parametrize("bad_k", [0, -2])
def test_bad_inputs_raise(bad_k):
    with pytest.raises(ValueError, match="k must be"):
        parse_fanout("a\nb", bad_k)
    with pytest.raises(ValueError, match="query"):
        build_messages("  ", 3)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # numbered, the way instruction models answer, with a header and a chat terminator
        ("Here are 4 search queries:\n1. fringe suede ankle boots\n2. flower crown\n3) round sunglasses\n"
         "(4) crochet crop top<|im_end|>",
         ["fringe suede ankle boots", "flower crown", "round sunglasses", "crochet crop top"]),
        # bullets of every kind, markdown bold, quotes, blank lines
        ('- "maxi skirt"\n\n* **denim shorts**\n• “tassel earrings”\n  · kimono  \n',
         ["maxi skirt", "denim shorts", "tassel earrings", "kimono"]),
        # case-insensitive duplicates and a repeated query (small models loop)
        ("1. Winter Dresses Under $100\n2. winter dresses under $100\n3. WINTER DRESSES UNDER $100\n4. wool coat",
         ["Winter Dresses Under $100", "wool coat"]),
        # the assistant header echoed, then a hallucinated next user turn that must be ignored
        ("<|im_start|>assistant\ndeep house vinyl\nminimal techno<|im_end|>\n<|im_start|>user\nmore please",
         ["deep house vinyl", "minimal techno"]),
        # Llama-2 / Gemma terminators
        ("acid jazz</s>ignored", ["acid jazz"]),
        ("<start_of_turn>model\nlo-fi beats\nsynthwave<end_of_turn>", ["lo-fi beats", "synthwave"]),
        # numbers that belong to the item are kept: '3.1 phillip lim', '1.5 inch heels'
        ("1. 3.1 phillip lim bag\n2. 1.5 inch heels\n3.Red dress",
         ["3.1 phillip lim bag", "1.5 inch heels", "Red dress"]),
        # "Query 3:", "#2", "q4)", "7 - " prefixes and a JSON-ish list
        ('Query 1: linen shirt\n#2 straw hat\nq3) espadrilles\n7 - canvas tote\n"beach towel",',
         ["linen shirt", "straw hat", "espadrilles", "canvas tote", "beach towel"]),
        # numbering inside quotes, trailing punctuation only lines
        ('"1. silk scarf"\n---\n***\n"2. pearl studs";', ["silk scarf", "pearl studs"]),
    ],
)
def test_parse_messy_outputs(text, expected):
    parsed = parse_fanout(text, 10)
    assert list(parsed.subqueries) == expected
    assert parsed.n_parsed == len(expected)
    assert not parsed.is_empty and not parsed.unparseable


def test_keeps_at_most_k_but_counts_extras():
    text = "\n".join(f"{i}. item number {i}" for i in range(1, 14))
    parsed = parse_fanout(text, 10)
    assert len(parsed.subqueries) == 10 and parsed.subqueries[0] == "item number 1"
    assert parsed.n_parsed == 13
    assert format_penalty(parsed, 10) == pytest.approx(-0.5 * 3 / 10)


@pytest.mark.parametrize(("text", "unparseable"), [("", False), ("   \n\n", False), ("<|im_end|>", True),
                                                   ("1.\n2.\n- \n***", True), ("Here are the queries:", True)])
def test_empty_parses(text, unparseable):
    parsed = parse_fanout(text, 10)
    assert parsed.is_empty and parsed.n_parsed == 0 and parsed.subqueries == ()
    assert parsed.unparseable is unparseable
    assert format_penalty(parsed, 10) == pytest.approx(-0.5)


@pytest.mark.parametrize(("n_parsed", "k", "coef", "expected"),
                         [(10, 10, 0.5, 0.0), (7, 10, 0.5, -0.15), (12, 10, 0.5, -0.1), (1, 4, 1.0, -0.75)])
def test_format_penalty_formula(n_parsed, k, coef, expected):
    parsed = ParsedFanout(subqueries=tuple(f"q{i}" for i in range(min(n_parsed, k))), n_parsed=n_parsed,
                          unparseable=False)
    assert format_penalty(parsed, k, coef) == pytest.approx(expected)


def test_with_query_prefixes_each_line_once():
    lines = ["marni gold top", "Winter  Essentials coats", "winter essentialsx", "winter essentials"]
    assert with_query(" winter  essentials ", lines) == [
        "winter essentials marni gold top", "Winter  Essentials coats", "winter essentials winter essentialsx",
        "winter essentials"]
    assert with_query("winter essentials", with_query("winter essentials", lines)) == with_query("winter essentials",
                                                                                                  lines)
