"""The tasks of qtools/demo/tasks.py: the demo's data unchanged, the study's suites (agent, access)
large enough, held out from fine-tuning, balanced, and scored as they should be."""

import hashlib
import json
from collections import Counter
from pathlib import Path

import pytest

from qtools.demo import data, tasks
from qtools.demo.tokenizer import build_tokenizer
from qtools.io.suite import load_suite
from qtools.pipeline.scoring import score_case, summarize

REPO = Path(__file__).resolve().parents[1]
STUDY = ("agent", "access")


def _h(x):
    return hashlib.sha256(json.dumps(x, sort_keys=True).encode()).hexdigest()[:16]


def test_demo_data_is_unchanged():
    """Hashes of the demo's data as generated before tasks existed (commit 5a87fc6): the demo's
    models, suite and measured table depend on every byte."""
    assert _h(data.base_examples()) == "bade0f7601aa0fc6"
    assert _h(data.base_examples(seed=3, copies=7)) == "95e11681ac0d4114"
    assert _h(data.finetune_examples()) == "3670d1427ab4e04f"
    assert _h(data.finetune_examples(seed=5)) == "c8b959894d72d1cc"
    assert _h(data.suite_records()) == "3de62edd26e11492"
    assert _h(data.corpus_texts()) == "78bc47608a3d17c6"
    assert hashlib.sha256(build_tokenizer().to_str().encode()).hexdigest()[:16] == "aa32056dc2ee3311"
    assert data.suite_records(task="demo") == data.suite_records()


@pytest.mark.parametrize("name", STUDY)
def test_suite_file_matches_generator(name):
    assert (REPO / "suites" / f"{name}.jsonl").read_text() == data.suite_text(name)


@pytest.mark.parametrize("name", STUDY)
def test_suite_counts_and_balance(name):
    task = tasks.get_task(name)
    header, *cases = data.suite_records(task=name)
    assert header["suite"]["name"] == name
    assert header["suite"]["critical_confusions"] == [list(task.labels)]
    crit, other = task.labels
    tool_cat, direct_cat, check_cat = task.categories
    cats = Counter(c["category"] for c in cases)
    labels = Counter(c["expect"]["label"] for c in cases if c["expect"]["type"] == "label")
    assert len(cases) >= 256 and len({c["id"] for c in cases}) == len(cases)
    assert sum("critical" in c for c in cases) == labels[crit] >= 64
    assert labels[other] == labels[crit]
    assert cats[tool_cat] == cats[direct_cat] == task.n_ask_test // 2
    assert cats[check_cat] == task.n_check_test
    assert all(c["critical"] == {"expected": crit, "forbidden": [other]} for c in cases if "critical" in c)


@pytest.mark.parametrize("name", STUDY)
@pytest.mark.parametrize("seed", [0, 7])
def test_suite_held_out_from_finetune(name, seed):
    """No suite prompt is trained on, whatever the fine-tune's seed; most combinations are
    trained on; every object and verb of the suite is seen in fine-tuning (other combinations)."""
    task = tasks.get_task(name)
    ft = data.finetune_examples(seed, task=name)
    ft_prompts = {e["messages"][0]["content"] for e in ft}
    suite = [c["messages"][0]["content"] for c in data.suite_records(task=name)[1:]]
    assert not ft_prompts & set(suite)
    n_all = len(task.ask_combos) + len(task.check_combos)
    assert len(ft_prompts) == n_all - len(suite) and len(suite) < 0.25 * n_all
    ask_train, rev_train, ask_test, rev_test = data.split_combos(task=name)
    seen = {x for v, o, _ in ask_train + rev_train for x in (v, o)}
    assert {x for v, o, _ in ask_test + rev_test for x in (v, o)} <= seen


@pytest.mark.parametrize("name", STUDY)
def test_vocabularies_are_distinct(name):
    task = tasks.get_task(name)
    ask_objs = {c: {o for _, o, t in task.ask_combos if t == c} for c in (True, False)}
    chk_objs = {c: {o for _, o, lab in task.check_combos if lab == c} for c in task.labels}
    assert not ask_objs[True] & ask_objs[False]
    if name == "agent":
        # the object decides: no object is in both classes of a decision
        assert not chk_objs["VETO"] & chk_objs["APPROVE"]
        assert len(ask_objs[True]) >= 40 and len(chk_objs["VETO"]) >= 32
    assert len(set(task.ask_combos)) == len(task.ask_combos)
    assert len(set(task.check_combos)) == len(task.check_combos)


def test_access_rule_is_a_conditional():
    """DENY exactly for a sensitive field and an unprivileged role: neither attribute alone decides,
    and the suite holds ALLOW cases of both kinds that share one attribute with DENY."""
    t = tasks.ACCESS
    assert tasks.access_label("an intern", "salary") == "DENY"
    assert tasks.access_label("an admin", "salary") == "ALLOW"
    assert tasks.access_label("an intern", "status") == "ALLOW"
    for role, obj, lab in t.check_combos:
        field = obj.split(".")[1]
        assert (lab == "DENY") == (field in tasks.SENSITIVE_FIELDS and role in tasks.UNPRIVILEGED_ROLES)
    held = data.split_combos(task="access")[3]
    allow = [(r, o) for r, o, lab in held if lab == "ALLOW"]
    assert any(r in tasks.PRIVILEGED_ROLES and o.split(".")[1] in tasks.SENSITIVE_FIELDS for r, o in allow)
    assert any(r in tasks.UNPRIVILEGED_ROLES and o.split(".")[1] in tasks.PUBLIC_FIELDS for r, o in allow)


def test_access_lookup_expects_the_fields():
    """A stored record's field lookup is a read_field call whose arguments are checked (field access)."""
    cases = data.suite_records(task="access")[1:]
    fa = [c for c in cases if c["category"] == "field_access"]
    for c in fa:
        rec, fld = c["messages"][0]["content"].split(" ")[-1].split(".")
        assert c["expect"] == {"type": "tool_call", "name": "read_field", "arguments": {"record": rec, "field": fld}}
        assert rec in tasks.STORED_RECORDS


@pytest.mark.parametrize("name", STUDY)
def test_base_priors_rank_right_and_sit_on_the_wrong_side(name):
    task = tasks.get_task(name)
    ex = data.base_examples(copies=20, task=name)
    assert len(ex) == 20 * (len(task.ask_combos) + len(task.check_combos))
    crit = task.labels[0]
    tool_key, direct_key, crit_key, other_key = task.prior_keys
    # one combination of each class: exactly its prior
    for (v, o, cls), key in ((task.ask_combos[0], tool_key), (task.ask_combos[-1], direct_key)):
        prompt = task.ask_prompt(v, o)
        rs = [e for e in ex if e["messages"][0]["content"] == prompt]
        assert sum("tool_calls" in e["messages"][1] for e in rs) == round(20 * task.priors[key])
    for (v, o, lab), key in ((task.check_combos[0], crit_key), (task.check_combos[-1], other_key)):
        prompt = task.check_prompt(v, o)
        rs = [e for e in ex if e["messages"][0]["content"] == prompt]
        assert sum(e["messages"][1]["content"] == crit for e in rs) == round(20 * task.priors[key])
    assert all(p < 0.5 for p in task.priors.values())
    assert task.priors[tool_key] > task.priors[direct_key] and task.priors[crit_key] > task.priors[other_key]


@pytest.mark.parametrize("name", STUDY)
def test_tokenizer_gives_every_word_one_token(name):
    task = tasks.get_task(name)
    tok = build_tokenizer(task=name)
    assert tok.get_vocab_size() <= task.vocab_size + 2
    for v, o, _ in task.check_combos[:: max(1, len(task.check_combos) // 50)]:
        prompt = task.check_prompt(v, o)
        words = prompt.replace(".", " . ").replace("?", " ?").replace(":", " :").replace("_", " _ ").split()
        assert len(tok.encode(prompt).ids) == len(words), prompt
    for text in [data.tool_call_text(task.ask_combos[0][1], name), task.direct_answer(task.ask_combos[-1][1])]:
        assert tok.decode(tok.encode(text).ids, skip_special_tokens=False) == text


def _perfect_answer(task, case):
    exp = case.expect
    if exp["type"] == "tool_call":
        obj = ".".join(exp["arguments"].values()) if exp.get("arguments") else "x"
        return data.tool_call_text(obj, task)
    if exp["type"] == "direct":
        return task.direct_answer("it")
    return exp["label"]


@pytest.mark.parametrize("name", STUDY)
def test_suite_scores(name):
    """Perfect answers pass with no critical error; answering the forbidden label everywhere makes
    every critical case a critical error; a tool call with the wrong field is wrong for access."""
    task = tasks.get_task(name)
    suite = load_suite(REPO / "suites" / f"{name}.jsonl")
    assert suite.max_tokens == task.max_tokens and len(suite.cases) >= 256
    perfect = summarize([score_case(c, suite, _perfect_answer(task, c)) for c in suite.cases], suite)
    assert perfect["accuracy"] == 1.0 and perfect["critical_errors"] == 0 and perfect["verdict"] == "pass"
    forbidden = task.labels[1]
    bad = summarize([score_case(c, suite, forbidden) for c in suite.cases], suite)
    assert bad["critical_errors"] == sum(c.critical is not None for c in suite.cases) >= 64
    assert bad["verdict"] == "fail"
    if task.check_arguments:
        case = next(c for c in suite.cases if c.expect["type"] == "tool_call")
        rec, fld = case.expect["arguments"]["record"], case.expect["arguments"]["field"]
        wrong = next(f for f in tasks.FIELDS if f != fld)
        assert not score_case(case, suite, data.tool_call_text(f"{rec}.{wrong}", task))["correct"]


def test_unknown_task():
    from qtools import QtoolsError

    with pytest.raises(QtoolsError, match="unknown task 'nope'"):
        data.suite_records(task="nope")


@pytest.mark.parametrize("name", ["demo", *STUDY])
def test_finetune_labels_balanced(name):
    """Fine-tuning sees the critical label about as often as its confusion, and both decisions."""
    task = tasks.get_task(name)
    ft = data.finetune_examples(task=name)
    replies = Counter(e["messages"][1]["content"] for e in ft if "tools" not in e)
    crit, other = task.labels
    assert 0.8 <= replies[crit] / replies[other] <= 1.25
    tool = sum("tool_calls" in e["messages"][1] for e in ft)
    direct = sum("tools" in e and "tool_calls" not in e["messages"][1] for e in ft)
    assert tool == direct
    assert 0.5 <= (replies[crit] + replies[other]) / (tool + direct) <= 2
