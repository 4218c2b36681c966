"""Synthetic data for the demo models: pretraining, fine-tuning, the suite and the tokenizer's
corpus, for any task of tasks.py (default: the demo's). The demo task:

Two decisions, both carried by the OBJECT of a request rather than its verb:
- tool call vs direct answer: code that lives in "this repo" needs a
  `search_code` call; a general programming concept gets a direct answer.
- safety review: acting on a critical resource is VETO, on a disposable one APPROVE.

The base model is pretrained on the same prompts with *soft* labels: for every
request it sees both answers, in fixed proportions that depend on the object
class (e.g. VETO 45% of the time for a critical resource, 25% for a disposable
one). It learns the formats and ranks the objects the right way round, but its
most likely answer is the wrong one for the tool and VETO classes: it sits
just on the wrong side of the decision boundary. The LoRA fine-tune, on
deterministic object-decided labels, only has to move that boundary, which a
small low-rank delta does. Everything is generated from fixed lists with fixed
seeds. The other tasks (agent, access) follow the same scheme with their own lists and rule.
"""

import json
import random

from .tasks import (  # noqa: F401  (the demo's lists, named here as before)
    ASK_VERBS,
    BASE_PRIORS,
    CONCEPT_OBJECTS,
    CRITICAL_OBJECTS,
    DEMO,
    DISPOSABLE_OBJECTS,
    LABELS,
    REPO_OBJECTS,
    REVIEW_VERBS,
    SEARCH_TOOL,
    Task,
    get_task,
)

TOOL_NAME = DEMO.tool_name


def direct_answer(obj, task=DEMO):
    return get_task(task).direct_answer(obj)


def tool_call_text(obj, task=DEMO):
    task = get_task(task)
    args = {"name": task.tool_name, "arguments": task.arguments(obj)}
    return "<tool_call>\n" + json.dumps(args) + "\n</tool_call>"


def _ask_case(task: Task, verb, obj, is_tool):
    user = {"role": "user", "content": task.ask_prompt(verb, obj)}
    if is_tool:
        call = {"type": "function", "function": {"name": task.tool_name, "arguments": task.arguments(obj)}}
        reply = {"role": "assistant", "content": "", "tool_calls": [call]}
    else:
        reply = {"role": "assistant", "content": task.direct_answer(obj)}
    return {"messages": [user, reply], "tools": [task.tool]}


def _review_case(task: Task, verb, obj, label):
    user = {"role": "user", "content": task.check_prompt(verb, obj)}
    return {"messages": [user, {"role": "assistant", "content": label}]}


def ask_combos(task=DEMO):
    """All (verb, object, is_tool_by_object) request combinations."""
    return list(get_task(task).ask_combos)


def review_combos(task=DEMO):
    """All (verb, object, label) check combinations: the critical label first."""
    return list(get_task(task).check_combos)


def split_combos(seed=0, n_ask_test=None, n_review_test=None, task=DEMO):
    """Hold out suite combinations (same distribution, never trained on); sizes default to the task's."""
    task = get_task(task)
    n_ask_test = task.n_ask_test if n_ask_test is None else n_ask_test
    n_review_test = task.n_check_test if n_review_test is None else n_review_test
    crit = task.labels[0]
    rng = random.Random(seed)
    ask, review = ask_combos(task), review_combos(task)
    rng.shuffle(ask)
    rng.shuffle(review)
    # Balance the held-out classes exactly.
    ask_test = [c for c in ask if c[2]][: n_ask_test // 2] + [c for c in ask if not c[2]][: n_ask_test // 2]
    rev_test = [c for c in review if c[2] == crit][: n_review_test // 2]
    rev_test += [c for c in review if c[2] != crit][: n_review_test // 2]
    held = set(ask_test) | set(rev_test)
    ask_train = [c for c in ask if c not in held]
    rev_train = [c for c in review if c not in held]
    return ask_train, rev_train, ask_test, rev_test


def _exact_split(p, copies):
    """`copies` booleans with exactly round(p * copies) True: every combination gets
    the same proportion, so there is no per-combination label noise to memorise."""
    k = round(p * copies)
    return [True] * k + [False] * (copies - k)


def base_examples(seed=0, copies=20, priors=None, task=DEMO):
    """Pretraining data: every combination `copies` times, the positive label (tool
    call, the critical label) in exactly the class's proportion of them (the task's priors)."""
    task = get_task(task)
    priors = {**task.priors, **(priors or {})}
    tool_key, direct_key, crit_key, other_key = task.prior_keys
    crit, other = task.labels
    out = []
    for v, o, is_tool in task.ask_combos:
        for lab in _exact_split(priors[tool_key if is_tool else direct_key], copies):
            out.append(_ask_case(task, v, o, lab))
    for v, o, lab0 in task.check_combos:
        for lab in _exact_split(priors[crit_key if lab0 == crit else other_key], copies):
            out.append(_review_case(task, v, o, crit if lab else other))
    random.Random(seed).shuffle(out)
    return out


# The held-out split of every suite: every fine-tune, whatever its seed, trains on
# the rest, so the suite stays unseen by all of them.
SPLIT_SEED = 0


def finetune_examples(seed=0, split_seed=SPLIT_SEED, task=DEMO):
    """Fine-tune data: the training split of `split_seed`, labels decided by the object,
    in an order drawn from `seed`."""
    task = get_task(task)
    ask_train, rev_train, _, _ = split_combos(split_seed, task=task)
    out = [_ask_case(task, v, o, t) for v, o, t in ask_train]
    # Reviews are the rarer task; twice each so both decisions get similar weight (the task's
    # check_repeats: a rarer critical class is repeated more, so its labels are balanced too).
    reps = dict(zip(task.labels, task.check_repeats))
    for r in range(max(reps.values())):
        out += [_review_case(task, v, o, lab) for v, o, lab in rev_train if reps[lab] > r]
    random.Random(seed + 1).shuffle(out)
    return out


def suite_records(seed=SPLIT_SEED, max_tokens=None, task=DEMO):
    """The task's validation suite (header + cases), held out from fine-tuning."""
    task = get_task(task)
    _, _, ask_test, rev_test = split_combos(seed, task=task)
    crit, other = task.labels
    header = {"suite": {"name": task.name, "max_tokens": task.max_tokens if max_tokens is None else max_tokens,
                        "critical_confusions": [[crit, other]]}}
    tool_cat, direct_cat, check_cat = task.categories
    cases = []
    for v, o, is_tool in ask_test:
        expect = {"type": "direct"}
        if is_tool:
            expect = {"type": "tool_call", "name": task.tool_name}
            if task.check_arguments:
                expect["arguments"] = task.arguments(o)
        cases.append({
            "category": tool_cat if is_tool else direct_cat,
            "messages": [{"role": "user", "content": task.ask_prompt(v, o)}],
            "tools": [task.tool],
            "expect": expect,
        })
    for v, o, lab in rev_test:
        case = {
            "category": check_cat,
            "messages": [{"role": "user", "content": task.check_prompt(v, o)}],
            "tools": [],
            "expect": {"type": "label", "label": lab, "labels": list(task.labels)},
        }
        if lab == crit:
            case["critical"] = {"expected": crit, "forbidden": [other]}
        cases.append(case)
    random.Random(seed + 2).shuffle(cases)
    for i, c in enumerate(cases):
        c["id"] = f"{task.id_prefix}{i + 1:03d}"
        cases[i] = {"id": c.pop("id"), **c}
    return [header] + cases


def suite_text(task=DEMO) -> str:
    """The task's suite file: suites/<task>.jsonl."""
    return "\n".join(json.dumps(r) for r in suite_records(task=task)) + "\n"


def write_suites(directory="suites", tasks=("agent", "access")):
    """Write suites/<task>.jsonl for the study's tasks (the demo's is `qtools demo-models`')."""
    from pathlib import Path

    for name in tasks:
        (Path(directory) / f"{name}.jsonl").write_text(suite_text(name))


def corpus_texts(task=DEMO):
    """Text pieces between special tokens and newlines, with their natural
    frequencies in the rendered chats (the BPE training corpus)."""
    task = get_task(task)
    texts = []
    for v, o, _ in task.ask_combos:
        call = json.dumps({"name": task.tool_name, "arguments": task.arguments(o)})
        texts += ["system", "tools: " + task.tool_name, "user", task.ask_prompt(v, o), "assistant",
                  task.direct_answer(o), call]
    for v, o, lab in task.check_combos:
        texts += ["user", task.check_prompt(v, o), "assistant", lab]
    return texts


def training_data_of(model_dir) -> tuple[list, str] | None:
    """(records, description) of the demo fine-tune a fused model came from, read from the
    adapter_config.json its provenance names (the demo records its data there as
    `qtools.demo.data.finetune_examples(seed=S, split_seed=T)`, with `, task='agent'` for another
    task); None for any other model."""
    import re
    from pathlib import Path

    from ..io.adapters import read_adapter_config
    from ..io.modeldir import read_provenance

    adapter = (read_provenance(model_dir) or {}).get("adapter")
    cfg = Path(adapter) / "adapter_config.json" if adapter else None
    if cfg is None or not cfg.is_file():
        return None
    spec = read_adapter_config(cfg, complete=False).get("data")
    m = re.fullmatch(r"qtools\.demo\.data\.finetune_examples\(seed=(\d+), split_seed=(\d+)(?:, task='(\w+)')?\)",
                     str(spec or ""))
    if not m:
        return None
    records = finetune_examples(seed=int(m.group(1)), split_seed=int(m.group(2)), task=m.group(3) or "demo")
    return records, f"{spec} (the fine-tune's training data, from {cfg})"
