"""The verifiable task families (data/tasks.py): answers are right by construction, the checker accepts
exactly the right answer in the reply shapes a model writes, seeds fix the sets, held-out sets are
disjoint from training sets."""

import re

import pytest

from qwen2.data import tasks


def test_answers_are_right_by_construction():
    for p in tasks.problems(300, seed=1):
        q = p["question"]
        if p["family"] == "arithmetic":
            a, b = (int(x) for x in re.findall(r"\d+", q)[:2])
            assert int(p["answer"]) == (a + b if "more" in q else a - b)
        elif p["family"] == "strings":
            word = re.search(r"word (\w+)", q).group(1)
            assert p["answer"] in (word[::-1], word.upper(), "".join(sorted(word)))
        else:
            assert f"The pass key is {p['answer']}." in q


def test_the_checker_accepts_exactly_the_right_answer():
    p = {"family": "arithmetic", "question": "...", "answer": "71"}
    assert tasks.check(p, " 71") and tasks.check(p, "The answer is 71.")
    assert not tasks.check(p, " 17") and not tasks.check(p, "no idea") and not tasks.check(p, "710")
    s = {"family": "strings", "question": "...", "answer": "nohtyp"}
    assert tasks.check(s, " nohtyp\n") and tasks.check(s, "The answer is nohtyp")
    assert not tasks.check(s, " python") and not tasks.check(s, "NOHTYP")


def test_seeds_fix_the_sets_and_held_out_sets_are_disjoint():
    a, b = tasks.problems(90, seed=3), tasks.problems(90, seed=3)
    assert a == b and {p["family"] for p in a} == set(tasks.FAMILIES)
    test = tasks.held_out(a, 60, seed=3)  # the same seed would repeat every problem: all must be replaced
    assert len(test) == 60 and not {p["question"] for p in test} & {p["question"] for p in a}


def test_text_and_chat_forms():
    p = tasks.problems(1, seed=0)[0]
    assert tasks.as_text(p).startswith(tasks.prompt_text(p)) and tasks.as_text(p).endswith(p["answer"] + "\n")
    assert tasks.as_messages(p)[1] == {"role": "assistant", "content": p["answer"]}
    with pytest.raises(ValueError, match="unknown task families"):
        tasks.problems(3, seed=0, families=("poetry",))
